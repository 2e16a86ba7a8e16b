"""Config presets build the models they promise."""

import jax
import jax.numpy as jnp
import pytest

from mochi_jax.configs import dit as dit_configs
from mochi_jax.models import lora as lora_lib
from mochi_jax.models.dit import DiTConfig, MochiDiT, param_count


def _abstract_init(cfg, targets=()):
    b, t, h, w, L = 1, 2, 4, 4, 8
    args = (jnp.zeros((b, 12, t, h, w)), jnp.zeros((b, L, cfg.t5_dim)), jnp.ones((b, L), bool), jnp.zeros((b,)))
    return jax.eval_shape(lambda: MochiDiT(cfg, targets).init(jax.random.PRNGKey(0), *args))


def test_full_preset_is_the_10b_model():
    cfg = DiTConfig.from_dict(dit_configs.get_config("mochi"))
    assert cfg.width == 3072 and cfg.mlp_inner(cfg.width) == 8192 and cfg.mlp_inner(cfg.text_width) == 4096
    v = _abstract_init(cfg, lora_lib.targets_from_config(lora_lib.REFERENCE_TARGETS))
    n = param_count(v["params"])
    assert abs(n - 10.03e9) < 0.01e9, n
    assert v["params"]["blocks"]["attn"]["qkv_x"]["kernel"].shape == (47, 3072, 9216)
    assert v["params"]["blocks"]["attn"]["qkv_x"]["kernel"].dtype == jnp.bfloat16
    # rank-16 LoRA on qkv_x, qkv_y, proj_x, proj_y of all 48 blocks
    expected = 48 * 16 * ((3072 + 9216) + (1536 + 9216) + (3072 + 3072)) + 47 * 16 * (3072 + 1536)
    assert lora_lib.count(v["lora"]) == expected


@pytest.mark.parametrize("name", ["small", "tiny"])
def test_small_presets(name):
    cfg = DiTConfig.from_dict(dit_configs.get_config(name))
    assert param_count(_abstract_init(cfg)["params"]) < 1e8


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit_configs.get_config("huge")
    with pytest.raises(ValueError, match="unknown DiT config fields"):
        DiTConfig.from_dict(dict(depth=3, heads=2))


# ----------------------------------------------------------------------------- model block -> DiTConfig

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

import mochi_jax  # noqa: E402
from mochi_jax import sample as sample_cmd  # noqa: E402
from mochi_jax.checkpoints import dit_config  # noqa: E402
from mochi_jax.configs import eval as eval_configs  # noqa: E402
from mochi_jax.configs import lora as lora_configs  # noqa: E402
from mochi_jax.configs import sample as sample_configs  # noqa: E402

# a value other than the default for every setting field
OTHER = dict(param_dtype="float32", compute_dtype="float32", attention="splash", splash_block=256, remat="dots",
             remat_groups="dots:1,full:1", scan_layers=False, weights_on_host=False)
COMMAND_CONFIGS = {"train": lora_configs.get_config, "sample": sample_configs.get_config,
                   "evaluate": eval_configs.get_config}
DIFFERENTIATED = {"train"}  # sampling keeps nothing for a backward pass: remat is fixed to 'none' there


def test_every_setting_field_is_in_every_command_model_block():
    assert set(OTHER) == set(DiTConfig.SETTING_FIELDS)
    for name, get in COMMAND_CONFIGS.items():
        m = get().model
        fields = set(DiTConfig.SETTING_FIELDS) - (set() if name in DIFFERENTIATED else {"remat", "remat_groups"})
        assert fields <= set(m.keys()), (name, sorted(fields - set(m.keys())))


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
@pytest.mark.parametrize("field", sorted(OTHER))
def test_each_setting_reaches_the_dit_config(command, field):
    """dit_config(model block) carries each field of the block; `fixed` wins over the block."""
    m = COMMAND_CONFIGS[command]().model
    if field in ("remat", "remat_groups") and command not in DIFFERENTIATED:
        m[field] = OTHER[field]  # a field the block lacks is taken when it is there
    m[field] = OTHER[field]
    if field == "weights_on_host":
        m[field], m.scan_layers = True, True
    cfg = dit_config(m, dit_configs.PRESETS["tiny"])
    assert getattr(cfg, field) == m[field]
    assert dit_config(m, dit_configs.PRESETS["tiny"], remat="none").remat == "none"


@pytest.mark.slow
def test_the_commands_build_the_dit_config_from_their_model_block(tmp_path, monkeypatch):
    """`sample` hands its whole model block to dit_config (so a field added to DiTConfig.SETTING_FIELDS
    reaches it with no change to the command)."""
    from mochi_jax.demo import write_demo_models

    models = write_demo_models(tmp_path / "models")
    cfg = sample_configs.get_config()
    cfg.model.update(dit=str(models["dit"]), attention="splash", splash_block=256, compute_dtype="float32")
    seen = {}

    def stop(loras, dit_cfg):
        seen["cfg"] = dit_cfg
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_cmd, "load_loras", stop)
    with pytest.raises(KeyboardInterrupt):
        next(sample_cmd.render(cfg))
    assert (seen["cfg"].attention, seen["cfg"].splash_block, seen["cfg"].remat) == ("splash", 256, "none")


def test_no_command_or_library_module_builds_a_dit_config_by_hand():
    """DiTConfig is made from settings only by checkpoints.dit_config (and by the models and converters
    that define or read it, the demo that writes its tiny model, and the fit check's architecture)."""
    package = Path(mochi_jax.__file__).parent
    allowed = {"models/dit.py", "checkpoints/dit.py", "demo/models.py"}
    found = []
    for f in package.rglob("*.py"):
        rel = str(f.relative_to(package))
        if rel in allowed:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func
                name = (fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", ""))
                owner = getattr(fn.value, "id", "") if isinstance(fn, ast.Attribute) else ""
                if (name == "DiTConfig" or (owner == "DiTConfig" and name == "from_dict")
                        or (name == "dit_config" and node.args and isinstance(node.args[0], ast.Attribute)
                            and node.args[0].attr == "dit")):
                    found.append(f"{rel}:{node.lineno}")
    assert not found, found


# ----------------------------------------------------------------------------- config block -> VAEConfig / T5Config

import numpy as np  # noqa: E402

from mochi_jax.checkpoints import load_vae, read_metadata, save_model  # noqa: E402
from mochi_jax.checkpoints import t5_config, t5_settings, vae_config, vae_settings  # noqa: E402
from mochi_jax.configs import common as common_configs  # noqa: E402
from mochi_jax.configs import prepare as prepare_configs  # noqa: E402
from mochi_jax.lib import cache as cache_lib  # noqa: E402
from mochi_jax.lib import preparation as prepare_lib  # noqa: E402
from mochi_jax.lib.text import TextEncoder  # noqa: E402
from mochi_jax.models import t5 as t5_lib  # noqa: E402
from mochi_jax.models import vae as vae_lib  # noqa: E402
from mochi_jax.models.t5 import T5Config  # noqa: E402
from mochi_jax.models.vae import VAEConfig  # noqa: E402

# the block each command's VAE and T5 settings are read from: the `model` block, prepare's flat config
SETTING_BLOCKS = {"train": lambda p: lora_configs.get_config(p).model,
                  "sample": lambda p: sample_configs.get_config(p).model,
                  "evaluate": lambda p: eval_configs.get_config(p).model,
                  "prepare": lambda p: prepare_configs.get_config(p)}
PRESETS = ("default", "demo")


def other_dtype(d: str) -> str:
    return "float32" if d == "bfloat16" else "bfloat16"


# config key -> (its load keyword, the VAEConfig / T5Config field it sets, the block's value -> another value)
VAE_KEYS = {"vae_dtype": ("dtype", "param_dtype", other_dtype),
            "vae_compute_dtype": ("compute_dtype", "compute_dtype", other_dtype),
            "tile_size": ("tile_size", "tile_size", lambda v: (128, 192)),
            "tile_overlap": ("tile_overlap", "tile_overlap", lambda v: (24, 16))}
T5_KEYS = {"t5_dtype": ("dtype", "param_dtype", other_dtype),
           "t5_compute_dtype": ("compute_dtype", "compute_dtype", other_dtype)}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("command", sorted(SETTING_BLOCKS))
def test_every_vae_and_t5_setting_is_in_every_command_config(command, preset):
    keys = set(VAE_KEYS) | set(T5_KEYS)
    block = SETTING_BLOCKS[command](preset)
    assert keys <= set(block.keys()), sorted(keys - set(block.keys()))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("command", sorted(SETTING_BLOCKS))
@pytest.mark.parametrize("key", sorted(VAE_KEYS) + sorted(T5_KEYS))
def test_each_vae_and_t5_setting_reaches_its_config(command, preset, key):
    """vae_settings / t5_settings carry each key of the block to its load keyword, vae_config / t5_config
    to the config field (the stored dtype unless the block casts it)."""
    block = SETTING_BLOCKS[command](preset)
    settings, build, arch = ((vae_settings, vae_config, common_configs.DEMO_VAE) if key in VAE_KEYS
                             else (t5_settings, t5_config, common_configs.DEMO_T5))
    keyword, field, other = {**VAE_KEYS, **T5_KEYS}[key]
    stored = "float32"
    value = other(block[key] or stored)
    before = getattr(build(block, dict(arch), stored), field)
    assert before != value
    block[key] = value
    assert settings(block)[keyword] == value
    assert getattr(build(block, dict(arch), stored), field) == value


def test_a_block_without_the_settings_keeps_the_defaults_and_the_stored_dtype():
    assert vae_settings({}) == {"dtype": None} and t5_settings({}) == {"dtype": None}
    assert vae_settings({"vae_dtype": ""})["dtype"] is None and t5_settings({"t5_dtype": ""})["dtype"] is None
    vae, t5 = vae_config({}, {}, "bfloat16"), t5_config({}, {}, "float32")
    assert (vae.param_dtype, vae.compute_dtype, vae.tile_size, vae.tile_overlap) == ("bfloat16", "float32", (256, 256),
                                                                                     (64, 64))
    assert (t5.param_dtype, t5.compute_dtype) == ("float32", "bfloat16")


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    """The demo's tiny VAE and T5 shapes as float32 zeros and its tokenizer (mochi_jax.demo's random
    weights take seconds to draw; a placeholder for the DiT, which is not needed)."""
    from mochi_jax.demo import write_demo_models

    root = tmp_path_factory.mktemp("models")
    vae_cfg, t5_cfg = VAEConfig(**common_configs.DEMO_VAE), T5Config(**common_configs.DEMO_T5)
    zeros = lambda shapes: jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), shapes)  # noqa: E731
    save_model(root / "vae", zeros(jax.eval_shape(lambda: vae_lib.init(jax.random.PRNGKey(0), vae_cfg))),
               "mochi_vae", vae_cfg.arch_dict())
    save_model(root / "t5", zeros(t5_lib.abstract_params(t5_cfg)), "t5_encoder", t5_cfg.arch(),
               unstack=[("blocks", t5_cfg.num_layers)])
    (root / "dit").mkdir()
    return write_demo_models(root)  # the tokenizer


@pytest.mark.parametrize("command", sorted(SETTING_BLOCKS))
def test_the_loaded_vae_and_t5_have_the_blocks_settings(demo_models, command):
    """load_vae(path, **vae_settings(block)) and TextEncoder.load(..., **t5_settings(block)) give the
    config vae_config / t5_config build without loading (what the fit check compiles), with every
    non-default setting of the block, and weights of that dtype."""
    block = SETTING_BLOCKS[command]("default")
    for key, (_, _, other) in {**VAE_KEYS, **T5_KEYS}.items():
        block[key] = other(block[key] or "float32")  # the demo models are stored as float32
    vae_cfg, vae_params = load_vae(demo_models["vae"], **vae_settings(block))
    assert vae_cfg == vae_config(block, read_metadata(demo_models["vae"])["config"], "float32")
    assert (vae_cfg.param_dtype, vae_cfg.compute_dtype, vae_cfg.tile_size, vae_cfg.tile_overlap) == (
        block.vae_dtype, block.vae_compute_dtype, tuple(block.tile_size), tuple(block.tile_overlap))
    assert {x.dtype for x in jax.tree_util.tree_leaves(vae_params)} == {jnp.dtype(block.vae_dtype)}
    text = TextEncoder.load(demo_models["t5"], demo_models["tokenizer"], **t5_settings(block))
    assert text.cfg == t5_config(block, read_metadata(demo_models["t5"])["config"], "float32")
    assert (text.cfg.param_dtype, text.cfg.compute_dtype) == (block.t5_dtype, block.t5_compute_dtype)
    assert {x.dtype for x in jax.tree_util.tree_leaves(text.params)} == {jnp.dtype(block.t5_dtype)}


def test_a_cache_made_before_the_compute_dtype_settings_is_reused_and_a_changed_one_refused(tmp_path):
    """prepare's manifest records vae_compute_dtype / t5_compute_dtype; a manifest without them was made
    with their defaults (float32 VAE, bfloat16 T5), so it matches the default config and no other."""
    cfg = prepare_configs.get_config()
    now = prepare_lib.settings(cfg)
    old = {k: v for k, v in now.items() if k not in ("vae_compute_dtype", "t5_compute_dtype")}
    assert prepare_lib.content(old) == prepare_lib.content(now)
    clip = {"name": "c", "file": "clips/c.safetensors", "latent_shape": [12, 7, 60, 106]}
    (tmp_path / "clips").mkdir()
    (tmp_path / clip["file"]).write_bytes(b"")
    cache_lib.write_manifest(tmp_path, {"format": cache_lib.FORMAT, "config": old, "clips": [clip],
                                        "empty_prompt": cache_lib.EMPTY_PROMPT, "skipped": []})
    assert prepare_lib._existing(tmp_path, cfg, now) == {"c": clip}
    for key, value in (("vae_compute_dtype", "bfloat16"), ("t5_compute_dtype", "float32")):
        with pytest.raises(ValueError, match=f"{key}: cached .* vs now '{value}'.*overwrite"):
            prepare_lib._existing(tmp_path, cfg, {**now, key: value})


def test_the_search_preset_is_ranks_4_and_8_by_three_learning_rates():
    from mochi_jax.checkpoints.runs import sweep_variants
    from mochi_jax.configs import lora as lora_config

    variants = dict(sweep_variants(lora_config.get_config("search")))
    assert list(variants) == [f"r{r}_lr{lr}" for r in (4, 8) for lr in ("1e-04", "3e-05", "1e-05")]
    for name, v in variants.items():
        rank = int(name[1])
        assert {t.rank for t in v.lora.values() if t.rank > 0} == {rank}
        assert {t.alpha for t in v.lora.values() if t.rank > 0} == {float(rank)}  # alpha / rank = 1, as default's
        assert v.optim.lr == float(name.split("lr")[1])
