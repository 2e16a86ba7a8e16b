"""Block inputs off the device (mochi_jax/models/remat.py): 'offload:residual' keeps the inputs of every
block (the residual streams the scan keeps for the backward pass) in pinned host memory and computes
exactly what 'full' computes; 'offload:residual_bf16' keeps them in bfloat16 there (the same loss,
gradients close to 'full''s); both through nn.scan, remat groups and weights_on_host, on one device and
on an 8-device mesh (tests/harness/remat_offload_checks.py, in a subprocess), and where the compiled
TPU program puts them; the names, remat='auto''s ladder and the FLOP count know them."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dit_ref
from host_weights import random_like
from mochi_jax.aot import targets as aot_targets
from mochi_jax.lib import flops, training
from mochi_jax.models import lora as lora_lib
from mochi_jax.models import remat
from mochi_jax.models.dit import DiTConfig, MochiDiT, abstract_variables
from remat_offload_checks import max_abs, rel, stacked

ROOT = Path(__file__).resolve().parents[1]
TARGETS = lora_lib.targets_from_config({k: dict(v, rank=4, alpha=8.0) for k, v in lora_lib.REFERENCE_TARGETS.items()})


# ----------------------------------------------------------------------------- names, ladder, FLOPs


def test_names_and_the_one_line_error():
    for name in ("offload:residual", "offload:residual+attn", "save:residual+qkv", "offload:qkv+residual+mlp_out",
                 "offload:residual_bf16", "save:residual_bf16"):
        assert callable(remat.remat_policy(name)), name
    assert "residual" in remat.CHECKPOINT_NAMES
    assert remat.residual_store("offload:residual_bf16") == ("bfloat16", True)
    assert remat.residual_store("save:residual_bf16") == ("bfloat16", False)
    assert [remat.residual_store(n) for n in ("offload:residual", "full", "dots", "save:attn")] == [None] * 4
    # residual_bf16 is a setting of its own (store_inputs, not a policy's name): alone after save: / offload:
    for bad in ("offload:residual_bf16+attn", "offload:residuals", "residual", "offload:", "save:residual_fp8",
                "keep:residual"):
        with pytest.raises(ValueError) as e:
            remat.remat_policy(bad)
        msg = str(e.value)
        assert "\n" not in msg and f"unknown remat policy {bad!r}" in msg and "save:<names>" in msg, msg
        assert "'residual'" in msg and "residual_bf16" in msg, msg
    assert not remat.is_remat_groups("offload:residual") and not remat.is_remat_groups("offload:residual_bf16")
    assert remat.parse_remat_groups("full:1,offload:residual:1,offload:residual_bf16:1", 3) == [
        ("full", 1), ("offload:residual", 1), ("offload:residual_bf16", 1)]
    with pytest.raises(ValueError, match="unknown remat policy 'offload:residual_bf16\\+attn'"):
        remat.parse_remat_groups("offload:residual_bf16+attn:3", 3)


def test_ladder_goes_on_past_full_to_the_block_inputs_on_the_host():
    for attention in ("xla", "cudnn", "splash"):
        ladder = remat.ladder(3, attention)
        i_full, i_off, i_bf16 = (ladder.index((p, "")) for p in ("full", "offload:residual", "offload:residual_bf16"))
        assert i_full < i_off < i_bf16 == len(ladder) - 1, ladder
        # between two rungs, the first k blocks at the one before and the rest at the next
        assert ladder[i_full + 1:i_off] == [("full", "full:2,offload:residual:1"),
                                            ("full", "full:1,offload:residual:2")]
        assert ladder[i_off + 1:i_bf16] == [("full", "offload:residual:2,offload:residual_bf16:1"),
                                            ("full", "offload:residual:1,offload:residual_bf16:2")]
        for r, g in ladder:  # every rung is a setting the model takes
            remat.parse_remat_groups(g, 3) if g else remat.remat_policy(r)
    assert remat.ladder(2, "cudnn")[:7] == [("none", ""), ("full", "none:1,dots:1"), ("dots", ""),
                                            ("full", "dots:1,save:attn:1"), ("save:attn", ""),
                                            ("full", "save:attn:1,full:1"), ("full", "")]

    # choose: while 'full' fits nothing is offloaded (no offload rung even compiled); under its memory the
    # offload rungs, by bisection; under all of them, one line naming 'full' and the last rung
    ladder = remat.ladder(2)
    mem = {s: 100 - 5 * i for i, s in enumerate(ladder)}
    full, off, bf16 = mem[("full", "")], mem[("offload:residual", "")], mem[("offload:residual_bf16", "")]

    def pick(budget):
        c = remat.choose(2, lambda r, g: mem[(r, g)], budget)
        return c.remat, c.groups, c.tried

    for budget in (full, full + 4, 200):
        r, g, tried = pick(budget)
        assert not any("offload" in t[0] + t[1] for t in tried), tried
        assert (r, g) == (("full", "") if budget < full + 5 else ("none", "")), (budget, r, g)
    assert pick(full - 1)[:2] == ("full", "full:1,offload:residual:1")
    assert pick(off)[:2] == ("offload:residual", "") and pick(bf16)[:2] == ("offload:residual_bf16", "")
    assert len(pick(bf16)[2]) <= 4, pick(bf16)[2]  # 'full', the last, then a bisection over the four after 'full'
    with pytest.raises(ValueError) as e:
        remat.choose(2, lambda r, g: mem[(r, g)], bf16 - 1)
    msg = str(e.value)
    assert "even remat 'full' needs" in msg and "'offload:residual_bf16'" in msg and "\n" not in msg, msg


def test_flops_count_the_block_inputs_on_the_host_like_full():
    cfg = DiTConfig()
    for attention in ("xla", "cudnn"):
        full = flops._recompute_share("full", attention)
        assert flops._recompute_share("offload:residual", attention) == full
        assert flops._recompute_share("offload:residual_bf16", attention) == full
        attn = flops._recompute_share("save:attn", attention)
        assert flops._recompute_share("offload:residual+attn", attention) == attn
    base = flops.flop_breakdown(cfg, 163, 480, 848, "full")
    for setting in ("offload:residual", "offload:residual_bf16", "full:20,offload:residual:27"):
        got = flops.flop_breakdown(cfg, 163, 480, 848, setting)
        assert (got["total"], got["recompute"]) == (base["total"], base["recompute"]), setting


# ----------------------------------------------------------------------------- one device


@pytest.fixture(scope="module")
def tiny():
    """A tiny DiT (three stacked blocks), random weights and LoRA (b != 0), a batch and its noise
    (LoRA dropout's key included), and the jitted LoRA loss and gradient of a config."""
    cfg = dataclasses.replace(dit_ref.our_config("h3d8"), remat="full")
    shapes = abstract_variables(cfg, TARGETS)  # drawn on the host: no init to run or compile
    params = random_like(shapes["params"], 1)
    rng = np.random.default_rng(0)
    params["pos_frequencies"] = (0.3 * rng.standard_normal(params["pos_frequencies"].shape)).astype(np.float32)
    lora = jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes["lora"])
    b, t, h, w, L = 2, 2, 4, 6, 8
    mask = np.zeros((b, L), bool)
    mask[0, :3], mask[1, :8] = True, True
    batch = {"mean": rng.standard_normal((b, 12, t, h, w)).astype(np.float32),
             "logvar": rng.uniform(-4.0, -1.0, (b, 12, t, h, w)).astype(np.float32),
             "t5_feats": rng.standard_normal((b, L, cfg.t5_dim)).astype(np.float32), "t5_mask": mask}
    noise = training.draw_noise(jax.random.PRNGKey(7), batch, caption_dropout=0.5)
    inputs = {"x": (b, t * (h // 2) * (w // 2), cfg.width), "y": (b, L, cfg.text_width)}

    def fn(c):  # (lora, params) -> (loss, LoRA gradient): the weights an argument, as in the train step
        return jax.value_and_grad(lambda lo, p: training.flow_loss(MochiDiT(c, TARGETS), p, lo, batch, noise))

    jitted, results = jax.jit(lambda lo, p, c: fn(c)(lo, p), static_argnums=2), {}

    def step(lo, c):  # each config's loss and gradients once per module (the baselines are shared)
        if c not in results:
            results[c] = jitted(lo, params, c)
        return results[c]

    return cfg, params, lora, fn, step, inputs


GROUPS_1_2 = "full:1,full:2"  # 'full' in the scans of the groups below: the same split, the same numbers
CASES = [  # (remat, remat_groups, weights_on_host, where the forward scans keep x, and y: [(blocks, dtype, space)])
    ("full", "", False, [(3, "float32", "device")], [(3, "float32", "device")]),
    ("offload:residual", "", False, [(3, "float32", "host")], [(3, "float32", "host")]),
    ("offload:residual+attn", "", False, [(3, "float32", "host")], [(3, "float32", "host")]),
    ("full", "full:1,offload:residual:2", False, [(1, "float32", "device"), (2, "float32", "host")],
     [(1, "float32", "device"), (2, "float32", "host")]),
    ("offload:residual", "", True, [(3, "float32", "host")], [(3, "float32", "host")]),  # the model's own lax.scan
    ("offload:residual_bf16", "", False, [(3, "bfloat16", "host")], [(3, "float32", "host")]),
    ("full", "offload:residual:1,save:residual_bf16:2", False, [(1, "float32", "host"), (2, "bfloat16", "device")],
     [(1, "float32", "host"), (2, "float32", "device")]),
]


def test_the_gradient_keeps_the_block_inputs_where_the_setting_says(tiny):
    """The LoRA gradient's jaxpr (traced, not compiled): what the forward scans over the blocks stack for
    the backward pass of the visual (x) and text (y) streams' block inputs, and where. 'full' keeps them
    on the device; 'offload:residual' (alone, with the attention, in a group, with weights_on_host) keeps
    only host arrays; 'offload:residual_bf16' the visual stream's in bfloat16 ('save:' on the device), and
    the custom_vjp behind it no copy of the stacked weights per block."""
    cfg, params, lora, fn, _, shapes = tiny
    weights = [leaf.shape[1:] for leaf in jax.tree_util.tree_leaves(params["blocks"])]
    for remat_, groups, on_host, x, y in CASES:
        c = dataclasses.replace(cfg, remat=remat_, remat_groups=groups, weights_on_host=on_host)
        jaxpr = jax.make_jaxpr(fn(c))(lora, params)
        assert (stacked(jaxpr, shapes["x"]), stacked(jaxpr, shapes["y"])) == (x, y), (remat_, groups, on_host)
        assert not [w for w in weights if stacked(jaxpr, w)], (remat_, groups)


@pytest.mark.slow
def test_offloaded_equals_full_on_one_device(tiny):
    """'offload:residual' alone and with the attention (nn.scan), in remat groups and with weights_on_host
    (the model's own lax.scan): the loss and LoRA gradients of 'full' in the same scans (nn.scan; the same
    groups; one lax.scan) bit for bit, and within 1e-6 of nn.scan's 'full' across them."""
    cfg, _, lora, _, step, _ = tiny
    v_full, g_full = step(lora, cfg)
    for remat_, groups, on_host, same in [("offload:residual", "", False, ""),
                                          ("offload:residual+attn", "", False, ""),
                                          ("full", "full:1,offload:residual:2", False, GROUPS_1_2),
                                          ("offload:residual", "", True, "full:3")]:
        loss, grads = step(lora, dataclasses.replace(cfg, remat=remat_, remat_groups=groups, weights_on_host=on_host))
        v, g = step(lora, dataclasses.replace(cfg, remat_groups=same))
        assert float(loss) == float(v) and max_abs(grads, g) == 0.0, (remat_, groups, float(loss) - float(v))
        assert abs(float(loss) - float(v_full)) <= 1e-6 * abs(float(v_full)), (remat_, groups)
        assert rel(grads, g_full) < 1e-6, (remat_, groups, rel(grads, g_full))


@pytest.mark.slow
def test_bf16_block_inputs_keep_the_loss_and_nearly_the_gradients(tiny):
    """'offload:residual_bf16' (the stacked blocks through remat.store_inputs) and a group of
    'save:residual_bf16' next to 'offload:residual': the forward is the model's, so the loss is that of
    'full' in the same scans exactly; the LoRA gradients come from the visual stream's inputs rounded to
    bfloat16: close to 'full''s, not equal."""
    cfg, _, lora, _, step, _ = tiny
    v_full, g_full = step(lora, cfg)
    for remat_, groups, same in [("offload:residual_bf16", "", "full:3"),
                                 ("full", "offload:residual:1,save:residual_bf16:2", GROUPS_1_2)]:
        loss, grads = step(lora, dataclasses.replace(cfg, remat=remat_, remat_groups=groups))
        lora_rel = rel(grads, g_full)
        print(f"{remat_} {groups}: loss {float(loss)!r} ('full' {float(v_full)!r}), LoRA gradient relative L2 "
              f"difference {lora_rel:.2e}, largest element difference {max_abs(grads, g_full):.2e}")
        assert float(loss) == float(step(lora, dataclasses.replace(cfg, remat_groups=same))[0]), (remat_, groups)
        assert abs(float(loss) - float(v_full)) <= 1e-6 * abs(float(v_full)), (remat_, groups)
        assert 1e-5 < lora_rel < 2e-2, (remat_, groups, lora_rel)


@pytest.mark.slow
def test_bf16_block_inputs_give_differentiated_weights_their_gradients(tiny):
    """remat.store_inputs gives cotangents to what the outer gradient perturbs: with the weights
    differentiated too (not only the LoRA, as in training), theirs are close to 'full''s."""
    cfg, params, lora, _, _, _ = tiny
    inp = dit_ref.random_inputs(cfg)

    def loss(p, lo, c):
        return jnp.mean(MochiDiT(c, TARGETS).apply({"params": p, "lora": lo}, *inp) ** 2)

    both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    v0, (gp0, gl0) = both(params, lora, cfg)
    v1, (gp1, gl1) = both(params, lora, dataclasses.replace(cfg, remat="offload:residual_bf16"))
    assert abs(float(v1) - float(v0)) <= 1e-6 * abs(float(v0))
    for name, a, b in (("weights", gp1, gp0), ("stacked blocks' weights", gp1["blocks"], gp0["blocks"]),
                       ("LoRA", gl1, gl0)):
        assert 1e-5 < rel(a, b) < 3e-2, (name, rel(a, b))


# ----------------------------------------------------------------------------- subprocesses


def _harness(mode: str, timeout: int) -> dict:
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "harness" / "remat_offload_checks.py"), mode],
                       capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "harness")])))
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads(line[0][len("RESULT "):])


@pytest.mark.slow
def test_offloaded_equals_full_on_an_8_device_mesh():
    """data 2 x fsdp 2 x sequence 2: the same loss and LoRA gradients as 'full' (bit for bit in nn.scan,
    allclose through remat groups), the block inputs kept in host memory; bfloat16 inputs: the same
    loss, gradients within a few 1e-3."""
    r = _harness("mesh", 300)
    full = r["full"]
    assert full["kept"] == {"x": [[3, "float32", "device"]], "y": [[3, "float32", "device"]]}, full
    off, grp, bf16 = r["offload"], r["groups"], r["bf16"]
    assert off["kept"] == {"x": [[3, "float32", "host"]], "y": [[3, "float32", "host"]]}, off
    assert off["loss"] == full["loss"] and off["grad_max_abs"] == 0.0, off
    assert grp["kept"] == {"x": [[1, "float32", "device"], [2, "float32", "host"]],
                           "y": [[1, "float32", "device"], [2, "float32", "host"]]}, grp
    assert abs(grp["loss"] - full["loss"]) <= 1e-6 * abs(full["loss"]) and grp["grad_rel"] < 1e-6, grp
    assert bf16["kept"] == {"x": [[3, "bfloat16", "host"]], "y": [[3, "float32", "host"]]}, bf16
    assert bf16["loss"] == full["loss"] and 1e-5 < bf16["grad_rel"] < 2e-2, bf16
    print(f"8 devices, bfloat16 block inputs: LoRA gradient relative difference {bf16['grad_rel']:.2e}")


@pytest.mark.slow
@pytest.mark.skipif(not aot_targets.have_compiler("tpu"), reason="libtpu is not installed (pip install -e '.[test]')")
def test_the_compiled_program_keeps_the_block_inputs_in_host_memory():
    """The tiny DiT's LoRA gradient compiled for a TPU v5e on this CPU (XLA's CPU backend drops memory
    spaces: a device_put to the host compiles to nothing there): under 'full' the stacked block inputs
    [blocks, B, N, width] are device buffers and nothing is in host memory; under 'offload:residual'
    (nn.scan, and the offloaded group of 'full:2,offload:residual:2') they are host buffers (S(5))
    and the host temporaries hold them; 'offload:residual_bf16' keeps them in bfloat16 there, in less."""
    r = _harness("tpu", 300)
    n, stack = r["blocks"], r["tokens"] * r["width"]  # per batch element and block
    full, off, bf16, grp = r["full"], r["offload"], r["bf16"], r["groups"]
    print({k: {f: r[k][f] for f in ("temp", "host_temp", "host_buffers", "stacked", "seconds")}
           for k in ("full", "offload", "bf16", "groups")})
    assert full["host_temp"] == 0 and full["host_buffers"] == 0 and full["stacked"] == {f"f32[{n}]": ["device"]}, full
    assert off["stacked"] == {f"f32[{n}]": ["host"]}, off
    assert off["host_temp"] >= n * stack * 4, off
    assert bf16["stacked"] == {f"bf16[{n}]": ["host"]}, bf16
    assert n * stack * 2 <= bf16["host_temp"] < off["host_temp"], (bf16, off)
    assert grp["stacked"] == {"f32[2]": ["device", "host"]}, grp  # one group's stack on each side
    assert grp["host_temp"] >= 2 * stack * 4, grp
