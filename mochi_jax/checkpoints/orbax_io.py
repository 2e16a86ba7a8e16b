"""Our checkpoint format (orbax, custom metadata {'model', 'config'}): streaming a conversion into it
leaf by leaf, atomically, and reading and writing whole models.

  * `Leaf` - one output array: its path in our pytree, shape, and a function that builds it
    from the source (reading only the tensors it needs).
  * `validate` / `write` - check a plan against the source, then stream it into orbax.
  * `load_tree` / `load_model` / `save_model` - read a converted checkpoint (into shardings, with
    scanned layer stacks restacked) and write any params tree in the same layout.
  * `read_metadata` - a checkpoint's custom metadata (the model and its architecture).
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from orbax.checkpoint.experimental.v1 import partial
from tqdm import tqdm
import orbax.checkpoint.experimental.v1 as ocp

from mochi_jax.checkpoints.files import as_disk_error, writable_dir
from mochi_jax.checkpoints.safetensors_io import ConversionError, TensorSource
from mochi_jax.models.layers import stack_layers, unstack_shardings


@dataclasses.dataclass
class Leaf:
    """One output array. `build(src)` returns it (already in its final layout)."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    keys: tuple[str, ...]  # source keys it reads, for validation
    build: Callable[["TensorSource"], np.ndarray]
    dtype: object = None  # written as built (a quantized kernel, its float32 scale); None: `write`'s dtype


def validate(src: TensorSource, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Every expected key present with its shape, and nothing else. Raises naming the key and file."""
    found = src.keys()
    missing = sorted(set(expected) - found)
    extra = sorted(found - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys (not in {src.path}): {missing[:20]}" + (" ..." if len(missing) > 20 else ""))
    if extra:
        problems.append("unexpected keys: " + ", ".join(f"{k!r} in {src.file_of(k)}" for k in extra[:20])
                        + (" ..." if len(extra) > 20 else ""))
    for k in sorted(set(expected) & found):
        if tuple(src.shape(k)) != tuple(expected[k]):
            problems.append(f"key {k!r} in {src.file_of(k)} has shape {tuple(src.shape(k))}, "
                            f"expected {tuple(expected[k])}")
    if problems:
        raise ConversionError("checkpoint does not match the model:\n  " + "\n  ".join(problems))


def nest(flat: Mapping[tuple[str, ...], object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def write(leaves: Sequence[Leaf], src: TensorSource, out_dir: str | os.PathLike, dtype,
          metadata: Mapping, overwrite: bool = False, progress: bool = True,
          batch_bytes: int = 64 * 2 ** 20) -> Path:
    """Build each leaf, cast it to `dtype` and add it to an orbax checkpoint.

    Leaves are written in batches of at most `batch_bytes` (or one leaf, if larger), so host
    memory stays near one batch: orbax stages a copy of what it writes, about 3x a batch at
    the peak. The checkpoint appears at `out_dir` only when complete (orbax stages a partial
    save in a side directory and renames it on finalize), so a crash never leaves a loadable
    half. `metadata` (JSON) is stored as the checkpoint's custom metadata.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory (a checkpoint is a folder; this is a file)",
                                 str(out_dir))
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir} exists; pass --overwrite to replace it")
    writable_dir(out_dir.parent)  # a read-only, missing or full place fails here, naming it
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for stale in out_dir.parent.glob(out_dir.name + ".partial_save*"):
        shutil.rmtree(stale)  # left by an earlier, interrupted conversion
    batch: dict[tuple[str, ...], np.ndarray] = {}
    size, first = 0, True

    def flush():
        nonlocal batch, size, first
        if batch:
            partial.save(out_dir, nest(batch), custom_metadata=dict(metadata) if first else None)
            batch, size, first = {}, 0, False
            _release_freed_memory()

    try:
        for leaf in tqdm(leaves, desc=f"converting -> {out_dir.name}", disable=not progress, unit="tensor"):
            arr = leaf.build(src)
            if tuple(arr.shape) != tuple(leaf.shape):
                raise ConversionError(f"internal: {'/'.join(leaf.path)} built with shape {arr.shape}, "
                                      f"expected {leaf.shape}")
            shape = arr.shape  # np.ascontiguousarray makes 0-d arrays 1-d; keep scalars scalar
            want = leaf.dtype if leaf.dtype is not None else dtype if arr.dtype.kind == "f" else arr.dtype
            arr = np.ascontiguousarray(arr.astype(want, copy=False))
            arr = arr.reshape(shape)
            if batch and size + arr.nbytes > batch_bytes:
                flush()
            batch[leaf.path] = arr
            size += arr.nbytes
            del arr
        flush()
        partial.finalize(out_dir)
    except BaseException as e:
        for stale in out_dir.parent.glob(out_dir.name + ".partial_save*"):
            shutil.rmtree(stale, ignore_errors=True)  # nothing half written is left
        failed = as_disk_error(e, out_dir)
        if failed is e:
            raise
        raise failed from None
    return out_dir


def _release_freed_memory():
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so that the resident
    size stays near one tensor instead of creeping up with every leaf written."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _ReRaisedInCaller(logging.Filter):
    """orbax logs every exception of its writer threads with a traceback (ERROR:absl:...), then raises
    it in the caller, where the commands name it in one line: those log records are dropped."""

    RERAISED = ("raised an exception", "in background save thread", "thread (save_finalize) failed")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.RERAISED)


logging.getLogger("absl").addFilter(_ReRaisedInCaller())
_unraisable = sys.unraisablehook


def _closed_loop_is_quiet(unraisable) -> None:
    """After a failed write, tensorstore's callbacks of the writes still in flight find orbax's event
    loop closed and each prints a traceback ('Event loop is closed'); the failure itself is raised."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        _unraisable(unraisable)


sys.unraisablehook = _closed_loop_is_quiet

CONVERT = "tools/convert_weights.py {dit|t5|vae|clip} <the official weights> "  # how a checkpoint is made


def read_metadata(path: str | os.PathLike) -> dict:
    """The custom metadata stored by `write` (e.g. the model architecture). A missing path or one
    that holds no converted checkpoint is named, with the command that makes one."""
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, f"No such checkpoint (make one with {CONVERT}{path})", str(path))
    try:
        meta = ocp.metadata(path)
    except Exception:  # noqa: BLE001 - orbax's own words are about its layouts, not about this project
        raise ValueError(f"{path} is not a checkpoint written by tools/convert_weights.py (make one with "
                         f"{CONVERT}{path})") from None
    cm = meta.custom_metadata
    return json.loads(cm) if isinstance(cm, str) else dict(cm or {})


# ----------------------------------------------------------------------------- loading and saving

def load_tree(path, dtype=None, shardings=None):
    """Restore a converted checkpoint. `shardings`: a pytree of jax.sharding.Sharding matching the
    checkpoint (each process then reads only its shards), or one Sharding for every leaf (default:
    this process's first device); `dtype` casts floating leaves."""
    path = Path(path).absolute()
    meta = ocp.metadata(path).metadata

    def abstract(m, s=None):
        dt = m.dtype
        if dtype is not None and jnp.issubdtype(dt, jnp.floating):
            dt = jnp.dtype(dtype)
        return jax.ShapeDtypeStruct(m.shape, dt, sharding=s)

    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        one = shardings or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, meta)
    target = jax.tree_util.tree_map(abstract, meta, shardings)
    return ocp.load(path, target)


def block_settings(block, dtype_key: str, fields: Mapping[str, str]) -> dict:
    """The keywords of `load_model`'s wrappers (load_vae, load_t5) from a command's config block:
    block[dtype_key] -> dtype (the weights cast on load; '' keeps the stored dtype) and each
    block[key] -> keyword `fields[key]` (a config field; lists become tuples). A key the block lacks
    is left to the config class's default."""
    out = {"dtype": block.get(dtype_key) or None}
    for key, field in fields.items():
        value = block.get(key)
        if value is not None:
            out[field] = tuple(value) if isinstance(value, (list, tuple)) else value
    return out


def settings_config(cfg_cls, settings: dict, arch: dict, stored_dtype: str):
    """The config `load_model` returns for `settings` (`block_settings`), without reading a weight: the
    architecture `arch` (a checkpoint's metadata config); the weights are `stored_dtype` (the
    checkpoint's) unless the settings' dtype casts them."""
    kw = dict(settings)
    dtype = kw.pop("dtype") or stored_dtype
    return cfg_cls.from_dict({**arch, **kw, "param_dtype": jnp.dtype(dtype).name})


def load_model(path, model: str, cfg_cls, dtype=None, shardings=None, overrides=None, stack=None):
    """(config, params) from a checkpoint written by tools/convert_weights.py.

    `model`: the metadata's model name ('mochi_dit', ...), checked. `stack(arch) -> (name, n)`:
    the unrolled layers name_0 .. name_{n-1} on disk to stack for a scan, straight into
    `shardings` (given for the stacked layout). The config is the stored architecture plus
    `overrides`; param_dtype follows the loaded weights."""
    meta = read_metadata(path)
    if meta.get("model") != model:
        raise ValueError(f"{path} is not a converted {model} checkpoint (metadata: {meta})")
    if stack is None:
        params = load_tree(path, dtype=dtype, shardings=shardings)
    else:
        name, n = stack(meta["config"])
        disk = unstack_shardings(shardings, name, n) if shardings is not None else None
        params = stack_layers(load_tree(path, dtype=dtype, shardings=disk), name, n, shardings)
    fields = dict(meta["config"], **(overrides or {}))
    fields.setdefault("param_dtype", jnp.dtype(jax.tree_util.tree_leaves(params)[0].dtype).name)
    return cfg_cls.from_dict(fields), params


def save_model(path, params, model: str, arch: dict, unstack=(), dtype=None, overwrite=False,
               progress=False, extra_metadata=None):
    """Write `params` as a checkpoint `load_model` reads: the layout tools/convert_weights.py writes
    (orbax, custom metadata {'model', 'config': arch}). `unstack`: [(path, n), ...] of scanned layer
    stacks to write unrolled, e.g. [('blocks', 47)] or [(('vision', 'blocks'), 12)] ->
    blocks_0 .. blocks_46; `dtype` casts floating leaves. Used for merged LoRA checkpoints and the
    demo's random tiny models; appears atomically like a conversion."""
    stacks = {(p,) if isinstance(p, str) else tuple(p): n for p, n in unstack}
    flat = {}
    for p, x in traverse_util.flatten_dict(params).items():
        prefix = next((q for q in stacks if p[:len(q)] == q), None)
        if prefix is None:
            flat[p] = (x, None)
            continue
        for i in range(stacks[prefix]):
            flat[prefix[:-1] + (f"{prefix[-1]}_{i}",) + p[len(prefix):]] = (x, i)

    def build(x, i):
        return lambda _src: np.asarray(x if i is None else x[i])

    leaves = [Leaf(p, tuple(x.shape[1:] if i is not None else x.shape), (), build(x, i))
              for p, (x, i) in flat.items()]
    meta = {"model": model, "config": arch, **(extra_metadata or {})}
    np_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else jax.tree_util.tree_leaves(params)[0].dtype))
    return write(leaves, None, path, np_dtype, meta, overwrite=overwrite, progress=progress)
