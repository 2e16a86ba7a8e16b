"""Streaming checkpoint conversion: read safetensors one tensor at a time, validate every key
and shape before anything is written, write an orbax checkpoint leaf by leaf, atomically.

The pieces every model converter shares:
  * `TensorSource` - the tensors of one file, a folder of shards (with or without an
    `*.index.json`): headers parsed and checked up front, each tensor read on demand with one
    positioned read of its bytes. Pickle formats are refused.
  * `Leaf` - one output array: its path in our pytree, shape, and a function that builds it
    from the source (reading only the tensors it needs).
  * `validate` / `write` - check a plan against the source, then stream it into orbax.
  * `load_tree` / `load_model` / `save_model` - read a converted checkpoint (into shardings, with
    scanned layer stacks restacked) and write any params tree in the same layout.
  * `write_atomically` / `writable_dir` - the project's file writes: whole files only, with the
    permissions any other program's new files get (the umask), errors naming the real path.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from orbax.checkpoint.experimental.v1 import partial
from tqdm import tqdm
import ml_dtypes
import orbax.checkpoint.experimental.v1 as ocp

from mochi_jax.models.layers import stack_layers, unstack_shardings

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file and key."""


# ----------------------------------------------------------------------------- writing files

def _named(e: OSError, path) -> OSError:
    """The same OSError (same type, errno and reason) naming `path` instead of a temporary file."""
    return type(e)(e.errno, e.strerror or str(e), str(path)) if e.errno else OSError(f"{path}: {e}")


def make_dirs(folder) -> Path:
    """mkdir -p, with a file in the way named as such (NotADirectoryError naming that file)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        in_the_way = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory (a file is in the way)", str(in_the_way)) from e
    except OSError as e:
        raise _named(e, e.filename or folder) from e
    return folder


def writable_dir(folder) -> Path:
    """Make `folder` (and its parents) and check that files can be created in it, before any work
    is spent on what goes there. Raises the OSError (PermissionError, NotADirectoryError, EROFS,
    ENOSPC, ...) naming the folder, never a probe file."""
    folder = make_dirs(folder)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise _named(e, folder) from e
    return folder


def write_atomically(path, data: bytes | str | Callable) -> Path:
    """Write `data` (bytes, text, or a function that writes to a binary file object) to `path`
    through a temporary file in the same folder, renamed into place when complete: a reader sees
    no file or the whole file. The file is created with open(), so it has the permissions any
    program's new file gets (0o666 minus the umask). An error (no such folder, permission, a
    read-only or full file system, `path` being a folder) names `path`, not the temporary file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory (a file name is needed)", str(path))
    make_dirs(path.parent)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        raise _named(e, path) from e
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder: there is nothing to remove
            pass
    return path


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor for `write_safetensors` that is built only when its bytes are written."""

    shape: tuple[int, ...]
    dtype: np.dtype
    build: Callable[[], np.ndarray]


_ST_NAME = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
            np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
            np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
            np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3", np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2"}


def write_safetensors(path, tensors: Mapping[str, "np.ndarray | LazyTensor"],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file with `write_atomically`, one tensor at a time (a LazyTensor is
    built when its turn comes, so a whole model never sits in memory twice). safetensors' own
    save_file writes a private temporary file (mode 0600, unreadable to another user's ComfyUI
    or sampling service) and its errors name that file; this writes the same format itself."""
    entries, header, offset = [], {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for key, t in tensors.items():
        shape, dtype = (tuple(t.shape), np.dtype(t.dtype))
        if dtype not in _ST_NAME:
            raise ValueError(f"{path}: tensor {key!r} has dtype {dtype}, which safetensors cannot store")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _ST_NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        entries.append((key, t, shape, dtype))
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f):
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for key, t, shape, dtype in entries:
            x = t.build() if isinstance(t, LazyTensor) else t
            x = np.asarray(x, dtype=dtype.newbyteorder("<"))
            if x.shape != shape:
                raise ValueError(f"{path}: tensor {key!r} was built with shape {x.shape}, announced {shape}")
            f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)

    return write_atomically(path, write)


class TensorSource:
    """Lazy view of the tensors in one safetensors file or a folder of them.

    `prefixes` are stripped from key names (e.g. 'model.diffusion_model.' of ComfyUI files).
    """

    def __init__(self, path: str | os.PathLike, prefixes: Sequence[str] = ()):
        self.path = Path(path)
        self.files = _safetensors_files(self.path)
        self._where: dict[str, tuple[Path, str]] = {}  # key -> (file, key in file)
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self._offsets: dict[str, tuple[int, int]] = {}  # absolute byte range in its file
        for f in self.files:
            for raw_key, shape, dtype, offsets in _read_header(f):
                key = raw_key
                for p in prefixes:
                    if key.startswith(p):
                        key = key[len(p):]
                        break
                if key in self._where:
                    raise ConversionError(f"key {key!r} appears twice: in {self._where[key][0]} and {f}")
                self._where[key] = (f, raw_key)
                self._meta[key] = (shape, dtype)
                self._offsets[key] = offsets

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def file_of(self, key: str) -> Path:
        return self._where[key][0]

    def get(self, key: str) -> np.ndarray:
        """Read one tensor as a NumPy array (bfloat16 stays bfloat16 via ml_dtypes).

        A plain positioned read of exactly this tensor's bytes: no memory map, so the
        process never holds more of the file than the tensor being converted."""
        f, raw = self._where[key]
        shape, dtype = self._meta[key]
        start, stop = self._offsets[key]
        try:
            with open(f, "rb") as h:
                h.seek(start)
                data = h.read(stop - start)
            if len(data) != stop - start:
                raise ValueError(f"read {len(data)} of {stop - start} bytes")
            return np.frombuffer(data, dtype=_np_dtype(dtype)).reshape(shape)
        except Exception as e:  # truncated data, unknown dtype, ...
            raise ConversionError(f"cannot read tensor {raw!r} from {f}: {e}") from e


def _np_dtype(st_dtype: str) -> np.dtype:
    table = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
             "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    if st_dtype not in table:
        raise ValueError(f"unsupported safetensors dtype {st_dtype}")
    return np.dtype(table[st_dtype])


def _safetensors_files(path: Path) -> list[Path]:
    if not path.exists():
        raise ConversionError(f"{path} does not exist")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise ConversionError(
                f"{path}: pickled PyTorch checkpoints are not read (unpickling runs arbitrary code); "
                f"convert it to safetensors first, e.g. safetensors.torch.save_file(torch.load(f, "
                f"weights_only=True), 'model.safetensors')")
        if path.suffix != ".safetensors":
            raise ConversionError(f"{path}: expected a .safetensors file")
        return [path]
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        try:
            weight_map = json.loads(index[0].read_text())["weight_map"]
        except Exception as e:
            raise ConversionError(f"{index[0]}: not a valid safetensors index ({e})") from e
        files = sorted({path / v for v in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ConversionError(f"{index[0]} names shard files that do not exist: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        extra = f" (found pickled files {pickles}, which are not read)" if pickles else ""
        raise ConversionError(f"{path}: no .safetensors files{extra}")
    return files


_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _read_header(f: Path) -> list[tuple[str, tuple[int, ...], str, tuple[int, int]]]:
    """Parse a safetensors header and check that the file holds all the bytes it promises."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as h:
            n = int.from_bytes(h.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            header = json.loads(h.read(n))
    except Exception as e:
        raise ConversionError(f"{f}: not a valid safetensors file (truncated or corrupt: {e})") from e
    end = 0
    out = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        shape = tuple(int(s) for s in info["shape"])
        dtype = info["dtype"]
        start, stop = info["data_offsets"]
        if stop - start != int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES.get(dtype, 0):
            raise ConversionError(f"{f}: tensor {key!r} has {stop - start} bytes for shape {shape} {dtype}")
        end = max(end, stop)
        out.append((key, shape, dtype, (8 + n + start, 8 + n + stop)))
    if 8 + n + end > size:
        cut = [key for key, _, _, (_, stop) in out if stop > size]
        raise ConversionError(f"{f}: file is truncated ({size} bytes, its header promises {8 + n + end}); "
                              f"{len(cut)} of its {len(out)} tensors do not fit: "
                              + ", ".join(repr(k) for k in cut[:20]) + (" ..." if len(cut) > 20 else ""))
    return out


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


def need_shape(src, key: str, ndim: int | None = None) -> tuple[int, ...]:
    """The shape of a tensor the architecture is read from: it must exist (and have `ndim` dimensions)."""
    if key not in src.keys():
        raise ConversionError(f"{src.path}: key {key!r} is missing (needed to infer the architecture)")
    shape = tuple(src.shape(key))
    if ndim is not None and len(shape) != ndim:
        raise ConversionError(f"key {key!r} in {src.file_of(key)} has shape {shape}, expected {ndim} dimensions")
    return shape


def vote(src, field: str, readings) -> int:
    """An architecture number read from every tensor that shows it: `readings` are (key, value)
    pairs (keys the file lacks are left out by the caller). The value most of them give wins,
    so one corrupt tensor cannot change the architecture (`validate` then names that tensor,
    with the shape the others imply); a tie between the most common values is an error naming
    the tensors behind each."""
    readings = [(k, int(v)) for k, v in readings]
    if not readings:
        raise ConversionError(f"{src.path}: no tensor shows the {field} (needed to infer the architecture)")
    counts: dict[int, list[str]] = {}
    for k, v in readings:
        counts.setdefault(v, []).append(k)
    ranked = sorted(counts.items(), key=lambda kv: -len(kv[1]))
    if len(ranked) > 1 and len(ranked[0][1]) == len(ranked[1][1]):
        tied = [(v, ks) for v, ks in ranked if len(ks) == len(ranked[0][1])]
        raise ConversionError(f"{src.path}: the tensors disagree on the {field} and no value has more of them: "
                              + "; ".join(f"{v} from {', '.join(repr(k) for k in ks[:5])}"
                                          + (" ..." if len(ks) > 5 else "") for v, ks in tied))
    return ranked[0][0]


def json_beside(src, name: str) -> tuple[Path | None, dict]:
    """(path, parsed JSON) of the file `name` in the checkpoint's folder, or (None, {}) if there is none."""
    f = (src.path if src.path.is_dir() else src.path.parent) / name
    if not f.is_file():
        return None, {}
    try:
        return f, json.loads(f.read_text())
    except Exception as e:
        raise ConversionError(f"{f}: not valid JSON ({e})") from e


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


def read_metadata(path: str | os.PathLike) -> dict:
    """The custom metadata stored by `write` (e.g. the model architecture)."""
    meta = ocp.metadata(Path(path).absolute())
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
        one = shardings or jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree_util.tree_map(lambda _: one, meta)
    target = jax.tree_util.tree_map(abstract, meta, shardings)
    return ocp.load(path, target)


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
