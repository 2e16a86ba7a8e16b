"""Reading wandb's offline runs back (tests/test_wandb.py, tests/test_train.py): the records of a
run's .wandb file, its history rows, its records of one kind."""

import json
import struct
import time
from pathlib import Path

import pytest


def records(path: Path) -> list:
    """The records of a .wandb file: wandb's log format (a 7-byte header ':W&B', 0xBEE1, version; then
    32 KiB blocks of chunks, each crc32 (4 bytes), length (2), type (1: whole, 2 / 3 / 4: first /
    middle / last part) and data), each record a wandb_internal_pb2.Record."""
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, path
    pos, block, out, parts = 7, 32768, [], b""
    while pos < len(data):
        left = block - pos % block
        if left < 7:  # too short for a chunk header: padding to the next block
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zeros: the rest of the block is padding
            pos += left
            continue
        body, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(body)
        elif kind == 2:
            parts = body
        elif kind == 3:
            parts += body
        else:
            out.append(parts + body)
    proto = pytest.importorskip("wandb.proto.wandb_internal_pb2")  # wandb's own record format
    return [proto.Record.FromString(b) for b in out]


def offline_runs(wandb_dir: Path, timeout: float = 60.0) -> list[Path]:
    """The offline runs in `wandb_dir`, in launch order, once each one's file is complete: wandb's
    service writes it on after finish() returns, up to the run's exit record."""
    t0 = time.time()
    while True:
        runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
        files = [next(iter(run.glob("run-*.wandb")), None) for run in runs]
        if all(f is not None and any(r.WhichOneof("record_type") == "exit" for r in records(f)) for f in files):
            return runs
        assert time.time() - t0 < timeout, f"an offline run of {wandb_dir} has no exit record"
        time.sleep(0.2)


def history(run_folder: Path) -> list[dict]:
    """The history rows of an offline run: {key: value, '_step': step}, values JSON-decoded."""
    wandb_file, = run_folder.glob("run-*.wandb")
    return [{("/".join(i.nested_key) if i.nested_key else i.key): json.loads(i.value_json) for i in r.history.item}
            for r in records(wandb_file) if r.WhichOneof("record_type") == "history"]


def all_of(run_folder: Path, kind: str) -> list:
    """The records of one kind ('run', 'exit', 'preempting', ...) of an offline run."""
    wandb_file, = run_folder.glob("run-*.wandb")
    return [getattr(r, kind) for r in records(wandb_file) if r.WhichOneof("record_type") == kind]
