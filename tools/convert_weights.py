#!/usr/bin/env python
"""Convert official Mochi PyTorch checkpoints (safetensors) into mochi_jax orbax checkpoints.

    python tools/convert_weights.py dit  SRC OUT [--dtype bfloat16] [--overwrite]

SRC: genmo's `dit.safetensors` (ComfyUI prefixes accepted), a diffusers `transformer/` folder
(sharded, with its index JSON) or the diffusers repo root. The layout is detected from the keys.
Tensors are read one at a time; every key and shape is checked before anything is written, and
the output appears only when complete. Pickled files (.pt/.bin/.ckpt) are refused.
"""

import argparse
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=["dit"], help="which model the checkpoint holds")
    ap.add_argument("src", help="source checkpoint file or folder")
    ap.add_argument("out", help="output checkpoint directory (must not exist unless --overwrite)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                    help="dtype of the written floating-point weights (default bfloat16)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    from mochi_jax import convert

    try:
        if args.model == "dit":
            out, cfg = convert.convert_dit(args.src, args.out, args.dtype, args.overwrite, not args.quiet)
            print(f"wrote {out}: Mochi DiT depth {cfg.depth}, width {cfg.width}, {args.dtype}")
    except convert.ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
