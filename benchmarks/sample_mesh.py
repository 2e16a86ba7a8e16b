"""The sharded sampler's overhead on the host CPU: seconds per denoising step of `sampling.denoise` on one
device and on meshes of 8 simulated CPU devices (XLA's host platform split 8 ways), same small random
DiT, same latents and prompt, same run.

    python benchmarks/sample_mesh.py [--steps 4] [--repeats 3] [--frames 25] [--height 128] [--width 192] [--out FILE]
    python benchmarks/sample_mesh.py --smoke --out /tmp/sample_mesh.json   # 1 step, 1 repeat, tiny (the test)

The simulated devices share the machine's cores, so a mesh cannot be faster here: the ratio to one
device is the cost of the partitioned program (collectives, all-to-alls, smaller kernels) on CPU, not
a speed-up a real mesh would see (there each device has its own chip). Each mesh's final latents are
compared with one device's (relative max error). Float32, guidance 6 (DiT batch 2), one video.
Writes benchmarks/results/sample_mesh.json (--out; --smoke: a temporary folder unless --out is given).
"""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # from any directory: the checkout's package
from mochi_jax.demo import random_like  # noqa: E402
from mochi_jax.lib import sampling  # noqa: E402
from mochi_jax.models.dit import DiTConfig, abstract_variables  # noqa: E402
from mochi_jax.models.sharding import make_mesh  # noqa: E402

BENCH = dict(depth=4, num_heads=8, head_dim=32, text_width=64, t5_dim=64, time_embed_dim=64)
MESHES = {"one device": None, "data 2": dict(data=2), "fsdp 8": dict(fsdp=8), "data 2 x fsdp 4": dict(data=2, fsdp=4),
          "fsdp 2 x sequence 4": dict(fsdp=2, sequence=4),
          "data 2 x tensor 2 x sequence 2": dict(data=2, tensor=2, sequence=2)}
SMOKE = dict(steps=1, repeats=1, frames=7, height=32, width=32, meshes=["one device", "fsdp 2 x sequence 4"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--meshes", type=lambda s: s.split(","), default=list(MESHES))
    ap.add_argument("--out", help="the JSON file (default benchmarks/results/sample_mesh.json)")
    ap.add_argument("--smoke", action="store_true", help=f"the smallest run, {SMOKE}, to check that it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        for k, v in SMOKE.items():
            setattr(args, k, v)
    out = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="sample_mesh_")) / "sample_mesh.json" if args.smoke
        else ROOT / "benchmarks" / "results" / "sample_mesh.json")

    cfg = DiTConfig(**BENCH, param_dtype="float32", compute_dtype="float32")
    host = jax.device_get(random_like(abstract_variables(cfg)["params"], jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((2, 32, cfg.t5_dim)).astype(np.float32)
    mask = np.zeros((2, 32), bool)
    mask[0, :12], mask[1, :1] = True, True
    cond, uncond = (feats[:1], mask[:1]), (feats[1:], mask[1:])
    latent = sampling.latent_shape(args.frames, args.height, args.width)
    noise = sampling.initial_noise([0], latent)
    sigmas = sampling.sigma_schedule(max(args.steps, 2))[:args.steps + 1]

    rows, ref = {}, None
    for name in args.meshes:
        sizes = MESHES[name]
        if sizes is None:
            params = jax.device_put(host, jax.devices()[0])
        else:
            mesh = make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
            params = jax.device_put(host, sampling.placement(cfg, (), mesh).params)

        def render():
            return np.asarray(sampling.to_host(sampling.denoise(cfg, params, noise, cond, uncond, sigmas, 6.0)))

        z = render()  # compiles
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            render()
            times.append((time.perf_counter() - t) / args.steps)
        ref = z if ref is None else ref
        rows[name] = {"step_s": statistics.median(times), "times_s": times,
                      "rel_err": float(np.abs(z - ref).max() / np.abs(ref).max())}
    base = rows[args.meshes[0]]["step_s"]
    for name, r in rows.items():
        r["x_first"] = r["step_s"] / base
        print(f"{name:32} {r['step_s'] * 1e3:9.1f} ms/step  x{r['x_first']:5.2f} vs {args.meshes[0]}  "
              f"rel err {r['rel_err']:.1e}", flush=True)
    result = {"model": BENCH, "frames": args.frames, "size": [args.height, args.width], "latent": list(latent),
              "steps": args.steps, "repeats": args.repeats, "guidance": 6.0, "meshes": rows,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "jax": jax.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
