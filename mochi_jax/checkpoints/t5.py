"""T5 encoder weights: Hugging Face `T5EncoderModel` layout (the diffusers repo's `text_encoder/`,
sharded safetensors with `model.safetensors.index.json`) -> our pytree (models/t5.py).

    shared.weight [V, D]                                         -> shared/embedding
    encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, H]
                                                                 -> relative_attention_bias/embedding
    encoder.block.N.layer.0.layer_norm.weight                    -> blocks_N/attn_norm/weight
    encoder.block.N.layer.0.SelfAttention.{q,k,v,o}.weight       -> blocks_N/attn/{q,k,v,o}/kernel (transposed)
    encoder.block.N.layer.1.layer_norm.weight                    -> blocks_N/ff_norm/weight
    encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight -> blocks_N/ff/{wi_0,wi_1,wo}/kernel (transposed)

On disk the layers stay unrolled (blocks_N), so conversion holds one tensor at a time; `load_t5`
stacks them into `blocks/...` with a leading layer axis for the scan, into shardings if given.
    encoder.final_layer_norm.weight                              -> final_norm/weight

`encoder.embed_tokens.weight` is the tied copy of `shared.weight`; when a file holds both they
must be equal (compared in row chunks before anything is written) and one is read. The
architecture is inferred from the tensor shapes, each number from every tensor that shows it
(one corrupt tensor is then named by the shape check, not taken as the architecture);
max_distance and eps (not visible in the shapes) come from the folder's config.json when there
is one, else the v1.1 defaults.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
from safetensors import safe_open
import jax.numpy as jnp

from mochi_jax.checkpoints.orbax_io import Leaf, block_settings, load_model, settings_config, validate, write
from mochi_jax.checkpoints.safetensors_io import ConversionError, TensorSource, json_beside, need_shape, vote
from mochi_jax.models.t5 import T5Config

EMBED, TIED = "shared.weight", "encoder.embed_tokens.weight"
REL_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
FINAL_NORM = "encoder.final_layer_norm.weight"


def _block_keys(n: int) -> dict[str, str]:
    """Our block parameter (path below 'blocks') -> its HF key in block n."""
    a, f = f"encoder.block.{n}.layer.0.", f"encoder.block.{n}.layer.1."
    out = {"attn_norm/weight": a + "layer_norm.weight", "ff_norm/weight": f + "layer_norm.weight"}
    out.update({f"attn/{c}/kernel": a + f"SelfAttention.{c}.weight" for c in "qkvo"})
    out.update({f"ff/{c}/kernel": f + f"DenseReluDense.{c}.weight" for c in ("wi_0", "wi_1", "wo")})
    return out


def open_t5(path) -> TensorSource:
    """Open `path`: a safetensors file, a folder of shards, or a diffusers repo with text_encoder/."""
    path = Path(path)
    if path.is_dir() and (path / "text_encoder").is_dir():
        path = path / "text_encoder"
    src = TensorSource(path)
    if not any(k.startswith("encoder.block.") for k in src.keys()):
        raise ConversionError(f"{src.path}: not a T5 encoder checkpoint (no encoder.block.N.* keys); "
                              f"first keys: {sorted(src.keys())[:5]}")
    return src


# ----------------------------------------------------------------------------- architecture

def infer_config(src: TensorSource) -> T5Config:
    keys = src.keys()
    block_re = re.compile(r"^encoder\.block\.(\d+)\.")
    num_layers = 1 + max(int(m.group(1)) for k in keys if (m := block_re.match(k)))
    num_buckets, num_heads = need_shape(src, REL_BIAS, 2)

    def read(specs):  # every (key, axis) the file holds: each architecture number is voted on by all of them
        return [(k, src.shape(k)[axis]) for k, axis in specs if k in keys and len(src.shape(k)) > axis]

    blocks = [_block_keys(n) for n in range(num_layers)]
    vocab = vote(src, "vocabulary size", read([(EMBED, 0), (TIED, 0)]))
    d_model = vote(src, "model width", read(
        [(EMBED, 1), (TIED, 1), (FINAL_NORM, 0)]
        + [(b[k], axis) for b in blocks for k, axis in (
            ("attn_norm/weight", 0), ("ff_norm/weight", 0), ("attn/q/kernel", 1), ("attn/k/kernel", 1),
            ("attn/v/kernel", 1), ("attn/o/kernel", 0), ("ff/wi_0/kernel", 1), ("ff/wi_1/kernel", 1),
            ("ff/wo/kernel", 0))]))
    inner = vote(src, "attention width", read(
        [(b[k], axis) for b in blocks for k, axis in (("attn/q/kernel", 0), ("attn/k/kernel", 0),
                                                       ("attn/v/kernel", 0), ("attn/o/kernel", 1))]))
    d_ff = vote(src, "feed-forward width", read(
        [(b[k], axis) for b in blocks for k, axis in (("ff/wi_0/kernel", 0), ("ff/wi_1/kernel", 0),
                                                       ("ff/wo/kernel", 1))]))
    if inner % num_heads:
        raise ConversionError(f"{src.path}: the attention width {inner} (of the q, k, v, o weights) is not "
                              f"a multiple of the {num_heads} heads of {REL_BIAS}")
    fields = dict(d_model=d_model, num_layers=num_layers, num_heads=num_heads, d_kv=inner // num_heads,
                  d_ff=d_ff, vocab_size=vocab, num_buckets=num_buckets)

    cfg_file, hf = json_beside(src, "config.json")
    if cfg_file is not None:
        act = hf.get("feed_forward_proj", "gated-gelu")
        if act not in ("gated-gelu", "gated-gelu_new", "gated-gelu_pytorch_tanh"):  # all tanh-approximated
            raise ConversionError(f"{cfg_file}: feed_forward_proj={act!r}; only T5 v1.1 ('gated-gelu') is supported")
        hf_names = dict(d_model="d_model", num_layers="num_layers", num_heads="num_heads", d_kv="d_kv",
                        d_ff="d_ff", vocab_size="vocab_size", num_buckets="relative_attention_num_buckets")
        clash = {ours: (hf[theirs], fields[ours]) for ours, theirs in hf_names.items()
                 if theirs in hf and hf[theirs] != fields[ours]}
        if clash:
            raise ConversionError(f"{cfg_file} disagrees with the tensor shapes in {src.path}: "
                                  + ", ".join(f"{k}: config {a}, tensors {b}" for k, (a, b) in clash.items()))
        fields["max_distance"] = int(hf.get("relative_attention_max_distance", T5Config.max_distance))
        fields["eps"] = float(hf.get("layer_norm_epsilon", T5Config.eps))
    return T5Config(**fields)


def source_shapes(cfg: T5Config, keys: set[str]) -> dict[str, tuple[int, ...]]:
    """Every key the checkpoint must hold, with its PyTorch shape ([out, in] for Linear)."""
    d, i, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
    s = {REL_BIAS: (cfg.num_buckets, cfg.num_heads), FINAL_NORM: (d,)}
    for k in (EMBED, TIED):  # either name, or both (a tied duplicate)
        if k in keys:
            s[k] = (cfg.vocab_size, d)
    if EMBED not in s and TIED not in s:
        s[EMBED] = (cfg.vocab_size, d)
    per_block = {"attn_norm/weight": (d,), "ff_norm/weight": (d,), "attn/q/kernel": (i, d), "attn/k/kernel": (i, d),
                 "attn/v/kernel": (i, d), "attn/o/kernel": (d, i), "ff/wi_0/kernel": (f, d),
                 "ff/wi_1/kernel": (f, d), "ff/wo/kernel": (d, f)}
    for n in range(cfg.num_layers):
        for ours, key in _block_keys(n).items():
            s[key] = per_block[ours]
    return s


def check_tied(src: TensorSource, rows: int = 4096) -> None:
    """If both embedding names are present they must hold the same values (read in row chunks)."""
    if not (EMBED in src.keys() and TIED in src.keys()):
        return
    n = src.shape(EMBED)[0]
    try:
        with safe_open(str(src.file_of(EMBED)), framework="numpy") as ha, \
                safe_open(str(src.file_of(TIED)), framework="numpy") as hb:
            a, b = ha.get_slice(EMBED), hb.get_slice(TIED)
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                if not np.array_equal(np.asarray(a[start:stop]), np.asarray(b[start:stop])):
                    raise ConversionError(f"{TIED!r} in {src.file_of(TIED)} differs from {EMBED!r} in "
                                          f"{src.file_of(EMBED)} (rows {start}:{stop}); they must be tied copies")
    except ConversionError:
        raise
    except Exception as e:  # unreadable data
        raise ConversionError(f"cannot compare {EMBED!r} ({src.file_of(EMBED)}) with {TIED!r} "
                              f"({src.file_of(TIED)}): {e}") from e


def check(src: TensorSource) -> T5Config:
    """Infer the architecture and validate every key and shape; raises ConversionError."""
    cfg = infer_config(src)
    validate(src, source_shapes(cfg, src.keys()))
    check_tied(src)
    return cfg


# ----------------------------------------------------------------------------- our leaves

def plan(cfg: T5Config, src_keys: set[str]) -> list[Leaf]:
    """Our leaves, one per source tensor, so the converter holds one tensor at a time."""
    embed_key = EMBED if EMBED in src_keys else TIED
    leaves = [
        Leaf(("shared", "embedding"), (cfg.vocab_size, cfg.d_model), (embed_key,), lambda s: s.get(embed_key)),
        Leaf(("relative_attention_bias", "embedding"), (cfg.num_buckets, cfg.num_heads), (REL_BIAS,),
             lambda s: s.get(REL_BIAS)),
    ]
    shapes = source_shapes(cfg, src_keys)
    for n in range(cfg.num_layers):  # layers stay unrolled (blocks_N) on disk; load_t5 stacks them
        for ours, key in _block_keys(n).items():
            one = shapes[key][::-1]  # Linear [out, in] -> kernel [in, out]; norms unchanged
            leaves.append(Leaf((f"blocks_{n}", *ours.split("/")), one, (key,),
                               lambda s, key=key: s.get(key).T))
    leaves.append(Leaf(("final_norm", "weight"), (cfg.d_model,), (FINAL_NORM,), lambda s: s.get(FINAL_NORM)))
    return leaves


# ----------------------------------------------------------------------------- entry points

def convert_t5(src_path, out_dir, dtype="bfloat16", overwrite=False, progress=True) -> tuple[Path, T5Config]:
    """Convert a Hugging Face T5 encoder (file, shard folder, or diffusers repo root with
    text_encoder/) into our orbax layout; returns (out_dir, T5Config).

    Every key and shape is checked before anything is written; the output appears only when complete.
    """
    np_dtype = np.dtype(jnp.dtype(dtype))
    src = open_t5(src_path)
    cfg = check(src)
    cfg = dataclasses.replace(cfg, param_dtype=np_dtype.name)
    meta = {"model": "t5_encoder", "source": str(src_path), "config": cfg.arch()}
    out = write(plan(cfg, src.keys()), src, out_dir, np_dtype, meta, overwrite=overwrite,
                progress=progress)
    return out, cfg


def load_t5(path, dtype=None, shardings=None, **overrides) -> tuple[T5Config, dict]:
    """(T5Config, params) from a checkpoint written by `convert_t5`.

    `dtype` casts the floating weights on load; `shardings` (a pytree of jax.sharding.Sharding
    like the params, e.g. built from `t5_logical_axes`) restores each leaf straight into its
    shards. `overrides` set non-architecture config fields (compute_dtype, ...); param_dtype
    follows the loaded weights.
    """
    return load_model(path, "t5_encoder", T5Config, dtype, shardings, overrides,
                      stack=lambda arch: ("blocks", int(arch["num_layers"])))


# how T5 runs, as every command's config names it: config key -> load_t5 keyword (T5Config field)
T5_SETTINGS = {"t5_compute_dtype": "compute_dtype"}


def t5_settings(block) -> dict:
    """The keywords of `load_t5(path, **t5_settings(block))` (and of lib.text.TextEncoder.load) from a
    command's config block (the `model` block of configs/common.py, or prepare's flat config):
    `t5_dtype` -> dtype (the weights cast on load; '' keeps the stored dtype), `t5_compute_dtype` ->
    compute_dtype. A key the block lacks is left to T5Config's default."""
    return block_settings(block, "t5_dtype", T5_SETTINGS)


def t5_config(block, arch: dict, stored_dtype: str) -> T5Config:
    """The T5Config `load_t5(path, **t5_settings(block))` returns, without reading a weight: the
    architecture `arch` (a checkpoint's metadata config) and the block's settings; the weights are
    `stored_dtype` (the checkpoint's) unless the block's `t5_dtype` casts them."""
    return settings_config(T5Config, t5_settings(block), arch, stored_dtype)
