"""Settings of `python -m mochi_jax.prepare`: `get_config('' | 'demo')`.

    python -m mochi_jax.prepare --config=configs/prepare.py --config.input_dir=clips --config.output_dir=cache
    python -m mochi_jax.prepare --config=configs/prepare.py:demo          # tiny random models, synthetic clips

The default preset is the official fine-tuner's data recipe: the first 37 frames at 30 fps,
resized to cover and centre-cropped to 480x848, encoded by the converted VAE and T5 (see
tools/convert_weights.py). `tokenizer` is a folder holding spiece.model (the diffusers repo
root or its tokenizer/ folder both work). The demo preset makes its tiny models and synthetic
clips under runs/demo on first use (only there: another input_dir is never written into).
"""

import ml_collections

from mochi_jax.configs import aot as aot_config
from mochi_jax.configs import common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in ("", "default", "demo"):
        raise ValueError(f"unknown prepare preset {arg!r}; choose '' (default) or 'demo'")
    cfg = ml_collections.ConfigDict(dict(
        # videos (.mp4 .mov .webm .mkv) and images (.jpg .png .webp) with captions, or a musubi-tuner metadata
        # .jsonl ({"video_path" | "image_path": path, "caption": text} per line; paths absolute or relative to it)
        input_dir="clips",
        output_dir="cache",         # manifest.json + clips/<name>.safetensors
        vae="ckpt/vae",             # converted checkpoints
        t5="ckpt/t5",
        tokenizer="ckpt/tokenizer",
        fps=30.0,                   # frames are picked at this rate from the source
        # 6k+1 frames -> k+1 latent frames; or frame buckets, e.g. (25, 37, 61): each clip (window) is
        # cached at the longest bucket it fills, once. Images are always 1 frame.
        num_frames=ml_collections.FieldReference(37, field_type=object),
        # Frame windows per video: 'head' (the first frames, as the official fine-tuner), 'uniform'
        # (`count` windows spread from the start to the end), 'slide' (every `stride` frames, 0 = back
        # to back; at most `max` windows, 0 = all). Windows are in frames at `fps`; each is its own
        # cached clip '<name>@<start frame>' with its source and start time in the manifest.
        windows=dict(mode="head", count=3, stride=0, max=0),
        buckets=((480, 848),),      # (H, W) pixel sizes; each clip takes the closest aspect ratio
        upscale=True,               # False: skip clips smaller than their bucket instead of enlarging
        # Captions: clip.txt beside each file, else a row of a metadata.jsonl / .csv (columns file_name (or
        # video_path, image_path) and caption or text); '' finds input_dir/metadata.jsonl or metadata.csv, or
        # name a file. A .jsonl input_dir holds its own captions.
        captions="",
        trigger="",                 # a word put before every caption ("sks" -> "sks a dog runs")
        max_length=256,             # T5 tokens; longer captions are truncated and reported
        text_batch_size=8,          # captions per T5 call
        workers=4,                  # threads decoding and resizing ahead of the encoders; 0 = one at a time
        vae_dtype="float32",        # weights cast on load; "" keeps the stored dtype
        vae_compute_dtype="float32",  # VAE convolutions (bfloat16: faster, latents rounded)
        t5_dtype="",
        t5_compute_dtype="bfloat16",  # T5 matmuls; its norms, softmax and residual stream run in float32
        tiled=False,                # tiled VAE encoding (bounded memory, approximate)
        tile_size=(256, 256),
        tile_overlap=(64, 64),
        previews=False,             # decode each cached mean and write input | reconstruction mp4s
        # Devices (this process's): how many to spread the encoders over, -1 = all, 1 = one device.
        # With more than one, T5's weights are sharded as `mesh` says (mochi_jax/models/sharding.py:
        # 'fsdp' splits the model width, 'tensor' heads and MLP columns, the text batch goes over data x
        # fsdp where it divides); the VAE's weights are replicated and each clip is split spatially
        # (latent width, then height) over all of them. Not a content setting: same cache either way.
        devices=-1,
        mesh=dict(data=1, fsdp=-1, tensor=1),
        overwrite=False,            # re-encode every clip even if the cache already has it
    ))
    cfg.aot = aot_config.section()  # python -m mochi_jax.aot: the fit check (configs/aot.py)
    if arg == "demo":
        root = common.DEMO_ROOT
        cfg.update(dict(
            input_dir=f"{root}/clips", output_dir=f"{root}/cache",
            vae=f"{root}/models/vae", t5=f"{root}/models/t5", tokenizer=f"{root}/models/tokenizer",
            num_frames=13, buckets=((48, 80),), tile_size=(32, 32), tile_overlap=(16, 16)))
        cfg.demo = common.demo(root, clips=4)
    return cfg
