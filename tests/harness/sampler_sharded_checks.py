"""Run by tests/test_sampler_sharded.py in a subprocess with 8 CPU devices (XLA_FLAGS must be set
before jax is imported): the sampler (lib/sampling.py `denoise`, and lib/variants.py for several
LoRAs) on device meshes against one device, where the weights sit, what the step compiles, and
that the fit check's program (`sampler_program`) lowers to what `denoise` runs. Prints one JSON
line of measurements; the test asserts on them."""

import sys

from simulated import cpu_devices

cpu_devices(8)

import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from compiles import compiled_functions  # noqa: E402
from host_weights import random_like  # noqa: E402
from mochi_jax.configs.common import DEMO_VAE  # noqa: E402
from mochi_jax.lib import sampling  # noqa: E402
from mochi_jax.lib import variants as variants_lib  # noqa: E402
from mochi_jax.models import lora as lora_lib  # noqa: E402
from mochi_jax.models import vae as vae_lib  # noqa: E402
from mochi_jax.models.dit import DiTConfig, abstract_variables  # noqa: E402
from mochi_jax.models.sharding import make_mesh  # noqa: E402
from mochi_jax.models.vae import VAEConfig  # noqa: E402

assert len(jax.devices()) == 8
# 8 heads, so that sequence 4 x tensor 2 (and fsdp 8 over the tokens) divide them
CFG = DiTConfig(depth=3, num_heads=8, head_dim=8, text_width=24, t5_dim=16, time_embed_dim=32,
                param_dtype="float32", compute_dtype="float32")
TARGETS = lora_lib.targets_from_config(
    {k: dict(v, rank=4, alpha=8.0) for k, v in lora_lib.REFERENCE_TARGETS.items()})
# a second LoRA of another rank on fewer layers (the stack pads it)
TARGETS_B = lora_lib.targets_from_config({"qkv": dict(lora_lib.REFERENCE_TARGETS["qkv"], rank=2, alpha=4.0)})
MESHES = {"data8": dict(data=8), "fsdp8": dict(fsdp=8), "fsdp2_seq4": dict(fsdp=2, sequence=4),
          "data2_tensor2_seq2": dict(data=2, tensor=2, sequence=2), "data2_fsdp4": dict(data=2, fsdp=4)}
# 2 videos (4 DiT rows with guidance) on every mesh; batch invariance (seed 5 alone vs in a batch of 2)
# where the tokens are split (data8) and where the batch is (data2_tensor2_seq2: data splits the rows);
# 4 videos on data8: its 8 rows split over 'data' (1 and 2 videos split the tokens there instead)
BATCHES = {"data8": (1, 2, 4), "data2_tensor2_seq2": (1, 2)}
SEEDS = [5, 6, 7, 8]
FRAMES, H, W = 13, 32, 48  # latent [12, 3, 4, 6]: 18 visual tokens (split unevenly by 4 and 8)
LATENT = sampling.latent_shape(FRAMES, H, W)
L = 8  # T5 tokens
SIGMAS = sampling.sigma_schedule(3)
GUIDANCE = 4.5
# weights whose split is reported (the big kernels, stacked over the scanned blocks, and one unstacked)
WEIGHTS = ("blocks/attn/qkv_x/kernel", "blocks/attn/proj_x/kernel", "blocks/mlp_x/w1/kernel",
           "blocks/mlp_x/w2/kernel", "blocks/mod_x/kernel", "last_block/mlp_x/w1/kernel")


def params():
    """Random DiT weights, as numpy."""
    shapes = abstract_variables(CFG)["params"]
    p = random_like(shapes, 3)
    p["pos_frequencies"] = (0.3 * np.random.default_rng(4).standard_normal(shapes["pos_frequencies"].shape)
                            ).astype(np.float32)
    return p


def lora_factors(targets, seed, scale=0.5):
    """Random non-zero a AND b factors (so the LoRA changes the output), as numpy."""
    shapes = abstract_variables(CFG, targets)["lora"]
    tree = random_like(shapes, seed)
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32) * np.float32(scale), tree)


def text(seed):
    """(cond, uncond) for up to 4 videos: features [4, L, D], masks with different padding per row."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((2, 4, L, CFG.t5_dim)).astype(np.float32)
    mask = np.zeros((2, 4, L), bool)
    for i in range(4):
        mask[0, i, :1 + i % 2] = True  # negative prompts: short, different
        mask[1, i, :3 + i] = True
    return (feats[1], mask[1]), (feats[0], mask[0])


def first(pair, b):
    return pair[0][:b], pair[1][:b]


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def get(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def fraction(x):
    return float(np.prod(x.sharding.shard_shape(x.shape)) / np.prod(x.shape))


def spec_axes(x):
    """The mesh axes each dimension of `x` is split over, e.g. [[], ['fsdp'], ['tensor']]."""
    out = []
    for e in tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec)):
        out.append([] if e is None else [e] if isinstance(e, str) else list(e))
    return out


def progress(what):
    """A marker on stderr, so that XLA's warnings there can be told apart by mesh."""
    print(f"[sampler_sharded_checks] {what}", file=sys.stderr, flush=True)


def count(names, fn="jitted_step"):
    return sum(fn in n for n in names)


def denoise(p, b, cond, uncond, lora, seeds=SEEDS, **kw):
    noise = sampling.initial_noise(seeds[:b], LATENT)
    return sampling.denoise(CFG, p, noise, first(cond, b), first(uncond, b), SIGMAS, GUIDANCE, lora=lora, **kw)


def recording(name):
    """Replace sampling.<name> by a recorder that lowers each call where denoise makes it; returns
    (the lowered texts, a function that restores the real one)."""
    real, calls = getattr(sampling, name), []

    def record(*args, **kwargs):
        calls.append(real.lower(*args, **kwargs).as_text())
        return real(*args, **kwargs)

    setattr(sampling, name, record)
    return calls, lambda: setattr(sampling, name, real)


def main():
    t0 = time.time()
    out = {"errors": {}}
    host = params()  # numpy: placed on each mesh from the host (a jax array would be sliced by programs per leaf)
    hp = jax.device_put(host)  # one device, uncommitted
    fa = lora_factors(TARGETS, 11)
    fb = lora_factors(TARGETS_B, 12)
    cond, uncond = text(0)

    # ------------------------------------------------------------------ one device (no mesh)
    ref = {}
    for b in (1, 2, 4):
        ref[b] = np.asarray(denoise(hp, b, cond, uncond, (fa, TARGETS)))
    base_alone = np.asarray(denoise(hp, 2, cond, uncond, None))
    b_alone = np.asarray(denoise(hp, 2, cond, uncond, (fb, TARGETS_B)))
    noise2 = np.asarray(sampling.initial_noise(SEEDS[:2], LATENT))
    out["single"] = {"batch_invariance": rel(ref[2][0], ref[1][0]), "lora_effect": rel(ref[2], base_alone),
                     "lora_b_effect": rel(b_alone, base_alone), "moved": rel(ref[2], noise2),
                     "seconds": time.time() - t0}

    # ------------------------------------------------------------------ meshes
    for name, sizes in MESHES.items():
        t1 = time.time()
        progress(name)
        r = out[name] = {"rel": {}, "compiles": {}, "replicated": {}, "on_mesh": {}}
        try:
            mesh = make_mesh(sizes)
            place = sampling.placement(CFG, TARGETS, mesh)
            p = jax.device_put(host, place.params)
            f = jax.device_put(fa, place.lora)
            r["weights"] = {w: {"axes": spec_axes(get(p, w)), "fraction": fraction(get(p, w))} for w in WEIGHTS}
            r["lora"] = {ab: {"axes": spec_axes(f["blocks"]["attn"]["qkv_x"][ab]),
                              "fraction": fraction(f["blocks"]["attn"]["qkv_x"][ab])} for ab in ("a", "b")}
            leaves = jax.tree_util.tree_leaves(p)
            r["params_fraction"] = (sum(int(np.prod(x.sharding.shard_shape(x.shape))) for x in leaves)
                                    / sum(int(np.prod(x.shape)) for x in leaves))
            got = {}
            for b in BATCHES.get(name, (2,)):
                with compiled_functions() as names:
                    z = denoise(p, b, cond, uncond, (f, TARGETS))
                    z.block_until_ready()
                got[b] = np.asarray(z)
                r["rel"][b] = rel(got[b], ref[b])
                r["compiles"][b] = count(names)
                r["replicated"][b] = bool(z.sharding.is_fully_replicated and z.is_fully_addressable)
                r["on_mesh"][b] = bool(getattr(z.sharding, "mesh", None) == mesh)
            if 1 in got:
                r["batch_invariance"] = rel(got[2][0], got[1][0])
            # new seeds, prompts, guidance and schedule values of the same shapes: nothing compiles
            other = (cond[0] + 1.0, cond[1])
            with compiled_functions() as names:
                noise = sampling.initial_noise([21, 22], LATENT)
                sampling.denoise(CFG, p, noise, first(other, 2), first(uncond, 2), SIGMAS * 0.9, 6.0,
                                 lora=(jax.device_put(jax.tree_util.tree_map(lambda x: x * 2, fa), place.lora),
                                       TARGETS)).block_until_ready()
            r["recompiles_new_values"] = count(names)
        except Exception:  # noqa: BLE001
            out["errors"][name] = traceback.format_exc()
        r["seconds"] = time.time() - t1

    # ------------------------------------------------------------------ variants: base + two LoRAs stacked
    t1 = time.time()
    progress("variants")
    v = out["variants"] = {}
    try:
        vs = [variants_lib.Variant("base")]
        for nm, tree, targets in (("a", fa, TARGETS), ("b", fb, TARGETS_B)):
            combined, _ = lora_lib.combine([(tree, targets, 1.0)])
            vs.append(variants_lib.Variant(nm, layers={path: (node["a"], node["b"])
                                                       for path, node in lora_lib.layers_of(combined)}))
        stacked, vtargets = variants_lib.stack_adapters(vs)
        k = variants_lib.variant_count(stacked, vtargets)
        noise = sampling.initial_noise(SEEDS[:2], LATENT)
        one = np.asarray(variants_lib.denoise_variants(CFG, hp, stacked, vtargets, noise, first(cond, 2),
                                                       first(uncond, 2), SIGMAS, GUIDANCE))
        mesh = make_mesh(MESHES["fsdp2_seq4"])
        place = sampling.placement(CFG, vtargets, mesh, variants=True)
        p = jax.device_put(host, place.params)
        sf = jax.device_put(stacked, place.lora)
        with compiled_functions() as names:
            z = variants_lib.denoise_variants(CFG, p, sf, vtargets, noise, first(cond, 2), first(uncond, 2),
                                              SIGMAS, GUIDANCE)
            z.block_until_ready()
        got = np.asarray(z)
        alone = [base_alone, ref[2], b_alone]
        v.update({"k": k, "shape": list(got.shape), "mesh_vs_one": rel(got, one),
                  "one_vs_alone": [rel(one[i], alone[i]) for i in range(k)],
                  "mesh_vs_alone": [rel(got[i], alone[i]) for i in range(k)],
                  "compiles": count(names, "batched_step"),
                  "replicated": bool(z.sharding.is_fully_replicated and z.is_fully_addressable),
                  "lora_axes": spec_axes(sf["blocks"]["attn"]["qkv_x"]["a"]),
                  "lora_fraction": fraction(sf["blocks"]["attn"]["qkv_x"]["a"])})
    except Exception:  # noqa: BLE001
        out["errors"]["variants"] = traceback.format_exc()
    v["seconds"] = time.time() - t1

    # ------------------------------------------------------------------ the fit check lowers what denoise runs
    t1 = time.time()
    progress("hlo")
    h = out["hlo"] = {}
    try:
        mesh = make_mesh(MESHES["fsdp2_seq4"])
        place = sampling.placement(CFG, TARGETS, mesh)
        p, f = jax.device_put(host, place.params), jax.device_put(fa, place.lora)
        calls, restore = recording("jitted_step")
        try:
            denoise(p, 2, cond, uncond, (f, TARGETS))
        finally:
            restore()
        program = sampling.sampler_program(CFG, TARGETS, 2, LATENT, L, True, place).lower().as_text()
        h["steps"] = len(calls)
        h["steps_equal"] = len(set(calls)) == 1
        h["equal"] = bool(calls) and program == calls[0]
        if calls and not h["equal"]:
            h["diff"] = first_difference(program, calls[0])

        place = sampling.placement(CFG, vtargets, mesh, variants=True)
        p, sf = jax.device_put(host, place.params), jax.device_put(stacked, place.lora)
        calls, restore = recording("batched_step")
        try:
            variants_lib.denoise_variants(CFG, p, sf, vtargets, noise, first(cond, 2), first(uncond, 2),
                                          SIGMAS, GUIDANCE)
        finally:
            restore()
        program = sampling.sampler_program(CFG, vtargets, 2, LATENT, L, True, place, variants=k).lower().as_text()
        h["variants_steps"] = len(calls)
        h["variants_steps_equal"] = len(set(calls)) == 1
        h["variants_equal"] = bool(calls) and program == calls[0]
        if calls and not h["variants_equal"]:
            h["variants_diff"] = first_difference(program, calls[0])
    except Exception:  # noqa: BLE001
        out["errors"]["hlo"] = traceback.format_exc()
    h["seconds"] = time.time() - t1

    # ------------------------------------------------------------------ heads that sequence x tensor do not divide
    six = DiTConfig(depth=2, num_heads=6, head_dim=8, text_width=24, t5_dim=16, time_embed_dim=32,
                    param_dtype="float32", compute_dtype="float32")
    refusal = out["refusal"] = {}
    for nm, sizes in (("seq4", dict(sequence=4, data=2)), ("tensor4", dict(tensor=4, fsdp=2))):
        try:
            sampling.placement(six, TARGETS, make_mesh(sizes))
            refusal[nm] = "no error"
        except ValueError as e:
            refusal[nm] = "ValueError: " + str(e)
        except Exception as e:  # noqa: BLE001
            refusal[nm] = f"{type(e).__name__}: {e}"
    try:  # sequence 2 divides the 6 heads: accepted
        sampling.placement(six, TARGETS, make_mesh(dict(sequence=2, fsdp=4)))
        refusal["seq2_accepted"] = True
    except Exception as e:  # noqa: BLE001
        refusal["seq2_accepted"] = f"{type(e).__name__}: {e}"

    # ------------------------------------------------------------------ the VAE decode over the 8 devices
    t1 = time.time()
    dec = out["decode"] = {}
    try:
        vcfg = VAEConfig(**DEMO_VAE, tile_size=(32, 32), tile_overlap=(16, 16))
        vhost = random_like(jax.eval_shape(functools.partial(vae_lib.init, cfg=vcfg), jax.random.PRNGKey(0)), 0)
        # one device: committed there, as when a training mesh's latents decode (below; the same program)
        vparams = jax.device_put(vhost, jax.devices()[0])
        placed = jax.device_put(vhost, NamedSharding(make_mesh(dict(fsdp=8)), PartitionSpec()))
        z = np.random.default_rng(1).standard_normal((1, 12, 3, 6, 10)).astype(np.float32)
        for tiled in (False, True):
            one = sampling.decode_frames(vcfg, vparams, z, tiled=tiled).astype(int)
            eight = sampling.decode_frames(vcfg, placed, z, tiled=tiled)
            diff = np.abs(one - eight)
            dec["tiled" if tiled else "untiled"] = {"max": int(diff.max()), "frac": float((diff > 0).mean()),
                                                    "shape": list(eight.shape)}
        # a training mesh's latents (validation videos), the VAE's weights on one device
        on_mesh = jax.device_put(z, NamedSharding(make_mesh(dict(data=8)), PartitionSpec()))
        from_mesh = sampling.decode_frames(vcfg, vparams, on_mesh, tiled=False)
        dec["mesh_latents_equal"] = bool(np.array_equal(from_mesh, sampling.decode_frames(vcfg, vparams, z, tiled=False)))
    except Exception:  # noqa: BLE001
        out["errors"]["decode"] = traceback.format_exc()
    dec["seconds"] = time.time() - t1

    out["seconds"] = time.time() - t0
    print("RESULT " + json.dumps(out))


def first_difference(a, b):
    """The first differing line of two HLO texts, with its number."""
    la, lb = a.splitlines(), b.splitlines()
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return {"line": i, "program": x[:400], "denoise": y[:400]}
    return {"line": min(len(la), len(lb)), "program_lines": len(la), "denoise_lines": len(lb)}


if __name__ == "__main__":
    sys.exit(main())
