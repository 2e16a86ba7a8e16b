"""LoRA evaluation: `python -m mochi_jax.evaluate --config=configs/eval.py[:demo] --config.loras=a.safetensors,runs/b`.

Presets:
  default  the full model from converted weights in ckpt/ (docs/weights.md),
           the fine-tuner's validation settings (37 frames at 480x848, 64 steps, cfg 6.0), 4 seeds,
           a CLIP converted to ckpt/clip (`python tools/convert_weights.py clip <openai/clip-vit-base-patch32
           folder> ckpt/clip`) with its tokenizer files (vocab.json + merges.txt) in ckpt/clip_tokenizer.
  demo     the demo's tiny random models and the demo training run (`python -m mochi_jax.train
           --config=configs/lora.py:demo` first): a tiny random CLIP and a prompt file are made on
           first use under runs/demo; 13 frames at 48x80, 8 steps.
LoRAs: comma-separated path[:strength]; each is one variant compared with the base (the same LoRA
twice at two strengths compares strengths). A path is a LoRA file (genmo / ComfyUI, kohya or
diffusers) or a training run directory (its latest checkpoint); a sweep's run directory is all of its
LoRAs (one of them: <run>/variants/<name>).
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
    c.clip = common.clip()
    c.loras = ""  # comma-separated path[:strength]; '' evaluates the base alone
    c.prompt_file = "prompts.txt"  # one prompt per line; blank lines and lines starting with '#' are skipped
    c.seeds = "12345,12346,12347,12348"  # comma-separated; the same noise for every variant
    c.batch_size = 1  # seeds per denoising call
    c.mesh = common.mesh(fsdp=-1)  # devices, as configs/sample.py: weights over fsdp, batch or tokens split
    c.distributed = common.distributed()  # several hosts: one process each, process 0 writes
    c.batch_loras = True  # base and all LoRAs in one vmapped call (memory x variants); False: one at a time
    c.references = ""  # for CLIP-I: a folder of videos, one video, or a prepared cache folder; '' = none
    c.reference_frames = 8  # frames per reference video, evenly spaced over its first num_frames frames
    c.max_references = 32  # reference videos used (the first ones); 0 = all
    c.style_prompt = ""  # for the style probe, e.g. "a watercolor painting"; '' = none
    c.sheet_frames = 6  # columns of the contact sheets
    c.sheet_height = 120  # pixels per thumbnail row
    c.out_dir = "eval"
    c.aot = aot_config.section()  # python -m mochi_jax.aot: the fit check (configs/aot.py)
    if arg == "demo":
        root = common.DEMO_ROOT
        common.demo_model(c.model, root)
        common.demo_sampling(c.sampling)
        c.clip.update(dict(checkpoint=f"{root}/models/clip", tokenizer=f"{root}/models/clip_tokenizer"))
        c.loras = f"{root}/run"
        c.prompt_file = f"{root}/eval_prompts.txt"
        c.references = f"{root}/cache"
        c.max_references = 4
        c.seeds = "0,1,2"
        c.sheet_height = 48
        c.out_dir = f"{root}/eval"
        c.demo = common.demo(root, clip_model=True)
    return c
