"""DiT weights: genmo original (`dit.safetensors`) or diffusers (`transformer/`) -> our pytree.

Both layouts are first seen through genmo's key names (`genmo_shapes`, `read_genmo`); the
diffusers layout is mapped onto them (q/k/v concatenated, SwiGLU and final-modulation halves
swapped). Then every genmo tensor becomes one leaf of our checkpoint (kernels transposed to
[in, out]; blocks kept unrolled as blocks_N and last_block, stacked for the scan at load time).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import jax.numpy as jnp

from mochi_jax.checkpoints.orbax_io import Leaf, load_model, read_metadata, validate, write
from mochi_jax.checkpoints.safetensors_io import ConversionError, LazyTensor, TensorSource, vote, write_safetensors
from mochi_jax.models import layers, quant
from mochi_jax.models.dit import DiTConfig
from mochi_jax.models.layers import stack_layers, unstack_shardings

GENMO_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def detect_layout(src: TensorSource) -> str:
    keys = src.keys()
    if any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers"
    if any(k.startswith("blocks.") for k in keys):
        return "genmo"
    raise ConversionError(f"{src.path}: neither a genmo DiT checkpoint (blocks.N.*) nor a diffusers "
                          f"transformer (transformer_blocks.N.*); first keys: {sorted(keys)[:5]}")


def open_dit(path) -> tuple[TensorSource, str]:
    """Open `path` (a file, a folder of shards, or a diffusers repo with transformer/)."""
    path = Path(path)
    if path.is_dir() and (path / "transformer").is_dir():
        path = path / "transformer"
    src = TensorSource(path, prefixes=GENMO_PREFIXES)
    return src, detect_layout(src)


# ----------------------------------------------------------------------------- architecture

def _genmo_view(src: TensorSource, layout: str, depth: int) -> Callable:
    """genmo key -> (the name to show, its shape in genmo's layout) or None when the file lacks it;
    for the diffusers layout through its q/k/v parts (rows added up)."""
    keys, cfg = src.keys(), SimpleNamespace(depth=depth)

    def view(genmo_key: str):
        names = [genmo_key] if layout == "genmo" else _diffusers_sources(genmo_key, cfg)[0]
        if not all(k in keys for k in names):
            return None
        shapes = [tuple(src.shape(k)) for k in names]
        if len({(len(s), s[1:]) for s in shapes}) != 1 or not shapes[0]:
            return None
        return names[0] if len(names) == 1 else "+".join(names), (sum(s[0] for s in shapes), *shapes[0][1:])

    return view


def infer_config(src: TensorSource, layout: str) -> DiTConfig:
    """The architecture, each number read from every tensor that shows it (`safetensors_io.vote`): one
    corrupt tensor cannot change it, so `validate` names that tensor and only it."""
    block_re = re.compile(r"^(transformer_blocks|blocks)\.(\d+)\.")
    depth = 1 + max((int(m.group(2)) for k in src.keys() if (m := block_re.match(k))), default=-1)
    if depth < 2:
        raise ConversionError(f"{src.path}: {depth} blocks; a Mochi DiT has at least 2")
    view = _genmo_view(src, layout, depth)

    def read(specs):
        """(shown key, dim // div) for every (genmo key, axis, div) the file holds with a whole quotient."""
        out = []
        for key, axis, div in specs:
            got = view(key)
            if got is not None and len(got[1]) > axis and got[1][axis] % div == 0:
                out.append((got[0], got[1][axis] // div))
        return out

    blocks, inner, last = [f"blocks.{n}." for n in range(depth)], [f"blocks.{n}." for n in range(depth - 1)], \
        f"blocks.{depth - 1}."
    width = vote(src, "model width", read(
        [("x_embedder.proj.weight", 0, 1), ("x_embedder.proj.bias", 0, 1), ("t_embedder.mlp.0.weight", 0, 1),
         ("t_embedder.mlp.2.weight", 0, 1), ("t_embedder.mlp.2.weight", 1, 1), ("t5_y_embedder.to_out.weight", 0, 1),
         ("final_layer.mod.weight", 1, 1), ("final_layer.linear.weight", 1, 1)]
        + [(b + k, axis, div) for b in blocks for k, axis, div in (
            ("mod_x.weight", 1, 1), ("mod_x.weight", 0, 4), ("mod_y.weight", 1, 1), ("attn.qkv_x.weight", 1, 1),
            ("attn.qkv_x.weight", 0, 3), ("attn.qkv_y.weight", 0, 3), ("attn.proj_x.weight", 0, 1),
            ("attn.proj_x.weight", 1, 1), ("mlp_x.w1.weight", 1, 1), ("mlp_x.w2.weight", 0, 1))]
        + [(b + "attn.proj_y.weight", 1, 1) for b in inner]))
    head_dim = vote(src, "attention head size", read(
        [(b + f"attn.{norm}.weight", 0, 1) for b in blocks
         for norm in ("q_norm_x", "k_norm_x", "q_norm_y", "k_norm_y")])
        + [(k, 2 * v) for k, v in read([("pos_frequencies", 2, 1)])])
    text_width = vote(src, "text stream width", read(
        [("t5_yproj.weight", 0, 1), ("t5_yproj.bias", 0, 1), (last + "mod_y.weight", 0, 1)]
        + [(b + "attn.qkv_y.weight", 1, 1) for b in blocks]
        + [(b + k, axis, div) for b in inner for k, axis, div in (
            ("mod_y.weight", 0, 4), ("attn.proj_y.weight", 0, 1), ("mlp_y.w1.weight", 1, 1),
            ("mlp_y.w2.weight", 0, 1))]))
    t5_dim = vote(src, "T5 feature width", read(
        [("t5_yproj.weight", 1, 1), ("t5_y_embedder.to_q.weight", 0, 1), ("t5_y_embedder.to_q.weight", 1, 1),
         ("t5_y_embedder.to_kv.weight", 0, 2), ("t5_y_embedder.to_kv.weight", 1, 1),
         ("t5_y_embedder.to_out.weight", 1, 1)]))
    time_dim = vote(src, "timestep embedding width", read([("t_embedder.mlp.0.weight", 1, 1)]))
    # channels and patch size: x_embedder's [width, c, p, p], checked against the output layer's p * p * c rows
    got = view("x_embedder.proj.weight")
    if got is None or len(got[1]) != 4 or got[1][2] != got[1][3]:
        raise ConversionError(f"{src.path}: the patch embedding {got[0] if got else 'x_embedder.proj.weight'!r} "
                              f"{'has shape ' + str(got[1]) if got else 'is missing'}; expected [width, channels, "
                              f"patch, patch] (needed to infer the architecture)")
    in_ch, p = got[1][1], got[1][2]
    pixels = vote(src, "patch pixels x channels", [(got[0], in_ch * p * p)] + read(
        [("final_layer.linear.weight", 0, 1), ("final_layer.linear.bias", 0, 1)]))
    if pixels != in_ch * p * p:
        raise ConversionError(f"{src.path}: {got[0]!r} has shape {got[1]} ({in_ch} channels x patch {p}x{p} = "
                              f"{in_ch * p * p}), but the output layer has {pixels} rows")
    if width % head_dim:
        raise ConversionError(f"{src.path}: inconsistent architecture: the model width {width} is not a multiple of "
                              f"the head size {head_dim}")
    return DiTConfig(depth=depth, num_heads=width // head_dim, head_dim=head_dim, text_width=text_width,
                     t5_dim=t5_dim, in_channels=in_ch, patch_size=p, time_embed_dim=time_dim)


# ----------------------------------------------------------------------------- genmo key space

def genmo_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a genmo-layout DiT checkpoint with its shape (PyTorch [out, in])."""
    w, tw, t5, p, c = cfg.width, cfg.text_width, cfg.t5_dim, cfg.patch_size, cfg.in_channels
    s = {
        "x_embedder.proj.weight": (w, c, p, p), "x_embedder.proj.bias": (w,),
        "t_embedder.mlp.0.weight": (w, cfg.time_embed_dim), "t_embedder.mlp.0.bias": (w,),
        "t_embedder.mlp.2.weight": (w, w), "t_embedder.mlp.2.bias": (w,),
        "t5_y_embedder.to_kv.weight": (2 * t5, t5), "t5_y_embedder.to_kv.bias": (2 * t5,),
        "t5_y_embedder.to_q.weight": (t5, t5), "t5_y_embedder.to_q.bias": (t5,),
        "t5_y_embedder.to_out.weight": (w, t5), "t5_y_embedder.to_out.bias": (w,),
        "t5_yproj.weight": (tw, t5), "t5_yproj.bias": (tw,),
        "pos_frequencies": (3, cfg.num_heads, cfg.head_dim // 2),
        "final_layer.mod.weight": (2 * w, w), "final_layer.mod.bias": (2 * w,),
        "final_layer.linear.weight": (p * p * c, w), "final_layer.linear.bias": (p * p * c,),
    }
    for n in range(cfg.depth):
        s.update(block_shapes(cfg, n))
    return s


def block_shapes(cfg: DiTConfig, n: int) -> dict[str, tuple[int, ...]]:
    w, tw, hd = cfg.width, cfg.text_width, cfg.head_dim
    last = n == cfg.depth - 1
    b = f"blocks.{n}."
    s = {
        b + "mod_x.weight": (4 * w, w), b + "mod_x.bias": (4 * w,),
        b + "mod_y.weight": ((tw if last else 4 * tw), w), b + "mod_y.bias": ((tw if last else 4 * tw),),
        b + "attn.qkv_x.weight": (3 * w, w), b + "attn.qkv_y.weight": (3 * w, tw),
        b + "attn.q_norm_x.weight": (hd,), b + "attn.k_norm_x.weight": (hd,),
        b + "attn.q_norm_y.weight": (hd,), b + "attn.k_norm_y.weight": (hd,),
        b + "attn.proj_x.weight": (w, w), b + "attn.proj_x.bias": (w,),
        b + "mlp_x.w1.weight": (2 * cfg.mlp_inner(w), w), b + "mlp_x.w2.weight": (w, cfg.mlp_inner(w)),
    }
    if not last:
        s.update({
            b + "attn.proj_y.weight": (tw, w), b + "attn.proj_y.bias": (tw,),
            b + "mlp_y.w1.weight": (2 * cfg.mlp_inner(tw), tw), b + "mlp_y.w2.weight": (tw, cfg.mlp_inner(tw)),
        })
    return s


def _swap_halves(x: np.ndarray) -> np.ndarray:
    h = x.shape[0] // 2
    return np.concatenate([x[h:], x[:h]], axis=0)


def _diffusers_sources(genmo_key: str, cfg: DiTConfig) -> tuple[list[str], Callable]:
    """diffusers keys holding one genmo tensor, and how to combine them."""
    ident = lambda xs: xs[0]  # noqa: E731
    cat = lambda xs: np.concatenate(xs, axis=0)  # noqa: E731
    swap = lambda xs: _swap_halves(xs[0])  # noqa: E731
    top = {
        "x_embedder.proj.": "patch_embed.proj.", "t_embedder.mlp.0.": "time_embed.timestep_embedder.linear_1.",
        "t_embedder.mlp.2.": "time_embed.timestep_embedder.linear_2.", "t5_y_embedder.": "time_embed.pooler.",
        "t5_yproj.": "time_embed.caption_proj.", "final_layer.linear.": "proj_out.",
    }
    if genmo_key == "pos_frequencies":
        return ["pos_frequencies"], ident
    if genmo_key.startswith("final_layer.mod."):
        return ["norm_out.linear." + genmo_key.rsplit(".", 1)[1]], swap
    for g, d in top.items():
        if genmo_key.startswith(g):
            return [d + genmo_key[len(g):]], ident
    m = re.match(r"blocks\.(\d+)\.(.*)$", genmo_key)
    n, rest = int(m.group(1)), m.group(2)
    b = f"transformer_blocks.{n}."
    suffix = rest.rsplit(".", 1)[1]
    last = n == cfg.depth - 1
    table = {
        "mod_x": ([b + "norm1.linear"], ident),
        "mod_y": ([b + ("norm1_context.linear_1" if last else "norm1_context.linear")], ident),
        "attn.qkv_x": ([b + f"attn1.to_{c}" for c in "qkv"], cat),
        "attn.qkv_y": ([b + f"attn1.add_{c}_proj" for c in "qkv"], cat),
        "attn.q_norm_x": ([b + "attn1.norm_q"], ident), "attn.k_norm_x": ([b + "attn1.norm_k"], ident),
        "attn.q_norm_y": ([b + "attn1.norm_added_q"], ident), "attn.k_norm_y": ([b + "attn1.norm_added_k"], ident),
        "attn.proj_x": ([b + "attn1.to_out.0"], ident), "attn.proj_y": ([b + "attn1.to_add_out"], ident),
        "mlp_x.w1": ([b + "ff.net.0.proj"], swap), "mlp_x.w2": ([b + "ff.net.2"], ident),
        "mlp_y.w1": ([b + "ff_context.net.0.proj"], swap), "mlp_y.w2": ([b + "ff_context.net.2"], ident),
    }
    keys, fn = table[rest.rsplit(".", 1)[0]]
    return [k + "." + suffix for k in keys], fn


def source_shapes(cfg: DiTConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Every key the source file must hold, with its shape, in the source's own names."""
    g = genmo_shapes(cfg)
    if layout == "genmo":
        return g
    out = {}
    for gk, shape in g.items():
        keys, _ = _diffusers_sources(gk, cfg)
        for k in keys:  # concatenated q/k/v split evenly along rows
            out[k] = (shape[0] // len(keys),) + tuple(shape[1:])
    return out


def read_genmo(src: TensorSource, layout: str, cfg: DiTConfig, genmo_key: str) -> np.ndarray:
    if layout == "genmo":
        return src.get(genmo_key)
    keys, fn = _diffusers_sources(genmo_key, cfg)
    return fn([src.get(k) for k in keys])


# ----------------------------------------------------------------------------- our leaves

def _to_ours(genmo_key: str, x: np.ndarray, cfg: DiTConfig) -> np.ndarray:
    """One genmo tensor -> the layout of our leaf (Dense kernels [in, out], patch conv flattened)."""
    if genmo_key == "x_embedder.proj.weight":  # [D, C, p, p] -> [(p1, p2, c), D]
        return x.transpose(2, 3, 1, 0).reshape(-1, x.shape[0])
    if genmo_key.endswith(".weight") and x.ndim == 2:
        return x.T
    return x


def _from_ours(genmo_key: str, x: np.ndarray, cfg: DiTConfig) -> np.ndarray:
    """The inverse of `_to_ours`: our leaf -> the genmo tensor (PyTorch layout)."""
    if genmo_key == "x_embedder.proj.weight":  # [(p1, p2, c), D] -> [D, C, p, p]
        p = cfg.patch_size
        return x.reshape(p, p, cfg.in_channels, x.shape[-1]).transpose(3, 2, 0, 1)
    if genmo_key.endswith(".weight") and x.ndim == 2:
        return x.T
    return x


def _our_path(genmo_key: str, cfg: DiTConfig) -> tuple[str, ...]:
    """genmo key -> its path in the checkpoint we write (the unrolled layout: blocks_N, last_block)."""
    parts = genmo_key.split(".")
    if parts[-1] == "weight" and not parts[-2].endswith("norm_x") and not parts[-2].endswith("norm_y"):
        parts[-1] = "kernel"
    if parts[0] == "x_embedder":
        parts = [p for p in parts if p != "proj"]
    if parts[0] == "t_embedder":
        parts = [{"0": "mlp_0", "2": "mlp_2"}.get(p, p) for p in parts if p != "mlp"]
    if parts[0] == "blocks":
        n = int(parts[1])
        return ("last_block" if n == cfg.depth - 1 else f"blocks_{n}", *parts[2:])
    return tuple(parts)


def plan(cfg: DiTConfig, layout: str, quantized: str = "") -> list[Leaf]:
    """One output leaf per genmo tensor, so the converter holds one tensor at a time.

    `quantized` ('int8' | 'float8_e4m3fn'): the kernels of the blocks (mochi_jax.models.quant) are
    written quantized, each followed by its float32 'kernel_scale' leaf (the pair is built from one
    read of the tensor).

    The checkpoint keeps the blocks unrolled (blocks_0 .. blocks_{depth-2}, last_block): the
    loader (`load_dit` below) stacks them for the scan, leaf by leaf, directly
    into the requested shardings."""
    leaves = []
    last = {}  # the most recent quantization: (genmo key, (q, scale))

    def quantized_pair(src, gk):
        if last.get("key") != gk:
            last.clear()
            last.update(key=gk, pair=quant.quantize(np.asarray(_to_ours(gk, read_genmo(src, layout, cfg, gk), cfg)),
                                                   quantized))
        return last["pair"]

    for gk, shape in genmo_shapes(cfg).items():
        ours = _to_ours(gk, np.broadcast_to(np.float32(0), shape), cfg).shape
        path = _our_path(gk, cfg)
        if quantized and quant.is_quantized_kernel(path):
            leaves.append(Leaf(path=path, shape=tuple(ours), keys=(gk,), dtype=np.dtype(quantized),
                               build=lambda src, gk=gk: quantized_pair(src, gk)[0]))
            leaves.append(Leaf(path=path[:-1] + ("kernel_scale",), shape=tuple(ours[-1:]), keys=(gk,),
                               dtype=np.dtype(np.float32), build=lambda src, gk=gk: quantized_pair(src, gk)[1]))
            continue
        leaves.append(Leaf(path=path, shape=tuple(ours), keys=(gk,),
                           build=lambda src, gk=gk: _to_ours(gk, read_genmo(src, layout, cfg, gk), cfg)))
    return leaves


def check(src: TensorSource, layout: str) -> DiTConfig:
    """Infer the architecture and validate every key and shape; raises ConversionError."""
    cfg = infer_config(src, layout)
    validate(src, source_shapes(cfg, layout))
    return cfg


def convert_dit(src_path, out_dir, dtype="bfloat16", overwrite=False, progress=True):
    """Convert a genmo or diffusers DiT checkpoint into our orbax layout; returns (out_dir, DiTConfig).

    `dtype`: bfloat16 / float32 / float16, or a quantized base, int8 / float8_e4m3fn (the blocks'
    kernels quantized per output channel as they stream through, everything else bfloat16; the
    metadata's 'quantized' says which). Every key and shape is checked before anything is written.
    """
    name = quant.check_param_dtype(dtype, "--dtype")
    src, layout = open_dit(src_path)
    cfg = check(src, layout)
    meta = {"model": "mochi_dit", "source": str(src_path), "source_layout": layout, "config": cfg.arch()}
    q = name if quant.is_quantized(name) else ""
    if q:
        meta["quantized"] = q
    np_dtype = np.dtype(jnp.dtype(quant.STORAGE_DTYPE if q else name))
    out = write(plan(cfg, layout, q), src, out_dir, np_dtype, meta,
                overwrite=overwrite, progress=progress)
    return out, cfg


def save_genmo_dit(path, cfg: DiTConfig, params, dtype=None) -> Path:
    """Write a DiT (our params, scanned layout as `load_dit` returns them) as genmo's
    `dit.safetensors`: one file, genmo's key names and PyTorch shapes, the layout ComfyUI and
    genmo's own code load (and `convert_dit` reads back). Tensors are built and written one at a
    time, cast to `dtype` (default: the params' own)."""
    tensors = {}
    for gk, shape in genmo_shapes(cfg).items():
        path_ = _our_path(gk, cfg)
        index = None
        if path_[0].startswith("blocks_"):  # blocks_N -> row N of the stacked 'blocks'
            index, path_ = int(path_[0][len("blocks_"):]), ("blocks", *path_[1:])
        leaf = params
        for k in path_:
            leaf = leaf[k]
        dt = np.dtype(jnp.dtype(dtype if dtype is not None else leaf.dtype))

        def build(gk=gk, leaf=leaf, index=index, dt=dt):
            return _from_ours(gk, np.asarray(leaf if index is None else leaf[index]), cfg).astype(dt)

        tensors[gk] = LazyTensor(shape, dt, build)
    return write_safetensors(path, tensors, {"format": "pt"})


def dit_config(model, arch: dict | None = None, platform: str = "", **fixed) -> DiTConfig:
    """The DiTConfig a command runs, from its `model` block (configs/common.py `model`): the architecture
    of the converted checkpoint at `model.dit` (its metadata; no weight is read) or `arch` when given,
    every setting field the block holds (DiTConfig.SETTING_FIELDS: param_dtype, compute_dtype, attention,
    splash_block, remat, remat_groups, scan_layers, weights_on_host), then `fixed` (e.g. remat='none'
    where nothing is differentiated). Every command builds its DiTConfig here, so every setting of the
    block reaches the model. `model` may also be a checkpoint path: its architecture, then `fixed`.
    attention='auto' becomes the kernel of `platform` (layers.platform_attention; default: the platform
    this process runs on, so the fit check passes its target's)."""
    block = model if hasattr(model, "keys") else {"dit": model}
    if arch is None:
        path = block["dit"]
        try:
            arch = read_metadata(path)["config"]
        except KeyError:
            raise ValueError(f"dit: {path} is not a converted DiT checkpoint (its metadata holds no "
                             f"architecture)") from None
    settings = {**{k: block[k] for k in DiTConfig.SETTING_FIELDS if k in block}, **fixed}
    if settings.get("attention") == "auto":
        settings["attention"] = layers.platform_attention(platform or layers.local_platform(),
                                                          settings.get("compute_dtype", DiTConfig.compute_dtype))
    return DiTConfig.from_dict({**arch, **settings})


def load_dit(path, dtype=None, shardings=None, **overrides) -> tuple[DiTConfig, dict]:
    """(DiTConfig, params) from a converted DiT checkpoint, in the scanned layout.

    `shardings`: NamedShardings for the scanned params (e.g. FSDP; pinned host memory for
    weights_on_host); each process then reads only its shards and the blocks are stacked straight
    into them. `dtype` casts the weights; a quantized format ('int8', 'float8_e4m3fn') loads a
    checkpoint of that format as stored and quantizes any other one as it loads, one top-level group
    (blocks_N, last_block, ...) at a time (a quantized checkpoint asked for as a float dtype is
    dequantized the same way; None keeps the stored format). `overrides` set non-architecture
    config fields (compute_dtype, attention, remat, weights_on_host, ...)."""
    meta = read_metadata(path)
    if meta.get("model") != "mochi_dit":
        raise ValueError(f"{path} is not a converted mochi_dit checkpoint (metadata: {meta})")
    stored = meta.get("quantized", "")
    want = quant.check_param_dtype(dtype, "dtype") if dtype is not None else (stored or None)
    stack = lambda arch: ("blocks", int(arch["depth"]) - 1)  # noqa: E731
    if want is None or (not stored and not quant.is_quantized(want)):
        return load_model(path, "mochi_dit", DiTConfig, dtype, shardings, overrides, stack=stack)
    overrides = {**overrides, "param_dtype": want}
    if want == stored:
        return load_model(path, "mochi_dit", DiTConfig, None, shardings, overrides, stack=stack)
    return DiTConfig.from_dict({**meta["config"], **overrides}), _load_converting(path, meta, stored, want, shardings)


def _load_converting(path, meta, stored: str, want: str, shardings=None) -> dict:
    """A checkpoint stored as `stored` ('' for float) loaded as `want`, one top-level group at a time:
    the group is read (in device memory), converted (quant.quantize_params / dequantize_params) and
    placed in its sharding, so at most one group exists in both forms."""
    import jax
    import orbax.checkpoint.experimental.v1 as ocp
    from flax import traverse_util

    n = int(meta["config"]["depth"]) - 1
    disk = unstack_shardings(shardings, "blocks", n) if shardings is not None else None
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    spare = one if disk is None else jax.sharding.NamedSharding(
        jax.tree_util.tree_leaves(disk)[0].mesh, jax.sharding.PartitionSpec())
    tree_meta = ocp.metadata(Path(path).absolute()).metadata
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    params = {}
    for group, gmeta in tree_meta.items():
        final = traverse_util.flatten_dict(disk[group]) if disk is not None and isinstance(disk[group], dict) else (
            {(): disk[group]} if disk is not None else {})

        def reading(s):  # read and convert in device memory; the final placement comes after
            return s if s.memory_kind in (None, "device") else s.with_memory_kind("device")

        if isinstance(gmeta, dict):
            flat = traverse_util.flatten_dict(gmeta)
            target = traverse_util.unflatten_dict({
                k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=reading(final.get(k, spare))) for k, m in flat.items()})
        else:
            target = jax.ShapeDtypeStruct(gmeta.shape, gmeta.dtype, sharding=reading(final.get((), spare)))
        with ctx:
            loaded = ocp.load(Path(path).absolute(), {group: target})
        if stored:
            loaded = quant.dequantize_params(loaded, "float32" if quant.is_quantized(want) else want)
        converted = quant.quantize_params(loaded, want) if quant.is_quantized(want) else loaded
        del loaded
        if isinstance(converted[group], dict):
            flat = traverse_util.flatten_dict(converted[group])
            params[group] = traverse_util.unflatten_dict({k: jax.device_put(v, final.get(k, spare if disk is not None
                                                                                        else one))
                                                          for k, v in flat.items()})
        else:
            params[group] = jax.device_put(converted[group], final.get((), one))
        del converted
    return stack_layers(params, "blocks", n, shardings)
