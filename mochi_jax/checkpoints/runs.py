"""The LoRA of a training run directory, and LoRA specs as the commands take them.

A run directory (written by `python -m mochi_jax.train`) holds `config.json` (the run's settings,
its LoRA targets among them) and `checkpoints/<step>/` (orbax: the train state under `state/`,
the data loader's position under `data/`). A checkpoint is complete once orbax has written its
`_CHECKPOINT_METADATA`; a step folder without it (a save or a clean-up interrupted by a kill) and
orbax's temporary folders are passed over, so readers always take the newest complete checkpoint.

    factors, targets = load_run_lora("runs/mine")                 # the newest complete checkpoint
    lora = load_loras("style.safetensors:0.8,runs/mine", dit_cfg)  # one combined adapter, or None

A sweep (several LoRAs trained together, configs/lora.py `sweep`; `sweep_variants` expands it into
each variant's own config) keeps in its run directory one stacked
train state; `runs/search/variants/<name>` names one of its LoRAs (the folder need not exist yet:
the newest checkpoint is read), and `expand_sweeps` turns the run directory into all of them.

The trainer writes and restores its checkpoints through `checkpoint_manager`, `save_checkpoint`
and `restore_checkpoint` here, so the layout is defined in this one file. While it runs, it holds
the run directory's lock (`RunLock`): a second trainer on the same directory is refused.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mochi_jax.checkpoints import lora_read
from mochi_jax.models import lora as lora_lib

COMPLETE_MARKER = "_CHECKPOINT_METADATA"  # orbax writes it last, when a step's checkpoint is whole


def complete_steps(checkpoint_dir) -> list[int]:
    """Steps of the complete checkpoints in `checkpoint_dir` (ascending); half-written or
    half-deleted step folders and orbax's temporaries are left out."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / COMPLETE_MARKER).is_file() and (p / "state").is_dir())


def incomplete_steps(checkpoint_dir) -> list[int]:
    """Steps whose folder is there but incomplete (no `_CHECKPOINT_METADATA` or no `state/`): a save
    or a clean-up of old checkpoints killed half way. orbax's CheckpointManager lists them as steps."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    done = set(complete_steps(d))
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) not in done)


def remove_partial(checkpoint_dir) -> None:
    """Remove orbax's temporary folders of saves that did not finish (process 0 only)."""
    d = Path(checkpoint_dir)
    if jax.process_index() == 0 and d.is_dir():
        for p in d.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(p, ignore_errors=True)


def checkpoint_manager(checkpoint_dir, keep: int) -> ocp.CheckpointManager:
    """The trainer's orbax CheckpointManager: the last `keep` checkpoints are kept; orbax's temporary
    folders of an interrupted save are removed when it starts."""
    return ocp.CheckpointManager(Path(checkpoint_dir).absolute(), options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True))


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, data: dict) -> None:
    """Save the train state {step, lora, opt, rng} as `state/` and the data loader's position (JSON)
    as `data/` of checkpoint `step` (asynchronously; atomic once finished)."""
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
                 force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, abstract_state):
    """(train state, data loader position) of checkpoint `step`, the state restored into the
    shapes, dtypes and shardings of `abstract_state` (ShapeDtypeStructs)."""
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]


LOCK_FILE = "run.lock"


class RunInUse(ValueError):
    """Another trainer holds the run directory."""


def _holder_alive(holder: dict) -> bool:
    """Whether the process a lock file names may still run: False only when it was on this host and
    no process of that pid is left."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class RunLock:
    """The run directory's lock, held by the one trainer that writes it (`with RunLock(run_dir):`).

    It is a kernel file lock (flock) on `run_dir/run.lock`, which names its holder (host, pid, start
    time, command): the kernel releases it when the holder ends, however it ends (a SIGKILL too), so
    a lock is never left stuck. A second trainer is refused with RunInUse naming the holder. On a
    file system without flock the file alone is the lock: a holder that ended is taken over (the
    file is emptied on the way out; one killed on this host is found by its pid)."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self.file = None

    def _refuse(self, holder: dict):
        who = (f"process {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}: "
               f"{holder.get('command')}") if holder else "another process"
        raise RunInUse(f"{self.path.parent} is in use by another trainer ({who}); wait for it to end or stop it "
                       f"(it resumes from its checkpoints), or choose another --config.run_dir")

    def _read(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def __enter__(self) -> "RunLock":
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            self._refuse(self._read())
        except OSError as e:  # no flock on this file system: the file names a live holder or a dead one
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            holder = self._read()
            if holder and holder.get("pid") != os.getpid() and _holder_alive(holder):
                self.file.close()
                self._refuse(holder)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join([os.path.basename(sys.executable), *sys.argv])[:300]}
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps(holder) + "\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.truncate(0)  # no holder named; the file stays (removing it would race a new holder)
            self.file.close()  # releases the flock
            self.file = None


def damage(e: BaseException) -> str:
    """What went wrong reading a checkpoint, in one short line (tensorstore's specs left out)."""
    text = " ".join(str(e).split("See full TensorStore details")[0].split()) or type(e).__name__
    return text[:200] + ("..." if len(text) > 200 else "")


def restore_newest(manager: ocp.CheckpointManager, abstract_state, say=print):
    """(step, train state, data loader position) of the newest complete checkpoint that restores, or
    (None, None, None). A damaged one (files missing or truncated inside it) is moved aside to
    `<step>.damaged` (kept for a look; no step of orbax's any more), named by `say` in one line,
    and the next older one is tried. Every process restores; a checkpoint any of them cannot read
    is damaged for all."""
    folder = Path(manager.directory)
    for step in reversed(complete_steps(folder)):
        why = None
        try:
            state, data = restore_checkpoint(manager, step, abstract_state)
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds for a damaged file
            why = damage(e)
        if jax.process_count() > 1:
            bad = multihost_utils.process_allgather(np.int32(why is not None))
            why = why or ("unreadable on another process" if bad.any() else None)
        if why is None:
            return step, state, data
        if jax.process_index() == 0:
            shutil.rmtree(folder / f"{step}.damaged", ignore_errors=True)  # one set aside before, at this step
            os.replace(folder / str(step), folder / f"{step}.damaged")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"mochi_jax: checkpoint {step} set aside")
        say(f"checkpoint {folder / str(step)} is damaged ({why}); moved to {step}.damaged, trying the one before")
        manager.reload()
    return None, None, None


def run_config(run_dir) -> ml_collections.ConfigDict:
    """A run's settings, from its config.json."""
    config = Path(run_dir) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{Path(run_dir)} is not a training run directory (no config.json)")
    return ml_collections.ConfigDict(json.loads(config.read_text()))


# ----------------------------------------------------------------------------- a sweep's variants

# the fields a sweep variant may set; everything else (data, batch, model, noise, schedule of the run) is shared
VARIANT_FIELDS = ("lora", "optim", "seed")


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--config.{flag}={text!r}: expected comma-separated numbers, e.g. "
                         f"{'4,8' if kind is int else '1e-4,3e-5'}") from None


def _merge(node: ml_collections.ConfigDict, overrides: dict, where: str, name: str) -> None:
    for key, value in overrides.items():
        path = f"{where}.{key}"
        if isinstance(value, dict):
            if key not in node:
                if where != "lora":  # a new LoRA target may be added; nothing else is new
                    raise ValueError(f"sweep.variants.{name}: {path} is not a field of the training config")
                node[key] = ml_collections.ConfigDict(value)
                continue
            _merge(node[key], dict(value), path, name)
        elif key not in node:
            raise ValueError(f"sweep.variants.{name}: {path} is not a field of the training config")
        else:
            node[key] = value


def sweep_variants(cfg) -> list[tuple[str, ml_collections.ConfigDict]]:
    """[(name, the variant's own training config)] of the sweep in `cfg.sweep` (a grid in the order of
    its lists, explicit variants in name order); [] when the
    config trains one LoRA. A variant's config is `cfg` with its overrides and no sweep: the config a
    run of that LoRA alone would have (its run folder's config.json)."""
    sw = cfg.get("sweep")
    if sw is None:
        return []
    ranks, lrs = _numbers(sw.rank, int, "sweep.rank"), _numbers(sw.lr, float, "sweep.lr")
    explicit = {k: (v.to_dict() if hasattr(v, "to_dict") else dict(v)) for k, v in dict(sw.variants).items()}
    if explicit and (ranks or lrs):
        raise ValueError("sweep: give either sweep.rank / sweep.lr (a grid) or sweep.variants, not both")
    if ranks or lrs:
        for r, lr in [(r, lr) for r in (ranks or [None]) for lr in (lrs or [None])]:
            name, over = [], {}
            if r is not None:
                if r < 1:
                    raise ValueError(f"--config.sweep.rank: ranks must be >= 1, got {r}")
                over["lora"] = {k: {"rank": r, "alpha": float(t.alpha) * r / t.rank}
                                for k, t in cfg.lora.items() if t.rank > 0}
                name.append(f"r{r}")
            if lr is not None:
                over["optim"] = {"lr": lr}
                name.append(f"lr{lr:.0e}")
            explicit["_".join(name)] = over
    out = []
    for name, over in explicit.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise ValueError(f"sweep.variants: {name!r} is not a usable variant name (letters, digits, _ . + -; "
                             f"it names the variant's folder and metrics)")
        bad = sorted(set(over) - set(VARIANT_FIELDS))
        if bad:
            raise ValueError(f"sweep.variants.{name} sets {', '.join(bad)}; a variant may set only "
                             f"{', '.join(VARIANT_FIELDS)} (the rest of the run is shared)")
        v = ml_collections.ConfigDict(cfg.to_dict())
        v.sweep = ml_collections.ConfigDict(dict(rank="", lr="", variants={}))
        for key, value in over.items():
            if isinstance(value, dict):
                _merge(v[key], value, key, name)
            else:
                v[key] = value
        out.append((name, v))
    return out


def sweep_names(run_dir) -> list[str]:
    """The names of the LoRAs a sweep's run directory trains; [] for a run of one LoRA."""
    return [name for name, _ in sweep_variants(run_config(run_dir))]


def split_variant(path) -> tuple[Path, str | None]:
    """'runs/search/variants/r4' -> (runs/search, 'r4') when runs/search is a sweep's run directory;
    any other path -> (path, None)."""
    p = Path(path)
    if p.parent.name == "variants" and (p.parent.parent / "config.json").is_file() and not (p / "checkpoints").is_dir():
        if p.name in sweep_names(p.parent.parent):
            return p.parent.parent, p.name
    return p, None


def expand_sweeps(items: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """parse_loras' items with every sweep run directory replaced by its variants, in order."""
    out = []
    for path, strength in items:
        p = Path(path)
        names = sweep_names(p) if (p / "config.json").is_file() else []
        out += [(str(p / "variants" / n), strength) for n in names] if names else [(path, strength)]
    return out


def load_run_lora(run_dir, step: int | None = None):
    """(factors, targets) of a training run: the LoRA of checkpoint `step` (default: the newest
    complete one; `run_dir` may also name one, <run>/checkpoints/<step>) as numpy arrays on the
    host, with the targets of the run's config.json. Reads
    only the train state's LoRA, whatever mesh or hosts wrote it. For a sweep, `run_dir` is
    <run>/variants/<name>: that variant's LoRA."""
    run_dir = Path(run_dir).absolute()
    if run_dir.parent.name == "checkpoints" and run_dir.name.isdigit() and step is None:
        run_dir, step = run_dir.parent.parent, int(run_dir.name)  # <run>/checkpoints/<step>: that checkpoint
    run_dir, variant = split_variant(run_dir)
    cfg = run_config(run_dir)
    variants = dict(sweep_variants(cfg))
    if variants and variant is None:
        raise ValueError(f"{run_dir} trains a sweep of {len(variants)} LoRAs; name one as {run_dir}/variants/<name> "
                         f"(<name>: {', '.join(variants)})")
    targets = lora_lib.targets_from_config((variants[variant] if variant else cfg).lora.to_dict())
    steps = complete_steps(run_dir / "checkpoints")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no complete checkpoint at step {step}; have {steps}")
    state = None
    for s in ([step] if step is not None else reversed(steps)):  # the newest that reads
        try:
            state = _read_state(run_dir / "checkpoints" / str(s) / "state")
            break
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds for a damaged file
            if step is not None:
                raise ValueError(f"checkpoint {run_dir / 'checkpoints' / str(s)} is damaged ({damage(e)})") from None
            print(f"checkpoint {run_dir / 'checkpoints' / str(s)} is damaged ({damage(e)}); reading the one before",
                  file=sys.stderr, flush=True)
    if state is None:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no complete checkpoint"
                                + (" that reads" if steps else ""))
    lora = jax.tree_util.tree_map(np.asarray, state["lora"])
    if variant:
        lora = lora_lib.variant_of(lora, list(variants).index(variant), targets)
    return lora, targets


def _read_state(path: Path) -> dict:
    """The train state saved at `path` (a checkpoint's state/), on this process's first device."""
    # the item's own handler: a Checkpointer would look for the step's metadata inside state/ (and
    # warn that it is not there), a CheckpointManager would warn about the data/ item left unread
    handler = ocp.StandardCheckpointHandler()
    try:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        meta = handler.metadata(path)
        meta = getattr(meta, "item_metadata", meta)  # orbax >= 0.11 wraps the tree
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), dict(meta))
        return handler.restore(path, args=ocp.args.StandardRestore(target))
    finally:
        handler.close()


def parse_loras(spec) -> list[tuple[str, float]]:
    """'a.safetensors:0.8,b.safetensors' (or a list of such items) -> [('a.safetensors', 0.8),
    ('b.safetensors', 1.0)]."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in filter(None, (str(s).strip() for s in items)):
        path, strength = item, 1.0
        m = re.fullmatch(r"(.+):([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", item)
        if m:
            path, strength = m.group(1), float(m.group(2))
        out.append((path, strength))
    return out


def load_lora_or_run(path, dit_cfg):
    """(factors, targets) from a LoRA file in any supported format (checked against `dit_cfg`) or
    from a training run directory (its newest complete checkpoint)."""
    p = Path(path)
    if p.is_dir() or split_variant(p)[1]:
        return load_run_lora(p)
    if p.is_file():
        return lora_read.load_lora(p, cfg=dit_cfg)[:2]
    raise FileNotFoundError(f"LoRA {p} does not exist")


def load_loras(spec, dit_cfg):
    """(factors, targets) of the combined adapter for 'path[:strength],...', or None for no LoRA."""
    loras = [(*load_lora_or_run(path, dit_cfg), strength) for path, strength in parse_loras(spec)]
    return lora_lib.combine(loras) if loras else None
