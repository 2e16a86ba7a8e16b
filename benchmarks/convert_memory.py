"""Peak host memory of a DiT conversion: near one (stacked) tensor, not one model.

    python benchmarks/convert_memory.py [--depth 24] [--heads 8] [--workdir /tmp/convmem] [--out FILE]
    python benchmarks/convert_memory.py --smoke --out /tmp/convert_memory.json   # a 2-block, 2-head checkpoint (the test)

Generates a random genmo-layout dit.safetensors of a few GB (in a separate process), converts it
to bfloat16 in a fresh process and reports that process's peak resident memory against the
checkpoint size, the largest source tensor and the converter's write batch (64 MiB), and the
peak of a process that only imports the converter (the baseline). Writes benchmarks/results/convert_memory.json
(--out; --smoke: a temporary folder unless --out is given).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's package, from any directory (and in the child processes below)
PRELUDE = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
SMOKE = dict(depth=2, heads=2)  # --smoke: a checkpoint of a few MB, to check that it runs
GEN = PRELUDE + r"""
import sys, numpy as np, torch
from safetensors.torch import save_file
from mochi_jax.checkpoints.dit import genmo_shapes
from mochi_jax.models.dit import DiTConfig
cfg = DiTConfig(depth=int(sys.argv[2]), num_heads=int(sys.argv[3]), head_dim=128, text_width=512, t5_dim=1024)
g = torch.Generator().manual_seed(0)
save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in genmo_shapes(cfg).items()}, sys.argv[1])
"""

CONVERT = PRELUDE + r"""
import resource, sys, time
from mochi_jax import checkpoints as convert
t = time.time()
if sys.argv[1] != "-":
    convert.convert_dit(sys.argv[1], sys.argv[2], dtype="bfloat16", progress=False)
print(time.time() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/mochi_convert_memory")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and its conversion")
    ap.add_argument("--out", help="the JSON file (default benchmarks/results/convert_memory.json)")
    ap.add_argument("--smoke", action="store_true", help=f"the smallest run, {SMOKE}, to check that it runs")
    args = ap.parse_args(argv)
    if args.smoke:  # the smoke sizes as defaults: flags given explicitly still win
        ap.set_defaults(**SMOKE)
        args = ap.parse_args(argv)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "dit.safetensors"
    subprocess.run([sys.executable, "-c", GEN, str(src), str(args.depth), str(args.heads)], check=True)

    from mochi_jax.checkpoints import dit as dit_conv
    from mochi_jax.checkpoints.safetensors_io import TensorSource

    s = TensorSource(src)
    cfg = dit_conv.check(s, "genmo")
    biggest_src = max(4 * int(__import__("numpy").prod(s.shape(k))) for k in s.keys())
    biggest_leaf = max(2 * int(__import__("numpy").prod(leaf.shape)) for leaf in dit_conv.plan(cfg, "genmo"))

    def run(*argv):
        out = subprocess.run([sys.executable, "-c", CONVERT, *argv], check=True, capture_output=True, text=True)
        secs, rss = out.stdout.split()
        return float(secs), int(rss)

    _, base = run("-", "-")
    secs, peak = run(str(src), str(work / "out"))
    gib = 1024 ** 3
    res = dict(depth=cfg.depth, width=cfg.width, checkpoint_bytes=src.stat().st_size, largest_source_tensor_bytes=biggest_src,
               largest_output_leaf_bytes_bf16=biggest_leaf, write_batch_bytes=64 * 2 ** 20, baseline_peak_rss_bytes=base, convert_peak_rss_bytes=peak,
               convert_seconds=secs)
    print(f"source checkpoint      {src.stat().st_size / gib:7.2f} GiB (float32, depth {cfg.depth}, width {cfg.width})")
    print(f"largest source tensor  {biggest_src / gib:7.3f} GiB; largest output leaf (bf16) {biggest_leaf / gib:.3f} GiB; "
          f"write batch 0.0625 GiB")
    print(f"peak RSS: imports only {base / gib:6.2f} GiB; conversion {peak / gib:6.2f} GiB "
          f"(+{(peak - base) / gib:.2f} GiB over the imports = {(peak - base) / src.stat().st_size:.1%} of the "
          f"checkpoint) in {secs:.1f} s")
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "convert_memory_smoke.json" if args.smoke
                                           else ROOT / "benchmarks" / "results" / "convert_memory.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
