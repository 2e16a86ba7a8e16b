#!/usr/bin/env python
"""Mochi LoRA files: convert between genmo/ComfyUI and diffusers naming, merge into a checkpoint, inspect.

    python tools/lora.py convert SRC OUT --to genmo|diffusers [--depth N] [--dtype float32|bfloat16]
    python tools/lora.py merge BASE_DIR LORA OUT [--strength S] [--unmerge] [--overwrite]
    python tools/lora.py info LORA [--depth N]

SRC / LORA: a .safetensors LoRA in genmo/ComfyUI (`blocks.N.attn.qkv_x.lora_A`, optional
`diffusion_model.` prefix), kohya (`lora_unet_blocks_N_...lora_down.weight`) or diffusers
(`transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`) naming, detected from the keys.
--to genmo writes the file ComfyUI and genmo's loader read identically; --to diffusers the one
`MochiPipeline.load_lora_weights` reads. Neither tool reads the other's naming, so ship both.
BASE_DIR: a checkpoint written by tools/convert_weights.py; OUT is written in its dtype and
read with mochi_jax.checkpoints.weights.load_dit. --depth: the model's number of blocks (Mochi 1: 48; by
default the highest block index in the file + 1).
Exit code 2 when a file cannot be used (the message names the file and every bad key).
"""

import argparse
import json
import sys

from mochi_jax.checkpoints import ConversionError
from mochi_jax.checkpoints import lora_files as lora_io


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="rewrite a LoRA file in genmo or diffusers naming")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--to", required=True, choices=["genmo", "diffusers"])
    c.add_argument("--depth", type=int, default=None, help="number of DiT blocks (Mochi 1: 48)")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m = sub.add_parser("merge", help="fold a LoRA into a converted checkpoint")
    m.add_argument("base_dir")
    m.add_argument("lora")
    m.add_argument("out")
    m.add_argument("--strength", type=float, default=1.0)
    m.add_argument("--unmerge", action="store_true", help="remove a previously merged LoRA instead")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    i = sub.add_parser("info", help="print a LoRA file's format, ranks, alphas and layers")
    i.add_argument("lora")
    i.add_argument("--depth", type=int, default=None)
    i.add_argument("--json", action="store_true", help="print the info as JSON")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "convert":
            tree, targets, info = lora_io.load_lora(args.src, depth=args.depth)
            save = lora_io.save_genmo if args.to == "genmo" else lora_io.save_diffusers
            out = save(args.out, tree, targets, depth=info["depth"], dtype=args.dtype)
            print(f"wrote {out}: {args.to} LoRA, {len(targets)} layer groups, depth {info['depth']} "
                  f"(from {info['format']} {args.src})")
        elif args.cmd == "merge":
            out, _ = lora_io.merge_checkpoint(args.base_dir, args.lora, args.out, args.strength, args.unmerge,
                                              overwrite=args.overwrite)
            print(f"wrote {out}: {args.base_dir} {'minus' if args.unmerge else 'plus'} "
                  f"{args.strength} x {args.lora}")
        else:
            _, _, info = lora_io.load_lora(args.lora, depth=args.depth)
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                print(f"{info['file']}: {info['format']} LoRA, depth {info['depth']}"
                      f"{' (inferred)' if info['depth_inferred'] else ''}")
                for name, d in info["layers"].items():
                    print(f"  {name:24s} rank {d['rank']:4d} alpha {d['alpha']:g}  file ranks {d['file_ranks']} "
                          f"alphas {[round(a, 6) for a in d['file_alphas']]} ({', '.join(d['alpha_source'])}), "
                          f"{len(d['blocks'])} blocks")
                for note in info["notes"]:
                    print(f"  note: {note}")
    except (lora_io.LoraFormatError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
