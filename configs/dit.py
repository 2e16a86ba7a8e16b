"""Model presets for the Mochi DiT: `get_config('mochi' | 'small' | 'tiny')`.

    from mochi_jax.configs import dit
    cfg = DiTConfig.from_dict(dit.get_config("tiny"))

Fields are those of `mochi_jax.models.dit.DiTConfig`: architecture (depth, heads, widths),
dtypes (frozen weights `param_dtype`, matmul `compute_dtype`; norms, softmax and modulation
always run in float32), `attention` ('xla' everywhere, 'cudnn' on NVIDIA GPUs, 'splash' on TPU), `remat`
(a policy of mochi_jax.models.remat.POLICIES) and `scan_layers`.
"""

import ml_collections

PRESETS = {
    # The released Mochi 1 preview: 10.03 B parameters.
    "mochi": dict(depth=48, num_heads=24, head_dim=128, text_width=1536, t5_dim=4096, time_embed_dim=256),
    # A small model with the full model's structure, for benchmarks and GPU smoke tests.
    "small": dict(depth=8, num_heads=8, head_dim=64, text_width=256, t5_dim=512, time_embed_dim=256),
    # Tiny: CPU tests and the demo.
    "tiny": dict(depth=3, num_heads=2, head_dim=16, text_width=32, t5_dim=32, time_embed_dim=32),
}


def get_config(arg: str = "mochi") -> ml_collections.ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown DiT preset {arg!r}; choose one of {sorted(PRESETS)}")
    cfg = ml_collections.ConfigDict(dict(
        in_channels=12, patch_size=2, pool_heads=8,
        param_dtype="bfloat16", compute_dtype="bfloat16",
        attention="xla", remat="full", scan_layers=True,
        **PRESETS[arg]))
    if arg == "tiny":
        cfg.param_dtype = cfg.compute_dtype = "float32"
        cfg.remat = "none"
    return cfg
