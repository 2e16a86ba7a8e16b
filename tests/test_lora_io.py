"""LoRA files (mochi_jax.checkpoints.lora_read / lora_write): round trips, parity with diffusers' own LoRA loader
and with an independent NumPy merge on the genmo checkpoint, combine, merge_checkpoint, refusals, the CLI."""

import copy
import json
import re

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from dit_ref import make_reference, our_config, random_inputs, reference_forward, rel_l2, write_both_layouts
from mochi_jax import checkpoints as convert
from mochi_jax.checkpoints import lora_format, lora_read, lora_write
from mochi_jax.models import lora as lora_lib
from mochi_jax.models.dit import MochiDiT
from mochi_jax.checkpoints import load_dit
from tools import lora as cli


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Per config: (cfg, diffusers model, our fp32 params, converted checkpoint dir, genmo dit.safetensors)."""
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            model = make_reference(our_config(name), seed=11)
            diff_dir, genmo = write_both_layouts(model, root)
            ckpt, _ = convert.convert_dit(diff_dir, root / "ours", dtype="float32", progress=False)
            cfg, params = load_dit(ckpt, compute_dtype="float32", remat="none")
            cache[name] = cfg, model, params, ckpt, genmo
        return cache[name]

    return get


def random_lora(params, spec, seed):
    """A random LoRA tree for every block Dense whose path ('blocks/attn/qkv_x') matches a pattern of
    `spec` {pattern: (rank, alpha)}; shapes come from the model's kernels. -> (tree, targets)."""
    rng = np.random.default_rng(seed)
    targets = tuple(lora_lib.LoraTarget(p, r, a) for p, (r, a) in spec.items())
    flat = {}
    for path, kernel in traverse_util.flatten_dict(params).items():
        name = "/".join(path[:-1])
        t = lora_lib.find_target(targets, name)
        if path[-1] != "kernel" or path[0] not in ("blocks", "last_block") or t is None:
            continue
        lead, (d_in, d_out) = kernel.shape[:-2], kernel.shape[-2:]
        flat[path[:-1] + ("a",)] = rng.standard_normal(lead + (d_in, t.rank)).astype(np.float32) / d_in ** 0.5
        flat[path[:-1] + ("b",)] = 0.5 * rng.standard_normal(lead + (t.rank, d_out)).astype(np.float32)
    return traverse_util.unflatten_dict(flat), targets


def deltas(tree, targets):
    """{layer path: effective delta kernel (alpha/r) a @ b} in float64."""
    out = {}
    for path, node in lora_lib.layers_of(tree):
        t = lora_lib.find_target(targets, "/".join(path))
        out["/".join(path)] = t.scale * np.matmul(np.float64(node["a"]), np.float64(node["b"]))
    return out


def assert_same_deltas(got, want, tol):
    """Equal effective deltas; a layer only one side has must be zero on it. Returns the worst error."""
    worst = 0.0
    for k in sorted(set(got) | set(want)):
        g, w = got.get(k), want.get(k)
        if g is None or w is None:
            assert not np.any(g if w is None else w), f"{k}: adapted on one side only"
            continue
        err = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
        assert err <= tol, f"{k}: relative error {err}"
        worst = max(worst, err)
    return worst


def forward(cfg, params, inp, tree=None, targets=()):
    variables = {"params": params, **({"lora": tree} if tree is not None else {})}
    return np.asarray(MochiDiT(cfg, targets).apply(variables, *inp))


SPEC = {r"attn/qkv_[xy]$": (4, 6.0), r"attn/proj_[xy]$": (3, 1.5), r"mlp_x/w1$": (2, 2.0),
        r"last_block/mod_y$": (2, 5.0)}


# ----------------------------------------------------------------------------- round trips

def test_round_trips_genmo_and_diffusers(base, tmp_path):
    cfg, _, params, _, _ = base("h3d8")
    tree, targets = random_lora(params, SPEC, seed=1)
    want = deltas(tree, targets)

    g = lora_write.save_genmo(tmp_path / "g.safetensors", tree, targets)
    sd = load_file(g)
    with safe_open(g, "np") as f:
        kwargs = json.loads(f.metadata()["kwargs"])
    assert kwargs == {"qkv_proj_lora_rank": 4, "qkv_proj_lora_alpha": 4, "qkv_proj_lora_dropout": 0.0,
                      "out_proj_lora_rank": 3, "out_proj_lora_alpha": 3, "out_proj_lora_dropout": 0.0}
    assert not any(k.endswith((".alpha", ".weight")) for k in sd)
    assert "blocks.3.attn.proj_y.lora_A" not in sd and "blocks.2.attn.proj_y.lora_B" in sd
    w = cfg.width
    assert sd["blocks.1.attn.qkv_x.lora_A"].shape == (4, w) and sd["blocks.1.attn.qkv_x.lora_B"].shape == (3 * w, 4)
    np.testing.assert_allclose(sd["blocks.1.attn.qkv_x.lora_B"], 1.5 * tree["blocks"]["attn"]["qkv_x"]["b"][1].T,
                               rtol=1e-7)  # alpha/r folded into lora_B
    got_tree, got_targets, info = lora_read.load_lora(g, cfg=cfg)
    assert info["format"] == "genmo" and all(t.scale == 1.0 for t in got_targets)
    err_g = assert_same_deltas(deltas(got_tree, got_targets), want, 1e-7)

    # the CLI converts genmo -> diffusers; read back through our loader
    d = tmp_path / "d.safetensors"
    assert cli.main(["convert", str(g), str(d), "--to", "diffusers", "--depth", str(cfg.depth)]) == 0
    sd = load_file(d)
    a = tree["last_block"]["attn"]["qkv_y"]["a"].T
    for m in ("add_q_proj", "add_k_proj", "add_v_proj"):  # A shared by q, k, v
        np.testing.assert_array_equal(sd[f"transformer.transformer_blocks.3.attn1.{m}.lora_A.weight"], a)
    assert "transformer.transformer_blocks.3.norm1_context.linear_1.lora_A.weight" in sd
    got_tree, got_targets, info = lora_read.load_lora(d, depth=cfg.depth)
    assert info["format"] == "diffusers" and got_tree["blocks"]["attn"]["qkv_x"]["a"].shape[-1] == 4
    err_d = assert_same_deltas(deltas(got_tree, got_targets), want, 1e-7)
    d2 = lora_write.save_diffusers(tmp_path / "d2.safetensors", tree, targets)
    err_d2 = assert_same_deltas(deltas(*lora_read.load_lora(d2, cfg=cfg)[:2]), want, 1e-7)
    print(f"rel err of delta W: ours -> genmo -> ours {err_g:.2e}, -> diffusers -> ours {err_d:.2e}, "
          f"ours -> diffusers -> ours {err_d2:.2e}")

    # scale 1 and uniform ranks: both round trips give back the tree bitwise, with the same targets
    tree1, targets1 = random_lora(params, {r"attn/qkv_[xy]$": (4, 4.0), r"attn/proj_[xy]$": (2, 2.0),
                                           r"mlp_x/w1$": (3, 3.0)}, seed=2)
    for save in (lora_write.save_genmo, lora_write.save_diffusers):
        p = save(tmp_path / f"{save.__name__}.safetensors", tree1, targets1)
        back, back_targets, _ = lora_read.load_lora(p)
        jax.tree_util.tree_map(np.testing.assert_array_equal, back, tree1)
        assert {(t.rank, t.alpha) for t in back_targets} == {(4, 4.0), (2, 2.0), (3, 3.0)}


def test_genmo_export_pads_ranks_and_writes_zero_partners(base, tmp_path):
    """genmo's loader builds every qkv_x/qkv_y (proj_x/proj_y) adapter of every block with one rank."""
    cfg, _, params, _, _ = base("h3d8")
    tree, targets = random_lora(params, {r"attn/qkv_x$": (4, 2.0), r"^blocks/attn/proj_y$": (2, 2.0),
                                         r"last_block/attn/qkv_y$": (2, 3.0)}, seed=3)
    p = lora_write.save_genmo(tmp_path / "g.safetensors", tree, targets, dtype="bfloat16")
    sd = load_file(p)
    assert sd["blocks.0.attn.qkv_x.lora_A"].dtype.name == "bfloat16"
    expect = {f"blocks.{n}.attn.{name}.lora_{x}" for n in range(cfg.depth) for x in "AB"
              for name in ("qkv_x", "qkv_y", "proj_x", "proj_y") if not (name == "proj_y" and n == cfg.depth - 1)}
    assert set(sd) == expect
    assert sd["blocks.0.attn.qkv_y.lora_A"].shape == (4, cfg.text_width)
    assert not np.any(sd["blocks.0.attn.qkv_y.lora_B"]) and not np.any(sd["blocks.1.attn.proj_x.lora_A"])
    assert sd["blocks.3.attn.qkv_y.lora_B"].shape == (3 * cfg.width, 4)
    assert not np.any(sd["blocks.3.attn.qkv_y.lora_B"][:, 2:])  # rank 2 zero-padded to 4
    back, back_targets, _ = lora_read.load_lora(p, cfg=cfg)
    # what the file holds: bfloat16 of a and of b with the scale folded in
    bf16 = {}
    for path, node in lora_lib.layers_of(tree):
        t = lora_lib.find_target(targets, "/".join(path))
        a, b = (np.asarray(x, "bfloat16").astype(np.float64) for x in (node["a"], node["b"] * np.float32(t.scale)))
        bf16["/".join(path)] = a @ b
    assert_same_deltas(deltas(back, back_targets), bf16, 1e-7)
    # the all-zero partners and the zero padding are not read back: only what adds something
    assert set(deltas(back, back_targets)) == {"blocks/attn/qkv_x", "last_block/attn/qkv_x", "blocks/attn/proj_y",
                                              "last_block/attn/qkv_y"}
    assert back["last_block"]["attn"]["qkv_y"]["a"].shape[-1] == 2


# ----------------------------------------------------------------------------- parity with diffusers

@pytest.mark.parametrize("name", ["h3d8", "h4d8"])
def test_diffusers_files_match_diffusers_loader(base, tmp_path, name):
    from diffusers.loaders.lora_pipeline import Mochi1LoraLoaderMixin as Loader

    cfg, model, params, _, _ = base(name)
    inp = random_inputs(cfg, seed=4)

    def diffusers_out(folder, weight_name):
        m = copy.deepcopy(model)
        sd, meta = Loader.lora_state_dict(str(folder), weight_name=weight_name, return_lora_metadata=True)
        assert all("lora" in k for k in sd)  # what load_lora_weights checks first
        Loader.load_lora_into_transformer(sd, transformer=m, metadata=meta)
        return reference_forward(m, *inp)

    ref_base = reference_forward(model, *inp)
    # 1. our export, read by diffusers
    spec = dict(SPEC, **{r"mlp_y/w2$": (1, 1.0), r"^blocks/mod_x$": (2, 3.0)})
    tree, targets = random_lora(params, spec, seed=5)
    # with the trainer's metadata (`about`), which diffusers does not read
    lora_write.save_diffusers(tmp_path / "ours.safetensors", tree, targets, about={"project": "mochi_jax", "step": 3})
    ref = diffusers_out(tmp_path, "ours.safetensors")
    ours = forward(cfg, params, inp, tree, targets)
    assert rel_l2(ref, ref_base) > 1e-2  # diffusers really applied the adapters
    err1 = rel_l2(ours, ref)
    assert err1 <= 1e-5

    # 2. a PEFT-style file: independent A_q, A_k, A_v, per-module rank and alpha in lora_adapter_metadata
    rng = np.random.default_rng(6)
    r, w, sd, ranks = 2, cfg.width, {}, {}
    for n in range(cfg.depth):
        for m in ("to_q", "to_k", "to_v", "to_out.0"):
            rank = 1 if (n, m) == (1, "to_v") else r
            key = f"transformer_blocks.{n}.attn1.{m}"
            sd[f"transformer.{key}.lora_A.weight"] = rng.standard_normal((rank, w)).astype(np.float32) / w ** 0.5
            sd[f"transformer.{key}.lora_B.weight"] = 0.5 * rng.standard_normal((w, rank)).astype(np.float32)
            ranks[key] = rank
    peft = {"r": r, "lora_alpha": 3.0, "alpha_pattern": {"to_k": 5.0}, "target_modules": sorted(ranks),
            "rank_pattern": {"transformer_blocks.1.attn1.to_v": 1}, "use_rslora": name == "h4d8"}
    meta = json.dumps({f"transformer.{k}": v for k, v in peft.items()})
    save_file(sd, str(tmp_path / "peft.safetensors"), metadata={"format": "pt", "lora_adapter_metadata": meta})
    ref = diffusers_out(tmp_path, "peft.safetensors")
    tree, targets, info = lora_read.load_lora(tmp_path / "peft.safetensors", cfg=cfg)
    assert tree["blocks"]["attn"]["qkv_x"]["a"].shape[-1] == 3 * r  # q, k, v stacked: rank 3r
    assert info["layers"]["blocks/attn/qkv_x"]["scale_folded_into_b"]
    ours = forward(cfg, params, inp, tree, targets)
    err2 = rel_l2(ours, ref)
    assert err2 <= 1e-5
    print(f"{name}: ours vs diffusers, our export {err1:.2e}, PEFT-style rank-3r file {err2:.2e}")


def test_diffusers_export_has_one_rank_and_leaves_out_zero_adapters(base, tmp_path):
    """A diffusers file carries no alphas; diffusers before 0.40 then gives every adapter one
    alpha (the first or the most common rank), so adapters of another rank come out rescaled
    while every key counts as loaded. save_diffusers pads every adapter to one rank with zeros
    (exact), which every release applies as alpha = rank: tests/harness/diffusers_releases.py
    measures it with diffusers 0.32, 0.35 and 0.39 (docs/loras.md). Adapters and rank components that
    add nothing are not written; our reader gives each layer back at its own rank."""
    cfg, _, params, _, _ = base("h3d8")
    tree, targets = random_lora(params, SPEC, seed=5)  # ranks 4, 3, 2 and 2
    tree["blocks"]["attn"]["proj_x"]["b"][1] = 0  # block 1's proj_x adapter adds nothing
    tree["blocks"]["attn"]["qkv_x"]["a"][..., 3] = 0  # nor does qkv_x's 4th component in blocks 0-2
    sd = load_file(lora_write.save_diffusers(tmp_path / "d.safetensors", tree, targets))
    ranks = {v.shape[0] for k, v in sd.items() if k.endswith("lora_A.weight")}
    ranks |= {v.shape[1] for k, v in sd.items() if k.endswith("lora_B.weight")}
    assert ranks == {4}
    assert "transformer.transformer_blocks.1.attn1.to_out.0.lora_A.weight" not in sd
    assert "transformer.transformer_blocks.0.attn1.to_out.0.lora_A.weight" in sd
    assert not np.any(sd["transformer.transformer_blocks.0.attn1.to_out.0.lora_A.weight"][3:])  # rank 3 padded
    back, back_targets, info = lora_read.load_lora(tmp_path / "d.safetensors", cfg=cfg)
    assert_same_deltas(deltas(back, back_targets), deltas(tree, targets), 1e-6)
    got = {t.pattern: t.rank for t in back_targets}
    assert got["^blocks/attn/qkv_x$"] == 3 and got["^last_block/attn/qkv_x$"] == 4 and got["^blocks/mlp_x/w1$"] == 2
    assert info["layers"]["blocks/attn/proj_x"]["blocks"] == [0, 2]  # block 1 was not written


def test_diffusers_reader_keeps_the_rank_of_a_qkv_with_a_zero_part(base, tmp_path, capsys):
    """In the last block the text stream's q is unused, so training leaves that third of qkv_y's b
    zero and save_diffusers leaves add_q_proj out; k and v still share one lora_A, so the reader
    gives back one rank-4 adapter (not 8), and convert --to genmo writes the size of a genmo export."""
    cfg, _, params, _, _ = base("h3d8")
    tree, targets = random_lora(params, {r"attn/(qkv|proj)_[xy]$": (4, 4.0)}, seed=14)
    tree["last_block"]["attn"]["qkv_y"]["b"][:, :cfg.width] = 0
    d = lora_write.save_diffusers(tmp_path / "d.safetensors", tree, targets)
    assert "transformer.transformer_blocks.3.attn1.add_q_proj.lora_A.weight" not in load_file(d)
    back, back_targets, _ = lora_read.load_lora(d)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, tree)
    assert {t.rank for t in back_targets} == {4}
    assert cli.main(["info", str(d)]) == 0
    assert re.search(r"last_block/attn/qkv_y +rank +4,", capsys.readouterr().out)
    g = lora_write.save_genmo(tmp_path / "g.safetensors", tree, targets)
    assert cli.main(["convert", str(d), str(tmp_path / "g2.safetensors"), "--to", "genmo"]) == 0
    want, got = load_file(g), load_file(tmp_path / "g2.safetensors")
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}


def test_convert_infers_the_depth_only_when_the_file_shows_it(base, tmp_path, capsys):
    """A LoRA of the first blocks of a deeper model must not be written with its highest block
    under the last block's names: without --depth the command asks for it."""
    cfg, _, params, _, _ = base("h3d8")  # depth 4
    tree, targets = random_lora(params, {r"attn/(qkv|proj)_[xy]$": (2, 2.0)}, seed=7)
    full = lora_write.save_genmo(tmp_path / "full.safetensors", tree, targets, cfg=cfg)
    sd = load_file(full)
    first = {k: v for k, v in sd.items() if int(k.split(".")[1]) < 2}  # blocks 0 and 1 of 4
    _write(tmp_path / "first.safetensors", first)
    assert cli.main(["convert", str(tmp_path / "first.safetensors"), str(tmp_path / "d.safetensors"),
                     "--to", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert "first.safetensors" in err and "highest block is 1" in err and "--depth" in err
    assert not (tmp_path / "d.safetensors").exists()
    assert cli.main(["convert", str(tmp_path / "first.safetensors"), str(tmp_path / "d.safetensors"),
                     "--to", "diffusers", "--depth", "4"]) == 0
    keys = load_file(tmp_path / "d.safetensors")
    assert "transformer.transformer_blocks.1.attn1.to_add_out.lora_A.weight" in keys  # not the last block's names
    # the same without proj_y: it used to be written silently with block 1 as the last block
    _write(tmp_path / "qkv.safetensors", {k: v for k, v in first.items() if ".qkv_" in k})
    assert cli.main(["convert", str(tmp_path / "qkv.safetensors"), str(tmp_path / "q.safetensors"),
                     "--to", "diffusers"]) == 2
    assert "pass the model's depth" in capsys.readouterr().err and not (tmp_path / "q.safetensors").exists()
    # shown by the file: proj_y (which the last block lacks) on every block but the highest
    for path in (full, lora_write.save_diffusers(tmp_path / "full_d.safetensors", tree, targets)):
        assert lora_read.load_lora(path)[2]["depth"] == 4
    # the diffusers last-block module norm1_context.linear_1 shows it too; Mochi 1's block 47 does
    last = {"transformer.transformer_blocks.2.norm1_context.linear_1.lora_A.weight": np.ones((1, cfg.width)),
            "transformer.transformer_blocks.2.norm1_context.linear_1.lora_B.weight": np.ones((cfg.text_width, 1))}
    assert lora_read.load_lora(_write(tmp_path / "last.safetensors", last))[2]["depth"] == 3
    mochi = {"blocks.47.attn.qkv_x.lora_A": np.ones((1, 8)), "blocks.47.attn.qkv_x.lora_B": np.ones((24, 1))}
    assert lora_read.load_lora(_write(tmp_path / "mochi.safetensors", mochi))[2]["depth"] == 48
    # info shows an ambiguous file anyway
    assert cli.main(["info", str(tmp_path / "first.safetensors")]) == 0
    assert "depth unknown (blocks up to 1" in capsys.readouterr().out


def test_info_says_when_the_scale_is_folded_and_convert_drops_zero_adapters(base, tmp_path, capsys):
    cfg, _, params, _, _ = base("h3d8")
    tree, targets = random_lora(params, {r"attn/qkv_x$": (4, 16.0), r"^blocks/attn/proj_y$": (2, 2.0)}, seed=8)
    g = lora_write.save_genmo(tmp_path / "g.safetensors", tree, targets, cfg=cfg)  # writes zero qkv_y / proj_x partners
    assert cli.main(["info", str(g)]) == 0
    out = capsys.readouterr().out
    assert "alpha 4 = rank, scale 1" in out and "already folded into lora_B" in out
    assert "all-zero in every block (left out): " in out and "blocks/attn/qkv_y" in out
    assert cli.main(["convert", str(g), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert "left out all-zero" in capsys.readouterr().out
    keys = set(load_file(tmp_path / "d.safetensors"))
    assert not any("add_q_proj" in k or "to_out" in k for k in keys)  # the zero partners are gone
    assert {k.split(".")[4] for k in keys} == {"to_q", "to_k", "to_v", "to_add_out"}


def test_convert_to_genmo_infers_the_text_width_or_names_the_flag(base, tmp_path, capsys):
    """genmo's loader expects zero qkv_y / proj_y partners, whose shape needs the text stream's
    width: read off the file where it shows it (mod_y's lora_B, a genmo file's zero partners),
    else taken from --text-width, which the error names."""
    cfg, _, params, _, _ = base("h3d8")
    tree, targets = random_lora(params, {r"attn/(qkv|proj)_x$": (2, 2.0), r"mlp_x/w1$": (2, 2.0)}, seed=15)
    d = lora_write.save_diffusers(tmp_path / "vis.safetensors", tree, targets)
    out = tmp_path / "vis_g.safetensors"
    assert cli.main(["convert", str(d), str(out), "--to", "genmo", "--depth", "4"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--text-width" in err and str(out) in err and not out.exists()
    assert cli.main(["convert", str(d), str(out), "--to", "genmo", "--depth", "4", "--text-width", "16"]) == 0
    assert load_file(out)["blocks.0.attn.qkv_y.lora_A"].shape == (2, cfg.text_width)
    assert_same_deltas(deltas(*lora_read.load_lora(out, cfg=cfg)[:2]), deltas(tree, targets), 1e-6)
    # a genmo file shows the width in its zero partners
    assert cli.main(["convert", str(out), str(tmp_path / "again.safetensors"), "--to", "genmo"]) == 0
    assert load_file(tmp_path / "again.safetensors")["blocks.3.attn.qkv_y.lora_A"].shape == (2, cfg.text_width)
    # mod_y's lora_B shows it (4 x the text width, the last block's 1 x)
    tree, targets = random_lora(params, {r"attn/qkv_x$": (2, 2.0), r"mod_[xy]$": (2, 2.0)}, seed=16)
    d = lora_write.save_diffusers(tmp_path / "mod.safetensors", tree, targets)
    assert cli.main(["convert", str(d), str(tmp_path / "mod_g.safetensors"), "--to", "genmo"]) == 0
    assert_same_deltas(deltas(*lora_read.load_lora(tmp_path / "mod_g.safetensors", cfg=cfg)[:2]),
                       deltas(tree, targets), 1e-6)
    assert cli.main(["convert", str(d), str(tmp_path / "x.safetensors"), "--to", "genmo", "--text-width", "8"]) == 2
    assert "--text-width" in capsys.readouterr().err


def test_info_infers_the_depth_of_a_genmo_file_with_mod_targets(base, tmp_path, capsys):
    """The last block's mod_y has text_width outputs, the other blocks' 4 x text_width: that shows
    which block is the last, also in a genmo file (which names it like any other block)."""
    cfg, _, params, _, _ = base("h3d8")
    tree, targets = random_lora(params, {r"attn/qkv_[xy]$": (2, 2.0), r"mod_[xy]$": (2, 2.0)}, seed=17)
    g = lora_write.save_genmo(tmp_path / "g.safetensors", tree, targets)
    assert cli.main(["info", str(g)]) == 0
    assert "genmo LoRA, depth 4 (inferred)" in capsys.readouterr().out
    back, back_targets, _ = lora_read.load_lora(g)
    assert_same_deltas(deltas(back, back_targets), deltas(tree, targets), 1e-6)


def test_convert_reads_a_training_run_directory(base, tmp_path, monkeypatch, capsys):
    cfg, _, params, _, _ = base("h3d8")
    tree, targets = random_lora(params, {r"attn/qkv_[xy]$": (2, 4.0)}, seed=9)
    seen = []

    def fake_run(path):
        seen.append(path)
        return tree, targets

    monkeypatch.setattr(cli, "load_run_lora", fake_run)
    run = tmp_path / "run"
    run.mkdir()
    assert cli.main(["convert", str(run), str(tmp_path / "r.safetensors"), "--to", "genmo"]) == 0
    assert seen == [run] and f"training run {run}" in capsys.readouterr().out
    back, back_targets, _ = lora_read.load_lora(tmp_path / "r.safetensors", depth=cfg.depth)
    assert_same_deltas(deltas(back, back_targets), deltas(tree, targets), 1e-6)
    # a folder that is no run: one line, exit status 2
    monkeypatch.undo()
    assert cli.main(["convert", str(tmp_path), str(tmp_path / "x.safetensors"), "--to", "genmo"]) == 2
    assert "not a training run directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- genmo / kohya / ComfyUI files

def _genmo_files(cfg, tmp_path):
    """Three hand-made files in genmo-family spellings, with what each means as genmo-key deltas
    {genmo weight key: scale * B @ A} ([out, in], PyTorch layout)."""
    rng = np.random.default_rng(8)
    w, t, d = cfg.width, cfg.text_width, cfg.depth
    iw = (4 * w * 2) // 3
    dims = {"attn.qkv_x": (3 * w, w), "attn.qkv_y": (3 * w, t), "attn.proj_x": (w, w), "attn.proj_y": (t, w),
            "mlp_x.w1": (2 * iw, w), "mod_x": (4 * w, w), "mlp_y.w2": (t, (4 * t * 2) // 3)}

    def factors(layer, rank):
        out, inp = dims[layer]
        return (rng.standard_normal((rank, inp)).astype(np.float32) / inp ** 0.5,
                0.5 * rng.standard_normal((out, rank)).astype(np.float32))

    files = {}
    # genmo bare with kwargs (scale alpha/r from the metadata)
    sd, delta = {}, {}
    for n in range(d):
        for layer in ("attn.qkv_x", "attn.qkv_y", "attn.proj_x", "attn.proj_y"):
            if layer == "attn.proj_y" and n == d - 1:
                continue
            a, b = factors(layer, 2)
            sd[f"blocks.{n}.{layer}.lora_A"], sd[f"blocks.{n}.{layer}.lora_B"] = a, b
            delta[f"blocks.{n}.{layer}.weight"] = (3.0 if "qkv" in layer else 1.0) / 2 * (b @ a)
    kwargs = dict(qkv_proj_lora_rank=2, qkv_proj_lora_alpha=3, qkv_proj_lora_dropout=0.0, out_proj_lora_rank=2,
                  out_proj_lora_alpha=1, out_proj_lora_dropout=0.0)
    save_file(sd, str(tmp_path / "genmo.safetensors"), metadata={"kwargs": json.dumps(kwargs)})
    files["genmo"] = delta

    # kohya with per-layer .alpha differing across blocks, mlp and mod layers too
    sd, delta = {}, {}
    for n in range(d):
        for layer in ("attn.qkv_x", "mlp_x.w1", "mod_x", "mlp_y.w2"):
            if layer == "mlp_y.w2" and n == d - 1:
                continue
            a, b = factors(layer, 3)
            k = f"lora_unet_blocks_{n}_{layer.replace('.', '_')}"
            sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"] = a, b
            sd[k + ".alpha"] = np.array(1.0 + n, np.float32)
            delta[f"blocks.{n}.{layer}.weight"] = (1.0 + n) / 3 * (b @ a)
    save_file(sd, str(tmp_path / "kohya.safetensors"))
    files["kohya"] = delta

    # ComfyUI: diffusion_model. prefix, .lora_A.weight, .alpha tensors, ranks differing, block 1 absent
    sd, delta = {}, {}
    for n in (0, 2, d - 1):
        for layer in ("attn.qkv_y", "attn.proj_x"):
            rank = 1 if n == 0 else 3
            a, b = factors(layer, rank)
            k = f"diffusion_model.blocks.{n}.{layer}"
            sd[k + ".lora_A.weight"], sd[k + ".lora_B.weight"] = a, b
            sd[k + ".alpha"] = np.array(2.0, np.float32)
            delta[f"blocks.{n}.{layer}.weight"] = 2.0 / rank * (b @ a)
    save_file(sd, str(tmp_path / "comfy.safetensors"))
    files["comfy"] = delta
    return files


def test_genmo_kohya_comfy_files_match_an_independent_numpy_merge(base, tmp_path):
    """Each file, merged by NumPy into the genmo-layout base checkpoint (W + (alpha/r) B @ A) and
    converted with our converter, gives the output of our model with the imported LoRA unmerged."""
    cfg, _, params, _, genmo = base("h3d8")
    inp = random_inputs(cfg, seed=9)
    base_sd = load_file(genmo)
    for kind, delta in _genmo_files(cfg, tmp_path).items():
        merged = dict(base_sd)
        for k, dw in delta.items():
            merged[k] = (base_sd[k].astype(np.float64) + dw).astype(np.float32)
        save_file(merged, str(tmp_path / f"merged_{kind}.safetensors"))
        ckpt, _ = convert.convert_dit(tmp_path / f"merged_{kind}.safetensors", tmp_path / f"merged_{kind}",
                                      dtype="float32", progress=False)
        c, merged_params = load_dit(ckpt, compute_dtype="float32", remat="none")
        flat = traverse_util.flatten_dict(params)
        changed = {k for k, v in traverse_util.flatten_dict(merged_params).items() if not np.array_equal(v, flat[k])}
        assert changed == {("last_block" if k.split(".")[1] == str(cfg.depth - 1) else "blocks",
                            *k.split(".")[2:-1], "kernel") for k in delta}
        want = forward(c, merged_params, inp)
        tree, targets, info = lora_read.load_lora(tmp_path / f"{kind}.safetensors", cfg=cfg)
        assert info["format"] == ("kohya" if kind == "kohya" else "genmo")
        got = forward(cfg, params, inp, tree, targets)
        err = rel_l2(got, want)
        print(f"{kind}: rel err vs NumPy merge {err:.2e}")
        assert err <= 1e-5, kind
    # the file's uniform alpha is kept where it can be; per-block alphas are folded into b
    assert {(t.pattern, t.rank, t.alpha) for t in lora_read.load_lora(tmp_path / "genmo.safetensors")[1]} >= {
        ("^blocks/attn/qkv_x$", 2, 3.0), ("^blocks/attn/proj_x$", 2, 1.0)}


# ----------------------------------------------------------------------------- combine, merge_checkpoint

def test_combine_equals_merging_each(base):
    cfg, _, params, _, _ = base("h4d8")
    inp = random_inputs(cfg, seed=10)
    l1, t1 = random_lora(params, {r"attn/qkv_[xy]$": (2, 3.0), r"mlp_x/w1$": (2, 2.0)}, seed=11)
    l2, t2 = random_lora(params, {r"attn/proj_x$": (3, 1.0), r"attn/qkv_x$": (1, 2.0), r"last_block/mod_y$": (2, 4.0)},
                         seed=12)
    tree, targets = lora_lib.combine([(l1, t1, 0.7), (l2, t2, -0.3)])
    assert tree["blocks"]["attn"]["qkv_x"]["a"].shape[-1] == 3 and "qkv_y" in tree["last_block"]["attn"]
    assert all(t.scale == 1.0 and t.pattern.startswith("^") for t in targets)
    want = lora_lib.merge(lora_lib.merge(params, l1, t1, 0.7), l2, t2, -0.3)
    got = lora_lib.merge(params, tree, targets)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), got, want)
    out_merged = forward(cfg, want, inp)
    err = rel_l2(forward(cfg, params, inp, tree, targets), out_merged)
    print(f"combine: rel err vs merged {err:.2e}")
    assert err <= 1e-5
    assert not np.array_equal(want["last_block"]["mod_y"]["kernel"], params["last_block"]["mod_y"]["kernel"])


def test_merge_checkpoint_and_unmerge(base, tmp_path):
    cfg, _, params, ckpt, genmo = base("h3d8")
    tree, targets = random_lora(params, SPEC, seed=13)
    f = lora_write.save_genmo(tmp_path / "l.safetensors", tree, targets)
    assert cli.main(["merge", str(ckpt), str(f), str(tmp_path / "m"), "--strength", "0.8"]) == 0
    c, merged = load_dit(tmp_path / "m")
    assert c.arch() == cfg.arch() and c.param_dtype == "float32"
    loaded, loaded_targets, _ = lora_read.load_lora(f, cfg=cfg)
    want = lora_lib.merge(params, loaded, loaded_targets, 0.8)
    jax.tree_util.tree_map(np.testing.assert_array_equal, merged, want)
    assert not np.array_equal(merged["blocks"]["attn"]["qkv_x"]["kernel"], params["blocks"]["attn"]["qkv_x"]["kernel"])
    # genmo's layout (ComfyUI): one safetensors with the key names and shapes of genmo's dit.safetensors,
    # which our converter reads back to the same merged weights
    assert cli.main(["merge", str(ckpt), str(f), str(tmp_path / "m.safetensors"), "--strength", "0.8",
                     "--format", "genmo"]) == 0
    with safe_open(str(tmp_path / "m.safetensors"), "np") as out_file, safe_open(str(genmo), "np") as ref_file:
        assert set(out_file.keys()) == set(ref_file.keys())
        assert all(out_file.get_slice(k).get_shape() == ref_file.get_slice(k).get_shape() for k in ref_file.keys())
    c2, from_genmo = load_dit(convert.convert_dit(tmp_path / "m.safetensors", tmp_path / "m2", dtype="float32",
                                                  progress=False)[0])
    assert c2.arch() == cfg.arch()
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_genmo, want)
    out, _ = lora_write.merge_checkpoint(tmp_path / "m", f, tmp_path / "u", strength=0.8, unmerge=True)
    _, restored = load_dit(out)
    worst = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)) / (1 + np.abs(np.asarray(y)))))
                for x, y in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)))
    print(f"unmerge: max error vs base {worst:.2e}")
    assert worst <= 1e-6


# ----------------------------------------------------------------------------- refusals

def _write(path, tensors, metadata=None):
    save_file({k: np.asarray(v, np.float32) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_refusals_name_the_file_and_every_bad_key(base, tmp_path, capsys):
    cfg = our_config("h2d16")  # depth 3, width 32, text 32
    w = cfg.width
    ok = {"blocks.0.attn.qkv_x.lora_A": np.ones((2, w)), "blocks.0.attn.qkv_x.lora_B": np.ones((3 * w, 2))}
    cases = {
        "unknown": (dict(ok, **{"blocks.0.attn.qkv_z.lora_A": np.ones((2, w))}), ["blocks.0.attn.qkv_z.lora_A"]),
        "shape": (dict(ok, **{"blocks.1.attn.proj_x.lora_A": np.ones((2, w)),
                              "blocks.1.attn.proj_x.lora_B": np.ones((w, 3))}), ["blocks.1.attn.proj_x.lora_B"]),
        "partner": (dict(ok, **{"blocks.1.attn.qkv_y.lora_A": np.ones((2, w))}), ["blocks.1.attn.qkv_y.lora_A"]),
        "depth": (dict(ok, **{"blocks.5.attn.qkv_x.lora_A": np.ones((2, w)),
                              "blocks.5.attn.qkv_x.lora_B": np.ones((3 * w, 2))}), ["blocks.5.attn.qkv_x.lora_"]),
        "several": ({"lora_unet_blocks_0_attn_qkv_x.lora_down.weight": np.ones((2, w)),
                     "lora_unet_blocks_0_attn_qkv_x.lora_up.weight": np.ones((3 * w, 4)),
                     "lora_unet_blocks_1_attn_proj_x.lora_up.weight": np.ones((w, 2)),
                     "lora_unet_blocks_1_attn_foo.lora_up.weight": np.ones((w, 2))},
                    ["lora_unet_blocks_0_attn_qkv_x.lora_up.weight", "lora_unet_blocks_1_attn_proj_x.lora_up.weight",
                     "lora_unet_blocks_1_attn_foo.lora_up.weight"]),
        "last block has no proj_y": (dict(ok, **{"blocks.2.attn.proj_y.lora_A": np.ones((2, w)),
                                                  "blocks.2.attn.proj_y.lora_B": np.ones((cfg.text_width, 2))}),
                                     ["blocks.2.attn.proj_y.lora_A"]),
    }
    for case, (tensors, named) in cases.items():
        path = _write(tmp_path / f"{case.replace(' ', '_')}.safetensors", tensors)
        with pytest.raises(lora_format.LoraFormatError) as e:
            lora_read.load_lora(path, depth=cfg.depth)
        for key in named + [str(path)]:
            assert key in str(e.value), (case, str(e.value))
        assert cli.main(["info", str(path), "--depth", str(cfg.depth)]) == 2
        assert named[0] in capsys.readouterr().err

    # against the model's dims (cfg): a lora_B with the wrong output size
    path = _write(tmp_path / "dims.safetensors", {"blocks.0.attn.qkv_x.lora_A": np.ones((2, w)),
                                                   "blocks.0.attn.qkv_x.lora_B": np.ones((w, 2))})
    lora_read.load_lora(path, depth=cfg.depth)  # self-consistent on its own
    with pytest.raises(lora_format.LoraFormatError, match=re.escape("blocks.0.attn.qkv_x.lora_B")):
        lora_read.load_lora(path, cfg=cfg)
    # genmo kwargs that contradict the tensors; depth inferred where the last block cannot be the last
    path = _write(tmp_path / "kw.safetensors", ok, {"kwargs": json.dumps({"qkv_proj_lora_rank": 4,
                                                                          "qkv_proj_lora_alpha": 4})})
    with pytest.raises(lora_format.LoraFormatError, match="qkv_proj_lora_rank = 4"):
        lora_read.load_lora(path, depth=cfg.depth)
    with pytest.raises(lora_format.LoraFormatError, match="pass the model's depth"):
        lora_read.load_lora(_write(tmp_path / "py.safetensors", {"blocks.1.attn.proj_y.lora_A": np.ones((2, w)),
                                                               "blocks.1.attn.proj_y.lora_B": np.ones((w, 2))}))
    # export: layers the file formats have no names for
    _, _, params, _, _ = base("h3d8")
    tree, targets = random_lora(params, {r"attn/qkv_x$": (2, 2.0)}, seed=0)
    tree["t_embedder"] = {"mlp_0": {"a": np.ones((8, 2)), "b": np.ones((2, 8))}}
    targets += (lora_lib.LoraTarget("t_embedder", 2, 2.0),)
    for save in (lora_write.save_genmo, lora_write.save_diffusers):
        with pytest.raises(lora_format.LoraFormatError, match="t_embedder/mlp_0"):
            save(tmp_path / "x.safetensors", tree, targets)
