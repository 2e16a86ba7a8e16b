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
