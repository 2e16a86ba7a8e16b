"""Run by tests/test_prepare_sharded.py in a subprocess with 8 CPU devices (XLA_FLAGS must be set
before jax is imported): prepares the same clips on one device and on eight, and prints one JSON
line of measurements; the test asserts on them."""

import os
import sys

from simulated import cpu_devices

cpu_devices(8)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the harnesses

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mochi_jax.configs import prepare as prepare_configs  # noqa: E402
from mochi_jax.lib import placement  # noqa: E402
from mochi_jax.lib import preparation as prepare_lib  # noqa: E402
from mochi_jax.demo import clips as synthetic  # noqa: E402
from mochi_jax.lib.cache import Cache  # noqa: E402
from mochi_jax.lib import text as text_lib  # noqa: E402
from mochi_jax.demo import write_demo_models  # noqa: E402

assert len(jax.devices()) == 8
WIDE, NARROW = (48, 128), (48, 80)  # latents 6x16 (the width splits 8 ways) and 6x10 (2 x 2, copies on the rest)


def config(root: Path, clips: Path, out: str, devices: int):
    cfg = prepare_configs.get_config("demo")
    cfg.input_dir, cfg.output_dir = str(clips), str(root / out)
    cfg.vae, cfg.t5, cfg.tokenizer = (str(root / "models" / k) for k in ("vae", "t5", "tokenizer"))
    cfg.buckets, cfg.text_batch_size, cfg.devices = (WIDE, NARROW), 8, devices
    return cfg


@contextlib.contextmanager
def t5_compute(dtype: str):
    """T5 loaded with this compute dtype (the model default is bfloat16, whose roundings depend
    on the shapes of each matmul; float32 shows the sharded program computes the same numbers)."""
    real = text_lib.TextEncoder.load.__func__
    text_lib.TextEncoder.load = classmethod(lambda cls, *a, **k: real(cls, *a, **{**k, "compute_dtype": dtype}))
    try:
        yield
    finally:
        text_lib.TextEncoder.load = classmethod(real)


def run(cfg):
    """prepare(cfg) with its Models kept; returns (models, printed text, seconds)."""
    made = []
    real = prepare_lib.load_models

    def keep(c):
        made.append(real(c))
        return made[-1]

    prepare_lib.load_models = keep
    out = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(out), t5_compute("float32"):
            prepare_lib.prepare(cfg)
    finally:
        prepare_lib.load_models = real
    return made[0], out.getvalue(), time.time() - t0


def rel(a, b):
    return float(np.linalg.norm(np.float64(a) - b) / np.linalg.norm(np.float64(b)))


def main():
    with tempfile.TemporaryDirectory() as tmp:
        return checks(Path(tmp))


def checks(root: Path):
    (root / "models" / "dit").mkdir(parents=True)  # prepare needs no DiT: a placeholder skips its init
    write_demo_models(root / "models")
    clips = root / "clips"
    synthetic.make_clips(clips / "wide", n=2, num_frames=13, size=WIDE, seed=1)
    synthetic.make_clips(clips / "narrow", n=1, num_frames=13, size=NARROW, seed=2)

    one, _, t_one = run(config(root, clips, "one", devices=1))
    many, printed, t_many = run(config(root, clips, "many", devices=-1))
    a, b = Cache(root / "one"), Cache(root / "many")
    out = {"seconds": {"one": t_one, "eight": t_many}, "printed": printed, "one_mesh": one.mesh is None,
           "mesh": {k: int(v) for k, v in many.mesh.shape.items()}, "clips": {}}
    assert [e["name"] for e in a.entries] == [e["name"] for e in b.entries]
    for i, entry in enumerate(a.entries):
        x, y = a[i], b[i]
        out["clips"][entry["name"]] = {
            "shape": list(y["mean"].shape), "mean_rel": rel(y["mean"], x["mean"]),
            "logvar_rel": rel(y["logvar"], x["logvar"]),
            "t5_max_abs": float(np.abs(y["t5_feats"] - x["t5_feats"]).max()),
            "t5_scale": float(np.abs(x["t5_feats"]).max()),
            "mask_equal": bool(np.array_equal(y["t5_mask"], x["t5_mask"]))}
    (fa, ma), (fb, mb) = a.empty_prompt(), b.empty_prompt()
    out["empty_prompt"] = {"t5_max_abs": float(np.abs(fa - fb).max()), "mask_equal": bool(np.array_equal(ma, mb))}

    # T5 weights: FSDP-sharded, each device holds 1/8 of a kernel's model width
    q = many.text.params["blocks"]["attn"]["q"]["kernel"]
    out["t5_kernel"] = {"shape": list(q.shape), "shard": list(q.addressable_shards[0].data.shape),
                        "spec": str(q.sharding.spec), "devices": len(q.sharding.device_set)}
    out["text_batch_spec"] = str(many.text_sharding.spec)
    ids, mask = many.text.tokenizer([""] * 8)
    put = [jax.device_put(v, many.text_sharding) for v in (ids, mask)]
    hlo = many._t5.lower(many.text.params, *put).compile().as_text()
    out["t5_collectives"] = {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo))
                             for op in ("all-gather", "all-reduce", "reduce-scatter")}

    # In bfloat16 (the T5 default): each device's prompt gives bitwise what one device gives for
    # that prompt alone; one device's batch of 8 differs from that by bfloat16 roundings.
    prompts = [p.with_suffix(".txt").read_text() for p in sorted(clips.rglob("*.mp4"))] + ["", "a cat"] * 2
    prompts += ["the quick brown fox"] * (8 - len(prompts))
    c1, c8 = config(root, clips, "unused", devices=1), config(root, clips, "unused", devices=-1)
    with contextlib.redirect_stdout(io.StringIO()):
        bf1, bf8 = prepare_lib.load_models(c1), prepare_lib.load_models(c8)
    f8, m8 = bf8.encode_text(prompts)
    f1, m1 = bf1.encode_text(prompts)
    alone = np.concatenate([bf1.text([p])[0] for p in prompts])
    out["bf16"] = {"compute": bf8.text.cfg.compute_dtype, "vs_alone_max_abs": float(np.abs(f8 - alone).max()),
                   "vs_batch_max_abs": float(np.abs(f8 - f1).max()), "one_device_batch_vs_alone":
                   float(np.abs(f1 - alone).max()), "scale": float(np.abs(f1).max()),
                   "mask_equal": bool(np.array_equal(m8, m1))}
    # VAE weights replicated on every device
    w = many.vae_params["encoder"]["proj_in"]["kernel"]
    out["vae_weight"] = {"spec": str(w.sharding.spec), "devices": len(w.sharding.device_set),
                         "shard_equals_whole": list(w.addressable_shards[0].data.shape) == list(w.shape)}

    # The VAE encode of a clip: its input is split along the width over 8 devices, the compiled
    # program exchanges halos / reduces statistics, and each device's temporaries shrink.
    frames = np.zeros((13, *WIDE, 3), np.uint8)
    pixels = np.moveaxis(frames.astype(np.float32), -1, 0)[None]
    encode, placed = many.encode_call(pixels)
    compiled = encode.lower(many.vae_params, placed, cfg=many.vae_cfg, tiled=False).compile()
    encode1, same = one.encode_call(pixels)
    single = encode1.lower(one.vae_params, same, cfg=one.vae_cfg, tiled=False).compile()
    text = compiled.as_text()
    out["vae_encode"] = {
        "input_spec": str(placed.sharding.spec),
        "input_mesh": {k: int(v) for k, v in placed.sharding.mesh.shape.items()},
        "input_shard": list(placed.addressable_shards[0].data.shape), "one_device_input_is_numpy": same is pixels,
        "output_spec": [str(s.spec) for s in compiled.output_shardings],
        "collectives": {op: len(re.findall(rf"\b{op}(?:-start)?\(", text))
                        for op in ("collective-permute", "all-reduce", "all-gather", "all-to-all")},
        "temp_bytes": {"one": single.memory_analysis().temp_size_in_bytes,
                       "eight": compiled.memory_analysis().temp_size_in_bytes}}
    _, narrow = many.encode_call(np.zeros((1, 3, 13, *NARROW), np.float32))
    out["narrow_input"] = {"spec": str(narrow.sharding.spec),
                           "mesh": {k: int(v) for k, v in narrow.sharding.mesh.shape.items()},
                           "shard": list(narrow.addressable_shards[0].data.shape)}

    # The fit check's programs (placement's builders, given this host's devices) lower to the HLO of
    # Models' own calls on real arrays: the VAE encode split spatially or tiled, the batch-split T5.
    tiled_cfg = config(root, clips, "unused", devices=-1)
    tiled_cfg.tiled = True
    with contextlib.redirect_stdout(io.StringIO()):
        tiled = prepare_lib.load_models(tiled_cfg)
    programs = {}
    for label, m in (("split", many), ("tiled", tiled)):
        for size in (WIDE, NARROW):
            enc, placed = m.encode_call(np.zeros((1, 3, 13, *size), np.float32))
            program = placement.vae_encode_program(m.vae_cfg, jax.local_devices(), (13, *size), m.tiled)
            programs[f"vae {label} {size[0]}x{size[1]}"] = (
                program.fn is enc and program.lower().as_text()
                == enc.lower(m.vae_params, placed, cfg=m.vae_cfg, tiled=m.tiled).as_text())
    fn, args = many.text_call(prompts)
    program = placement.t5_program(many.text.cfg, jax.local_devices(), many.batch, c8.max_length, c8.mesh.to_dict())
    programs["t5"] = program.fn is fn and program.lower().as_text() == fn.lower(*args).as_text()
    out["programs"] = programs
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
