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
