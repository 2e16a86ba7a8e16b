"""Sampling: `python -m mochi_jax.sample --config=configs/sample.py[:demo] --config.prompt="..."`.

Presets:
  default  the full model from converted weights in ckpt/ (see docs/weights.md): 37 frames at 480x848,
           64 steps, cfg 6.0, seed 12345 (the fine-tuner's validation settings; diffusers' default cfg is 4.5).
  demo     the demo's tiny random models (made on first use under runs/demo): 13 frames at 48x80.
LoRAs: --config.loras="style.safetensors:0.8,subject.safetensors" (path[:strength], strength 1 by
default; genmo / ComfyUI, kohya or diffusers files, or a training run directory).
"""

import ml_collections

from mochi_jax.configs import aot as aot_config
from mochi_jax.configs import common


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in ("default", "demo"):
        raise ValueError(f"unknown preset {arg!r}; choose 'default' or 'demo'")
    c = ml_collections.ConfigDict()
    c.model = common.model()
    c.sampling = common.sampling()
    c.prompt = "A close-up video of a cat playing a piano, cinematic lighting."
    c.prompt_file = ""  # a text file, one prompt per line ('#' comments), rendered instead of `prompt`
    c.seed = 12345
    c.num_videos = 1  # per prompt: seeds seed, seed + 1, ...
    c.batch_size = 1  # videos per denoising call (prompts and seeds together)
    # Devices (mochi_jax/models/sharding.py): 'fsdp' shards the DiT's weights (the released model needs it
    # on 16 GB chips); each of 'data' and 'fsdp' splits the batch (both guidance branches: 2 x batch_size)
    # where it divides it, else the visual tokens; 'sequence' splits the tokens, 'tensor' heads and MLP
    # columns (sequence x tensor must divide the 24 heads). -1: the devices left.
    c.mesh = common.mesh(fsdp=-1)
    c.distributed = common.distributed()  # several hosts: one process each, process 0 writes
    c.loras = ""  # comma-separated path[:strength]
    c.out_dir = "samples"
    c.aot = aot_config.section()  # python -m mochi_jax.aot: the fit check (configs/aot.py)
    if arg == "demo":
        common.demo_model(c.model)
        common.demo_sampling(c.sampling)
        c.prompt = "a red ball bounces across a white floor"
        c.out_dir = f"{common.DEMO_ROOT}/samples"
        c.demo = common.demo()
    return c
