#!/usr/bin/env python
"""Mochi LoRA files: convert between genmo/ComfyUI and diffusers naming, merge into a checkpoint, inspect.

    python tools/lora.py convert SRC OUT --to genmo|diffusers [--depth N] [--text-width N] [--dtype float32|bfloat16]
    python tools/lora.py merge BASE_DIR LORA OUT [--strength S] [--unmerge] [--format orbax|genmo] [--overwrite]
    python tools/lora.py info LORA [--depth N] [--json]

SRC / LORA: a .safetensors LoRA in genmo/ComfyUI (`blocks.N.attn.qkv_x.lora_A`, optional
`diffusion_model.` prefix), kohya (`lora_unet_blocks_N_...lora_down.weight`) or diffusers
(`transformer.transformer_blocks.N.attn1.to_q.lora_A.weight`) naming, detected from the keys;
SRC may also be a training run directory (the LoRA of its newest complete checkpoint) or one of
its checkpoints, <run>/checkpoints/<step>. The trainer also writes a file pair per checkpoint in
<run>/loras/; `info` shows what such a file says about itself (base model, step, targets, lr).
--to genmo writes the file ComfyUI and genmo's loader read identically; --to diffusers the one
`MochiPipeline.load_lora_weights` reads (diffusers 0.32 and later, exactly: one rank for every
adapter). Neither tool reads the other's naming, so ship both. Adapters that are zero in every
block (a genmo file's zero partners, zero padding) are left out.
--depth: the model's number of blocks (Mochi 1: 48). Without it the file must show which block is
the last (a last-block-only module, the last block's smaller mod_y, the last block lacking the
text-stream layers every other block has, or block 47 of Mochi 1); otherwise the command asks for
it, because writing a LoRA of the first N blocks as if block N-1 were the last would put it under
the last block's names.
--text-width: the model's text stream width (Mochi 1: 1536), for --to genmo of a LoRA that adapts
no text-stream layer (genmo's loader expects zero qkv_y / proj_y adapters of that width); without
it the file must show it (a text-stream layer, mod_y, a genmo file's zero partners).
BASE_DIR: a checkpoint written by tools/convert_weights.py. merge writes OUT in its dtype: with
--format orbax (default) a checkpoint folder mochi_jax.checkpoints.load_dit reads; with --format
genmo one safetensors file with genmo's dit.safetensors key names, which ComfyUI loads.
Exit status 2 for anything the user can fix (the message names the file, and every bad key).
"""

import argparse
import json
import sys
from pathlib import Path

from mochi_jax import cli
from mochi_jax.checkpoints import lora_read, lora_write
from mochi_jax.checkpoints.runs import load_run_lora
from mochi_jax.lib import placement

NAME = "tools/lora.py"


def _scale_text(d: dict) -> str:
    """How the file's scale is read, in words (`info`)."""
    sources = ", ".join(d["alpha_source"])
    if d["scale_folded_into_b"]:
        return (f"scale 1: the file's scales (ranks {d['file_ranks']}, alphas "
                f"{[round(a, 6) for a in d['file_alphas']]} from {sources}) differ between blocks and are folded "
                f"into b on reading")
    if d["alpha"] == d["rank"]:
        return (f"alpha {d['alpha']:g} = rank, scale 1 ({sources}): any alpha/rank of the training is already folded "
                f"into lora_B, so the trained alpha cannot be read from the file")
    return f"alpha {d['alpha']:g}, scale {d['alpha'] / d['rank']:g} ({sources})"


def info(path, depth) -> tuple[dict, str]:
    """(load_lora's info, the depth in words) of a LoRA file."""
    try:
        _, _, about = lora_read.load_lora(path, depth=depth)
        depth_text = f"depth {about['depth']}" + (" (inferred)" if about["depth_inferred"] else "")
    except lora_read.DepthUnknown as e:  # show the file anyway, with its highest block not taken as the last
        _, _, about = lora_read.load_lora(path, depth=e.highest + 2)
        depth_text = f"depth unknown (blocks up to {e.highest}; pass --depth to read it against a model)"
    return about, depth_text


def parser() -> argparse.ArgumentParser:
    """The command line (tests/test_docs.py parses the documentation's commands with it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="rewrite a LoRA file (or a training run's LoRA) in genmo or diffusers naming")
    c.add_argument("src", help="a LoRA .safetensors file, a training run directory or <run>/checkpoints/<step>")
    c.add_argument("out")
    c.add_argument("--to", required=True, choices=["genmo", "diffusers"])
    c.add_argument("--depth", type=int, default=None, help="number of DiT blocks (Mochi 1: 48)")
    c.add_argument("--text-width", type=int, default=None,
                   help="width of the text stream, for --to genmo when the file does not show it (Mochi 1: 1536)")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m = sub.add_parser("merge", help="fold a LoRA into a converted checkpoint")
    m.add_argument("base_dir")
    m.add_argument("lora")
    m.add_argument("out")
    m.add_argument("--strength", type=float, default=1.0)
    m.add_argument("--unmerge", action="store_true", help="remove a previously merged LoRA instead")
    m.add_argument("--format", default="orbax", choices=["orbax", "genmo"],
                   help="orbax: a checkpoint folder for mochi_jax; genmo: one dit.safetensors-style file (ComfyUI)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output")
    i = sub.add_parser("info", help="print a LoRA file's format, ranks, alphas and layers")
    i.add_argument("lora")
    i.add_argument("--depth", type=int, default=None)
    i.add_argument("--json", action="store_true", help="print the info as JSON")
    return ap


def main(argv=None):
    args = parser().parse_args(argv)

    try:
        placement.start()  # the devices up, without libtpu's search for TPU chips on a machine with none
        if args.cmd == "convert":
            src = Path(args.src)
            if src.is_dir():
                tree, targets = load_run_lora(src)
                depth, origin, dropped, text_width = args.depth, f"training run {src}", [], args.text_width
            else:
                tree, targets, about = lora_read.load_lora(src, depth=args.depth)
                depth, origin, dropped = about["depth"], f"{about['format']} {src}", about["zero_layers"]
                text_width = args.text_width or about["text_width"]
            if args.to == "genmo":
                out = lora_write.save_genmo(args.out, tree, targets, depth=depth, dtype=args.dtype,
                                            text_width=text_width)
            else:
                out = lora_write.save_diffusers(args.out, tree, targets, depth=depth, dtype=args.dtype)
            print(f"wrote {out}: {args.to} LoRA, {len(targets)} layer groups"
                  + (f", depth {depth}" if depth else "") + f" (from {origin})"
                  + (f"; left out all-zero {', '.join(dropped)}" if dropped else ""))
        elif args.cmd == "merge":
            out, _ = lora_write.merge_checkpoint(args.base_dir, args.lora, args.out, args.strength, args.unmerge,
                                                 overwrite=args.overwrite, format=args.format)
            print(f"wrote {out}: {args.base_dir} {'minus' if args.unmerge else 'plus'} "
                  f"{args.strength} x {args.lora} ({args.format} layout)")
        else:
            about, depth_text = info(args.lora, args.depth)
            if args.json:
                print(json.dumps(about, indent=1))
            else:
                print(f"{about['file']}: {about['format']} LoRA, {depth_text}")
                trained = about["about"]
                if trained:
                    print(f"  trained by {trained.get('project', '?')}: step {trained.get('step')} of run "
                          f"{trained.get('run')!r} on {trained.get('base_model')}, lr {trained.get('lr')}, "
                          f"seed {trained.get('seed')}, {trained.get('clips')} clips")
                for name, d in about["layers"].items():
                    extra = "".join([f", {len(d['zero_blocks'])} all-zero blocks left out" if d["zero_blocks"] else "",
                                     f", {d['zero_rank_dropped']} all-zero rank components left out"
                                     if d["zero_rank_dropped"] else ""])
                    print(f"  {name:24s} rank {d['rank']:4d}, {len(d['blocks'])} blocks{extra}; {_scale_text(d)}")
                if about["zero_layers"]:
                    print(f"  all-zero in every block (left out): {', '.join(about['zero_layers'])}")
                for note in about["notes"]:
                    print(f"  note: {note}")
    except Exception as e:  # noqa: BLE001 - user errors: one line and exit status 2; bugs keep their traceback
        return cli.fail(NAME, e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
