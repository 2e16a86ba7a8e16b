"""safetensors files, read and written without PyTorch and without safetensors' own writer.

  * `TensorSource` - the tensors of one file, or a folder of shards (with or without an
    `*.index.json`): headers parsed and checked up front, each tensor read on demand with one
    positioned read of its bytes. Pickle formats are refused.
  * `write_safetensors` / `LazyTensor` - write a file atomically (`files.write_atomically`), one
    tensor at a time, a LazyTensor built only when its turn comes.
  * `header_metadata` - a file's `__metadata__` strings.
  * `need_shape` / `vote` / `json_beside` - what the model converters read an architecture from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import ml_dtypes

from mochi_jax.checkpoints.files import write_atomically

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file and key."""


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




def header_metadata(path) -> dict:
    """The `__metadata__` strings of one safetensors file's header ({} when it has none)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__") or {}
