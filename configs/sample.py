"""Sampling: `python -m mochi_jax.sample --config=configs/sample.py[:demo] --config.prompt="..."`.

Presets:
  default  the full model from converted weights in ckpt/ (see README "Converting the official
           weights"): 37 frames at 480x848, 64 steps, cfg 6.0, seed 12345 (the fine-tuner's
           validation settings; diffusers' default cfg is 4.5).
  demo     the demo's tiny random models (made by the demo training run): 13 frames at 48x80.
LoRAs: --config.loras="style.safetensors:0.8,subject.safetensors" (path[:strength], strength 1 by
default; genmo / ComfyUI, kohya or diffusers files, or a training run directory).
"""

import ml_collections

from configs import aot as aot_config


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in ("default", "demo"):
        raise ValueError(f"unknown preset {arg!r}; choose 'default' or 'demo'")
    c = ml_collections.ConfigDict()
    c.dit, c.vae, c.t5, c.tokenizer = "ckpt/dit", "ckpt/vae", "ckpt/t5", "ckpt/tokenizer"
    c.prompt = "A close-up video of a cat playing a piano, cinematic lighting."
    c.negative_prompt = ""
    c.zero_empty_negative = False  # True: genmo's original (zero features for an empty negative prompt)
    c.seed = 12345
    c.num_videos = 1  # seeds seed, seed + 1, ...; rendered in batches of `batch_size`
    c.batch_size = 1
    c.num_frames = 37  # 6k + 1
    c.height, c.width = 480, 848  # multiples of 16
    c.steps = 64
    c.guidance = 6.0  # classifier-free guidance scale; 1 = no unconditional branch
    c.threshold_noise = 0.025  # of the linear-quadratic sigma schedule
    c.loras = ""  # comma-separated path[:strength]
    c.param_dtype = "bfloat16"
    c.compute_dtype = "bfloat16"
    c.attention = "xla"  # 'cudnn' on NVIDIA GPUs
    c.tiled_decode = True
    c.out_dir = "samples"
    c.fps = 30
    c.aot = aot_config.section()  # python -m mochi_jax.aot: the fit check (configs/aot.py)
    if arg == "demo":
        root = "runs/demo/models"
        c.dit, c.vae, c.t5, c.tokenizer = f"{root}/dit", f"{root}/vae", f"{root}/t5", f"{root}/tokenizer"
        c.prompt = "a red ball bounces across a white floor"
        c.num_frames, c.height, c.width, c.steps = 13, 48, 80, 8
        c.param_dtype = c.compute_dtype = "float32"
        c.tiled_decode = False
        c.out_dir = "runs/demo/samples"
    return c
