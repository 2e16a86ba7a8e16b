"""Converted DiT weights restore straight into shardings on a multi-device mesh (8 CPU devices)."""

import subprocess
import sys
import textwrap
from pathlib import Path

from dit_ref import make_reference, our_config, write_both_layouts
from mochi_jax import checkpoints as convert

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from mochi_jax.checkpoints import load_dit, load_tree
    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    _, host = load_dit(sys.argv[1])
    # FSDP: shard the last axis of every matrix over 'fsdp' (and the layer axis of stacked ones stays whole)
    def spec(x):
        if x.ndim >= 2 and x.shape[-1] % 4 == 0:
            return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "fsdp"))
        return NamedSharding(mesh, P())
    shardings = jax.tree_util.tree_map(spec, host)
    cfg, params = load_dit(sys.argv[1], shardings=shardings)
    kernel = params["blocks"]["attn"]["qkv_x"]["kernel"]
    assert kernel.sharding == shardings["blocks"]["attn"]["qkv_x"]["kernel"], kernel.sharding
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0], kernel.shape[1], kernel.shape[2] // 4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, host)
    print("OK", kernel.shape)
""")


def test_load_into_fsdp_shardings(tmp_path):
    cfg = our_config("h2d16")
    _, genmo = write_both_layouts(make_reference(cfg, seed=2), tmp_path)
    out, _ = convert.convert_dit(genmo, tmp_path / "ours", dtype="float32", progress=False)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
