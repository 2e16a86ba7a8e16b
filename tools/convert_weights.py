#!/usr/bin/env python
"""Convert official Mochi PyTorch checkpoints (safetensors) into mochi_jax orbax checkpoints.

    python tools/convert_weights.py dit  SRC OUT [--dtype bfloat16|int8|float8_e4m3fn] [--overwrite]
    python tools/convert_weights.py t5   SRC OUT [--dtype bfloat16] [--overwrite]
    python tools/convert_weights.py vae  SRC OUT [--dtype bfloat16] [--overwrite]
    python tools/convert_weights.py clip SRC OUT [--dtype float32] [--overwrite] [--vision-heads N --text-heads N]

dit: SRC is genmo's `dit.safetensors` (ComfyUI prefixes accepted), a diffusers `transformer/`
folder (sharded, with its index JSON) or the diffusers repo root; the layout is detected from
the keys. t5: SRC is the diffusers repo's `text_encoder/` folder, the repo root, or one file.
vae: SRC is the diffusers repo root or its `vae/` folder, or genmo's folder holding
`encoder.safetensors` and `decoder.safetensors`.
clip: SRC is a transformers CLIPModel folder (model.safetensors + config.json) or file, or an
OpenAI / open_clip state dict saved as safetensors (open_clip_config.json beside it is read);
heads default to width // 64 when no config says otherwise (--vision-heads / --text-heads).
Tensors are read one at a time; every key and shape is checked before anything is written, and
the output appears only when complete. Pickled files (.pt/.bin/.ckpt) are refused.
Exit status 2 for anything the user can fix (a missing or bad source, an unwritable output), with
one message naming the file, key or folder.
"""

import argparse
import sys

from mochi_jax import checkpoints as convert
from mochi_jax import cli
from mochi_jax.lib import placement


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs.py parses the documentation's commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=["dit", "t5", "vae", "clip"], help="which model the checkpoint holds")
    ap.add_argument("src", help="source checkpoint file or folder")
    ap.add_argument("out", help="output checkpoint directory (must not exist unless --overwrite)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16", "int8", "float8_e4m3fn"],
                    help="dtype of the written floating-point weights (default bfloat16); dit only: int8 or "
                         "float8_e4m3fn write a quantized base (the blocks' kernels with per-channel scales, the "
                         "rest bfloat16)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--vision-heads", type=int, help="clip: attention heads of the image tower (else from the config)")
    ap.add_argument("--text-heads", type=int, help="clip: attention heads of the text tower (else from the config)")
    return ap


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    if args.dtype in ("int8", "float8_e4m3fn") and args.model != "dit":
        ap.error(f"--dtype {args.dtype}: only the dit is written quantized; choose bfloat16, float32 or float16")

    try:
        placement.start()  # the devices up, without libtpu's search for TPU chips on a machine with none
        if args.model == "dit":
            out, cfg = convert.convert_dit(args.src, args.out, args.dtype, args.overwrite, not args.quiet)
            print(f"wrote {out}: Mochi DiT depth {cfg.depth}, width {cfg.width}, {args.dtype}")
        elif args.model == "t5":
            out, cfg = convert.convert_t5(args.src, args.out, args.dtype, args.overwrite, not args.quiet)
            print(f"wrote {out}: T5 encoder {cfg.num_layers} layers, d_model {cfg.d_model}, "
                  f"{cfg.num_heads}x{cfg.d_kv} heads, {args.dtype}")
        elif args.model == "vae":
            out, cfg = convert.convert_vae(args.src, args.out, args.dtype, args.overwrite, not args.quiet)
            print(f"wrote {out}: Mochi VAE (encoder {cfg.encoder_channels}, decoder {cfg.decoder_channels}), "
                  f"{args.dtype}")
        elif args.model == "clip":
            heads = {k: v for k, v in (("vision_heads", args.vision_heads), ("text_heads", args.text_heads)) if v}
            out, cfg = convert.convert_clip(args.src, args.out, args.dtype, args.overwrite, not args.quiet, **heads)
            print(f"wrote {out}: CLIP ViT-{cfg.patch_size} {cfg.image_size}px, vision {cfg.vision_layers}x"
                  f"{cfg.vision_width} ({cfg.vision_heads} heads), text {cfg.text_layers}x{cfg.text_width} "
                  f"({cfg.text_heads} heads), {cfg.activation}, {args.dtype}")
    except Exception as e:  # noqa: BLE001 - user errors: one line and exit status 2; bugs keep their traceback
        return cli.fail("tools/convert_weights.py", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
