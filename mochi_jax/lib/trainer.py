"""The training loop of `python -m mochi_jax.train`, read top to bottom:

    train(cfg)
      setup(cfg)      processes, run directory, mesh, data, the frozen base, the LoRA state and
                      the checkpoint manager (restoring the newest checkpoint when resuming)
      Validator(...)  validation videos, CLIP metrics and the held-out loss (mochi_jax/lib/validation.py)
      run_steps(...)  for every step: a batch, the update (mochi_jax/lib/training.py), log,
                      checkpoint, validate; SIGTERM saves and stops
      export(...)     the LoRA as genmo / ComfyUI and diffusers files

A config with a `sweep` (configs/lora.py) trains several LoRAs together on the one base
(mochi_jax/lib/sweep.py): the same loop, with the sweep's step, state and validation; per-variant
metrics are named variant/<name>/..., and each variant's LoRA files go to variants/<name>/ with the
config of that LoRA alone.

With `wandb.enabled` (configs/lora.py) the records also go to a Weights & Biases run (WandbMirror):
the same scalars at their steps, the validation videos and the config; its id is kept in the run
directory, so a resumed run continues it.

A checkpoint (orbax, atomic, keep-last-K; layout in mochi_jax/checkpoints/runs.py) holds the train
state {step, lora, opt, rng} and the data loader's position, so a run killed at any point and
restarted continues bit for bit where its newest complete checkpoint left off. Its records
(RunLog: metrics.jsonl, tensorboard/, progress.json) are cut back to that step on every launch,
the validation of that step is run again when it did not finish, and the LoRA files are written
whenever the run ends, so a run killed and resumed reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import string
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter
from tqdm import tqdm

from mochi_jax.checkpoints import dit_config, load_dit, lora_read, lora_write, runs
from mochi_jax.checkpoints.files import as_disk_error, writable_dir, write_atomically
from mochi_jax.lib import placement
from mochi_jax.lib import plots
from mochi_jax.lib import program as program_lib
from mochi_jax.lib import sweep as sweep_lib
from mochi_jax.lib import training
from mochi_jax.lib.cache import Cache, open_datasets
from mochi_jax.lib.data import make_loader
from mochi_jax.lib.stopping import Interrupted, Signals, Stopped
from mochi_jax.lib.validation import Validator, is_validation_row, validation_prompts
from mochi_jax.models import lora as lora_lib
from mochi_jax.models import remat as remat_lib
from mochi_jax.models import sharding as sharding_lib
from mochi_jax.models.dit import MochiDiT


def log(msg: str):
    if jax.process_index() == 0:  # multi-host: one voice
        print(f"[mochi_jax.train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _row(line: bytes) -> dict | None:
    """A metrics.jsonl row, or None for a line that is not one (torn by a kill, damaged, not UTF-8)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


class RunLog:
    """The records of a run in its directory (only process 0 writes):

      metrics.jsonl   one JSON object per line, {"step": ..., name: value, ...}: training rows (loss,
                      lr, ...) and validation rows (val_loss, val/...)
      curves.png      the training and validation loss and the learning rate against the step, one
                      colour per sweep variant (lib/plots.py), redrawn atomically as rows come
      tensorboard/    the same scalars, one tensorboardX event file per launch, and the validation
                      videos (`videos`) as animated GIFs at their step, tagged by prompt
      progress.json   {"validated": [the steps whose validation finished]}

    With `wandb` (a started WandbMirror, process 0) every row's scalars and the validation videos go
    to the wandb run as well, at their step (rows it already holds, of a resumed wandb run, are not
    sent again; what a killed launch logged after its last checkpoint stays there, as wandb keeps it).

    `RunLog(run_dir, main)` reads progress.json; `open(step, redo_validation)` then cuts the records
    back to `step`, where the train state starts (0, or the restored checkpoint's): rows and marks of
    later steps, logged by a launch killed after its last checkpoint, are dropped (metrics.jsonl and
    progress.json are rewritten atomically; tensorboard purges its events from `step` on and is
    given the kept rows of `step` again, and the videos of its finished validation), and with
    `redo_validation` so are the validation rows of `step` itself. A line torn by a kill is dropped too.

    curves.png is redrawn after a validation row, on close, and after a training row unless the
    drawing would take more than `plot_share` of the time (a fast run's rows are then drawn
    together, at the next row after the pause). `prompts`: the validation prompts, for the video tags."""

    plot_share = 0.1  # the most of the wall time that redrawing curves.png may take (1: after every row)

    def __init__(self, run_dir: Path, main: bool = True, prompts=(), wandb: "WandbMirror | None" = None):
        self.run_dir, self.main, self.prompts, self.wandb = run_dir, main, tuple(prompts), wandb
        self.file = self.tb = None
        self.rows, self._plot = [], {"dirty": False, "end": 0.0, "took": 0.0, "failed": False}
        path = run_dir / "progress.json"
        self.progress = {"validated": []}
        if path.is_file():
            try:
                progress = json.loads(path.read_bytes())
                if not (isinstance(progress, dict) and all(isinstance(s, int) for s in progress["validated"])):
                    raise ValueError
                self.progress.update(progress)
            except (ValueError, KeyError, TypeError):
                if main:  # the worst it costs: the restored step's validation is run again
                    log(f"{path} is damaged; it is rebuilt (a validation of the step resumed from runs again)")

    def validated(self, step: int) -> bool:
        return step in self.progress["validated"]

    def open(self, step: int, redo_validation: bool = False) -> "RunLog":
        def keep(row) -> bool:
            return row["step"] < step or (row["step"] == step and not (redo_validation and is_validation_row(row)))

        self.progress["validated"] = [s for s in self.progress["validated"]
                                      if s < step or (s == step and not redo_validation)]
        if not self.main:
            return self
        path, rows = self.run_dir / "metrics.jsonl", []
        if path.is_file():
            read = [_row(line) for line in path.read_bytes().splitlines()]
            rows = [row for row in read if row is not None and keep(row)]
            damaged = read.count(None)
            if damaged:
                log(f"{path}: {damaged} damaged line{'s' if damaged > 1 else ''} (torn by a kill?) dropped")
            write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
        self._save_progress()
        self.file = open(path, "a")
        # event files are named by the second they are opened in; the suffix keeps two launches
        # within one second apart, and in order
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step,
                                filename_suffix=f".{time.time_ns()}")
        for row in rows:
            if row["step"] == step:
                self._scalars(row)
        if step > 0 and self.validated(step):  # the purge took the videos of the kept validation too
            self.videos(step, sorted((self.run_dir / "samples").rglob(f"step{step:06d}_prompt*_seed*.mp4")),
                        mirror=False)  # tensorboard's again; the wandb run keeps its own
        self.tb.flush()
        self.rows, self._plot["dirty"] = rows, bool(rows)
        return self

    def _save_progress(self):
        if self.main:
            write_atomically(self.run_dir / "progress.json", json.dumps(self.progress) + "\n")

    def _scalars(self, row: dict):
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, row["step"])

    def write(self, step: int, values: dict):
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        self._scalars({"step": step, **values})
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(step, values)
        self.rows.append({"step": step, **values})
        self._plot["dirty"] = True
        p = self._plot
        if is_validation_row(self.rows[-1]) or time.time() - p["end"] >= p["took"] * (1 / self.plot_share - 1):
            self.plot()

    def plot(self) -> Path | None:
        """Redraw curves.png from the rows so far (process 0); a failure is told once and never
        stops the run."""
        p = self._plot
        if self.file is None or not p["dirty"] or p["failed"]:
            return None
        t0 = time.time()
        try:
            path = plots.plot_curves(self.rows, self.run_dir / plots.CURVES, title=self.run_dir.name)
        except Exception as e:  # noqa: BLE001 - a picture is not worth a run
            p["failed"] = True
            log(f"{self.run_dir / plots.CURVES} cannot be drawn ({type(e).__name__}: {e}); it is no longer updated")
            return None
        p.update(dirty=False, end=time.time(), took=time.time() - t0)
        return path

    def videos(self, step: int, paths, mirror: bool = True) -> None:
        """The validation videos of `step` (samples/[<variant>/]step<N>_prompt<i>_seed<s>.mp4, read
        back, scaled down) into tensorboard as animated GIFs, one tag per prompt (and variant), and
        (`mirror`) the mp4 files to the wandb run under the same tags."""
        if self.tb is None:
            return
        for path in paths:
            tag = plots.video_tag(path, self.prompts)
            if tag is None:
                continue
            if mirror and self.wandb is not None:
                i = int(re.search(r"_prompt(\d+)_", Path(path).name).group(1))
                self.wandb.video(step, tag, path, self.prompts[i] if i < len(self.prompts) else "")
            try:
                frames, fps = plots.read_video(path)
                self.tb._get_file_writer().add_summary(plots.gif_summary(tag, frames, fps), step)
            except Exception as e:  # noqa: BLE001 - the video is on disk; tensorboard goes without it
                log(f"step {step}: {path} not added to tensorboard ({type(e).__name__}: {e})")
        self.tb.flush()

    def mark_validated(self, step: int):
        """The validation of `step` finished: its videos and its row are written."""
        self.progress["validated"].append(step)
        self._save_progress()

    def close(self):
        if self.file is not None:
            self.plot()
            self.file.close()
            self.tb.close()
            self.file = self.tb = None


WANDB_ID = "wandb_id"  # the run's wandb run id, beside config.json: a resumed run continues that wandb run
WANDB_MODES = ("", "online", "offline", "disabled")


def wandb_module(cfg):
    """The wandb module when cfg.wandb.enabled (None when not). Refused at once, in one line (a
    ValueError: exit status 2): wandb enabled but not importable, or an unknown wandb.mode."""
    w = cfg.get("wandb")
    if w is None or not w.enabled:
        return None
    if w.mode not in WANDB_MODES:
        raise ValueError(f"wandb.mode = {w.mode!r}: choose online, offline, disabled or '' (WANDB_MODE, else online)")
    try:
        import wandb  # optional: the `wandb` extra
    except Exception as e:  # noqa: BLE001 - not installed, or an install that does not import
        raise ValueError(f"wandb.enabled is set but wandb cannot be imported ({' '.join(str(e).split())}); install it "
                         f"with pip install -e '.[wandb]', or set --config.wandb.enabled=False") from None
    return wandb


class WandbMirror:
    """A run's records sent to Weights & Biases (configs/lora.py `wandb`; process 0 only): `start`
    opens the wandb run, whose id is kept in run_dir/WANDB_ID (made on the first launch), resumed
    with resume="allow", so every launch of a run logs to the one wandb run; `log` sends a row's
    scalars at its step, `video` a validation video; `finish` ends the wandb run (exit code 0 when
    the run is done; a stop marks it preempted)."""

    def __init__(self, wandb, run, first_step: int = 0):
        self.wandb, self.run, self.first_step = wandb, run, first_step
        self.failed = False

    @classmethod
    def start(cls, wandb, cfg, run_dir: Path) -> "WandbMirror":
        w = cfg.wandb
        path = run_dir / WANDB_ID
        run_id = path.read_text().strip() if path.is_file() else ""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", run_id):  # none yet (or damaged)
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
            write_atomically(path, run_id + "\n")
        # read here, not once per process as wandb's settings are: each run (a test's too) gets its own
        folder = w.dir or os.environ.get("WANDB_DIR") or str(run_dir)
        mode = w.mode or os.environ.get("WANDB_MODE") or None
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            wb_run = wandb.init(project=w.project or None, entity=w.entity or None, name=w.name or run_dir.name,
                                tags=list(w.tags) or None, mode=mode, dir=folder, id=run_id,
                                resume="allow", config=json.loads(cfg.to_json()))
        except Exception as e:  # noqa: BLE001 - not logged in, no network, a refused project: one line
            raise ValueError(f"wandb could not start the run ({type(e).__name__}: {' '.join(str(e).split())}); log "
                             f"in with `wandb login`, or log offline (--config.wandb.mode=offline or WANDB_MODE="
                             f"offline), or set --config.wandb.enabled=False") from None
        first = int(wb_run.starting_step or 0) if wb_run.resumed else 0
        online = wb_run.settings.mode == "online"
        where = wb_run.url if online else Path(wb_run.dir).parent  # (an offline run has no url: wandb warns)
        log(f"wandb: run {run_id} ({'resumed' if wb_run.resumed else 'started'}"
            f"{'' if online else f', {wb_run.settings.mode}'}): {where}")
        return cls(wandb, wb_run, first)

    def _send(self, step: int, data, what: str) -> None:
        """Log data() (a dict) at `step`; a failure is told once and never stops the run."""
        if step < self.first_step:
            return  # the resumed wandb run holds this step already
        try:
            values = data()
            if values:
                self.run.log(values, step=step)
        except Exception as e:  # noqa: BLE001 - the records on disk are complete; wandb goes without it
            if not self.failed:
                log(f"step {step}: {what} not sent to wandb ({type(e).__name__}: {e})")
            self.failed = True

    def log(self, step: int, values: dict) -> None:
        self._send(step, lambda: {k: v for k, v in values.items() if isinstance(v, (int, float))}, "a row")

    def video(self, step: int, tag: str, path, caption: str = "") -> None:
        self._send(step, lambda: {tag: self.wandb.Video(str(path), caption=caption or None, format="mp4")},
                   str(path))

    def finish(self, status: int = 0, stopped: bool = False) -> None:
        """End the wandb run (`status`: the exit status; `stopped`: by a signal, saved, to be resumed)."""
        try:
            if stopped:
                self.run.mark_preempting()
            self.run.finish(exit_code=status)  # wandb says where an offline run is and how to upload it
        except Exception as e:  # noqa: BLE001 - a failing upload does not fail the run
            log(f"wandb: the run did not finish cleanly ({type(e).__name__}: {e})")


# ----------------------------------------------------------------------------- setup

@dataclasses.dataclass
class Run:
    """What setup() builds: everything the loop touches."""
    cfg: object
    run_dir: Path
    main: bool  # process 0
    mesh: object
    dit_cfg: object
    targets: tuple
    model: MochiDiT
    optimizer: object
    shardings: dict
    step_fn: object
    loader: object
    heldout: list
    manager: object  # orbax CheckpointManager
    removed: list  # steps of incomplete checkpoint folders removed by setup()
    sweep: object = None  # several LoRAs at once (mochi_jax/lib/sweep.py), or None
    params: dict | None = None  # the frozen base, in its shardings (load_state)
    state: dict | None = None  # {step, lora, opt, rng} (load_state); a sweep's state (lib/sweep.py)


def setup(cfg) -> Run:
    """Make the run directory, build the mesh, data and model; check that the LoRA files can hold
    the targets; remove incomplete checkpoint folders. (train() first joins the processes.)"""
    run_dir = Path(cfg.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    main = jax.process_index() == 0
    ckpt_dir = run_dir / "checkpoints"
    broken = runs.incomplete_steps(ckpt_dir)
    if (runs.complete_steps(ckpt_dir) or broken) and not cfg.resume:
        raise ValueError(f"{ckpt_dir} already holds checkpoints; set --config.resume=True to continue them or "
                         f"choose another run_dir")

    mesh = sharding_lib.make_mesh(cfg.mesh.to_dict())
    n_proc, n_batch = jax.process_count(), mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % n_batch or cfg.batch_size % n_proc:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by data x fsdp = {n_batch} (mesh "
                         f"{dict(mesh.shape)}) and by the {n_proc} processes; change --config.batch_size or "
                         f"--config.mesh.*")
    # `cache`, or several (`datasets`, each with its repeats): the first n_train clips train, the rest
    # (the last clips of each cache, by name, whole sources) are held out
    cache, n_train, notes = open_datasets(cfg.cache, cfg.get("datasets"), cfg.validation.holdout)
    loader = make_loader(cache, cfg.batch_size, cfg.seed, num_clips=n_train)
    log("data: " + loader.plan.describe())
    for line in notes:
        log(line)
    heldout = [cache[i] for i in range(n_train, len(cache))]

    m = cfg.model
    # the config first (from the checkpoint's metadata), so the weights load straight into their shards
    dit_cfg = dit_config(m)
    note = placement.cpu_note(dit_cfg.width)
    if note:
        log(note)
    parts = sweep_lib.training_parts(cfg, dit_cfg, mesh)
    sweep, targets, model, optimizer, shardings = (parts.sweep, parts.targets, parts.model, parts.optimizer,
                                                   parts.shardings)
    if sweep is None:
        check_exportable(cfg.lora.to_dict(), targets,
                         ["/".join(path) for path, _ in lora_lib.layers_of(shardings["state"]["lora"])])
    else:
        for k, vcfg in enumerate(sweep.configs):
            check_exportable(vcfg.lora.to_dict(), sweep.targets[k],
                             ["/".join(p) for i, p in enumerate(sweep.layers) if sweep.ranks[k][i]],
                             f"sweep variant {sweep.names[k]!r}: ")
    if runs.complete_steps(ckpt_dir):
        check_same_lora(run_dir, cfg)

    # a kill while orbax deletes an old checkpoint leaves its folder without the metadata; orbax
    # would list it as a step (and refuse to save that step again), so it goes before orbax looks
    if broken and main:
        for step in broken:
            shutil.rmtree(ckpt_dir / str(step))
    if broken and jax.process_count() > 1:
        multihost_utils.sync_global_devices("mochi_jax.train: incomplete checkpoints removed")
    if main:
        write_atomically(run_dir / "config.json", cfg.to_json(indent=2))
    return Run(cfg, run_dir, main, mesh, dit_cfg, targets, model, optimizer, shardings, step_fn=parts.step,
               loader=loader, heldout=heldout, manager=runs.checkpoint_manager(ckpt_dir, cfg.checkpoint.keep),
               removed=broken, sweep=sweep)


REMAT_RECORD = "remat_auto.json"  # remat='auto''s pick, beside config.json, with what it was picked for


def largest_latent(cache: Cache) -> tuple[tuple[int, ...], int]:
    """(the largest latent shape [12, t, h, w] of the cache's clips, the T5 tokens of a caption)."""
    return (max(cache.latent_shapes(), key=lambda s: s[1] * s[2] * s[3]), int(cache[0]["t5_feats"].shape[0]))


def resolve_auto_remat(cfg, latent, tokens: int) -> remat_lib.Choice:
    """remat='auto' on the devices at hand: the least recomputation (models/remat.py `choose`) whose
    compiled train step (`training_parts(...).program`, for clips of latent shape `latent` and captions
    of `tokens` T5 tokens: the cache's largest, `largest_latent`) fits
    cfg.model.memory_budget_gb (0: what the first device reports it can hold). The pick is recorded in
    the run directory (REMAT_RECORD) with what it was picked for: the training settings, the shapes,
    the devices, the budget and the jax version; a run started again with the same ones (a resume)
    takes it from there without compiling anything."""
    m = cfg.model
    latent = tuple(int(x) for x in latent)
    devices = jax.devices()
    budget = int(m.memory_budget_gb * remat_lib.GIB)
    if budget <= 0:
        budget = int((devices[0].memory_stats() or {}).get("bytes_limit", 0))
    if budget <= 0:
        raise ValueError(f"remat='auto': {devices[0].platform} reports no memory limit; set "
                         "--config.model.memory_budget_gb")
    settings = {k: v for k, v in cfg.to_dict().items() if k in ("batch_size", "mesh", "lora", "sweep", "optim", "loss")}
    settings["model"] = {k: v for k, v in m.to_dict().items() if k not in ("remat", "remat_groups", "memory_budget_gb")}
    key = json.loads(json.dumps({"settings": settings, "latent": list(latent), "text_tokens": tokens,
                                 "devices": f"{len(devices)} x {devices[0].device_kind}",
                                 "processes": jax.process_count(), "budget_bytes": budget, "jax": jax.__version__}))
    record = Path(cfg.run_dir) / REMAT_RECORD
    if record.is_file():
        try:
            old = json.loads(record.read_text())
        except ValueError:
            old = {}
        if old.get("for") == key:
            return remat_lib.Choice(old["remat"], old["groups"], old["bytes"], budget, [])
    dit_cfg = dit_config(m, remat="full", remat_groups="")
    mesh = sharding_lib.make_mesh(cfg.mesh.to_dict())

    def memory_of(remat: str, groups: str) -> int:
        parts = sweep_lib.training_parts(cfg, dataclasses.replace(dit_cfg, remat=remat, remat_groups=groups), mesh)
        return program_lib.memory(parts.program(cfg.batch_size, latent, tokens).lower().compile())["total"]

    choice = remat_lib.choose(dit_cfg.depth - 1, memory_of, budget, dit_cfg.attention)
    if jax.process_index() == 0:
        write_atomically(record, json.dumps({"remat": choice.remat, "groups": choice.groups, "bytes": choice.bytes,
                                             "for": key}, indent=1) + "\n")
    return choice


def lora_structure(cfg) -> dict:
    """What fixes the shapes of a run's train state: the LoRA targets, per variant for a sweep."""
    variants = runs.sweep_variants(cfg)
    lora = {name: v.lora.to_dict() for name, v in variants} if variants else {"": cfg.lora.to_dict()}
    return json.loads(json.dumps(lora))  # as config.json holds it


def check_same_lora(run_dir: Path, cfg) -> None:
    """Refuse to resume checkpoints of other LoRA targets or sweep variants than the config's."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    old = lora_structure(ml_collections.ConfigDict(json.loads(path.read_text())))
    new = lora_structure(cfg)
    if old != new:
        what = "sweep variants" if len(old) > 1 or "" not in old else "LoRA targets"
        raise ValueError(f"{path}: the checkpoints of this run hold other {what} ({_brief(old)}) than the config "
                         f"asks for ({_brief(new)}); resume with the run's lora / sweep settings or choose another "
                         f"run_dir")


def _brief(structure: dict) -> str:
    def one(lora):
        return ", ".join(f"{k} r{v['rank']}" for k, v in sorted(lora.items()) if v.get("rank"))
    return "; ".join(f"{name}: {one(lo)}" if name else one(lo) for name, lo in structure.items())


def check_exportable(lora_cfg: dict, targets, layers, who: str = "") -> None:
    """Refuse, before anything is trained, LoRA targets that adapt layers (`layers`: the LoRA tree's
    paths) the LoRA files written at the end cannot hold: both formats (genmo / ComfyUI and
    diffusers) name only the Dense layers of the blocks."""
    names = {}
    for name in sorted(lora_cfg):
        for t in lora_lib.targets_from_config({name: lora_cfg[name]}):
            names.setdefault(t, name)
    bad = [p for p in layers if not lora_write.writable(p)]
    if bad:
        t = lora_lib.find_target(targets, bad[0])
        name = names[t]
        its = [p for p in bad if lora_lib.find_target(targets, p) == t]
        raise ValueError(f"{who}LoRA target {name!r} (pattern {t.pattern!r}) adapts {', '.join(its)}, which neither "
                         f"LoRA file of the run can hold (genmo / ComfyUI lora.safetensors and diffusers "
                         f"lora_diffusers.safetensors name only the Dense layers of the blocks); narrow its pattern "
                         f"or set --config.lora.{name}.rank=0")


def load_state(run: Run) -> None:
    """The frozen base into its shardings, and the train state: fresh (its LoRA from cfg.init_lora when
    set), or the newest checkpoint's."""
    cfg, m = run.cfg, run.cfg.model
    init_from = cfg.get("init_lora", "")
    if init_from and run.sweep is not None:
        raise ValueError(f"init_lora = {init_from!r}: a sweep's LoRAs start fresh (each has its own targets); "
                         f"train from a LoRA without `sweep`, or set --config.init_lora=''")
    if init_from and not runs.complete_steps(run.run_dir / "checkpoints"):
        init_lora_source(init_from)  # a wrong path fails before the base is loaded
    _, run.params = load_dit(m.dit, dtype=run.dit_cfg.param_dtype, shardings=run.shardings["params"],
                             **run.dit_cfg.settings())
    base = (f"mesh {dict(run.mesh.shape)} over {run.mesh.devices.size} devices, {jax.process_count()} process(es); "
            f"base: {m.dit} (depth {run.dit_cfg.depth}, width {run.dit_cfg.width}, {m.param_dtype})")
    sw = run.sweep
    if sw is None:
        run.state = training.init_state(run.model, run.optimizer, cfg.seed, run.shardings["state"])
        log(f"{base}; LoRA: {lora_lib.count(run.state['lora']):,} trainable parameters on "
            + ", ".join(f"{t.pattern} r{t.rank} a{t.alpha:g}" for t in run.targets))
    else:
        run.state = sweep_lib.init_state(sw, run.dit_cfg, run.optimizer, cfg.seed, run.shardings["state"])
        log(f"{base}; a sweep of {sw.size} LoRAs trained together ("
            f"{lora_lib.count(run.state['lora']):,} stacked parameters):")
        for k, name in enumerate(sw.names):
            o = sw.configs[k].optim
            log(f"  {name}: " + ", ".join(f"{t.pattern} r{t.rank} a{t.alpha:g}" for t in sw.targets[k])
                + f"; lr {o.lr:g} {o.schedule}, seed {sw.seed(k)}")
    ckpt_dir = run.run_dir / "checkpoints"
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), run.state)
    latest, state, data = runs.restore_newest(run.manager, abstract, log)
    if run.removed:
        log(f"checkpoint step{'s' if len(run.removed) > 1 else ''} {', '.join(map(str, run.removed))} in {ckpt_dir} "
            f"{'were' if len(run.removed) > 1 else 'was'} incomplete (a save or a clean-up killed half way) and "
            f"removed; " + (f"resuming from step {latest}, the newest complete checkpoint" if latest is not None
                            else "no complete checkpoint is left: starting from step 0"))
    if latest is not None:
        run.state = state
        run.loader.set_state(data)
        log(f"resumed from {ckpt_dir} at step {latest}")
        if init_from:
            log(f"init_lora = {init_from} not read: the LoRA is the checkpoint's (step {latest})")
    elif ckpt_dir.is_dir() and any(p.name.endswith(".damaged") for p in ckpt_dir.iterdir()):
        log(f"no checkpoint in {ckpt_dir} restores: starting from step 0")
    if latest is None and init_from:
        lora, note = read_init_lora(init_from, run.dit_cfg, run.targets, cfg.lora.to_dict(), run.state["lora"])
        run.state = {**run.state, "lora": place_like(lora, run.state["lora"])}  # optimizer state: fresh
        log(note)


def read_init_lora(spec: str, dit_cfg, targets, lora_cfg: dict, like) -> tuple[dict, str]:
    """cfg.init_lora's factors as the train state's LoRA `like` holds them (a host tree of its
    structure, shapes and dtypes), and a line saying what was read. `spec`: a LoRA file in any layout
    lora_read reads (checked against `dit_cfg`), or a training run directory / <run>/checkpoints/<step>
    (runs.load_run_lora). Each layer's factors must have the config's shapes: the file's scale
    (alpha / rank) is converted to the config's (b rescaled: the same adapter); rank components a file
    holds only as zeros (which lora_read drops: padding, an untrained layer) start as fresh ones (`like`'s,
    b zero: nothing added). Every layer that differs in presence or shape is named, with both shapes,
    in one ValueError."""
    path, is_run = init_lora_source(spec)
    info = None
    if is_run:
        tree, file_targets = runs.load_run_lora(path)
        what = f"the training run {path}"
    else:
        tree, file_targets, info = lora_read.load_lora(path, cfg=dit_cfg)
        what = f"{path} ({info['format']} layout)"
    names = {}  # target -> its name in the config's `lora` block, for the messages
    for name in sorted(lora_cfg):
        for t in lora_lib.targets_from_config({name: lora_cfg[name]}):
            names.setdefault(t, name)
    host = jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(like, tiled=True))
    mine = {"/".join(p): node for p, node in lora_lib.layers_of(host)}
    theirs = {"/".join(p): node for p, node in lora_lib.layers_of(tree)}
    stored = {k: max(v["file_ranks"]) for k, v in info["layers"].items()} if info else {}
    zeros = set(info["zero_layers"]) if info else set()
    bad, fresh, partly, rescaled = [], [], [], []
    for name in sorted(set(mine) | set(theirs)):
        m, t = mine.get(name), theirs.get(name)
        if m is None:
            bad.append(f"{name}: the file has a {list(t['a'].shape)} b {list(t['b'].shape)}; the config adapts no "
                       f"such layer")
            continue
        target = lora_lib.find_target(targets, name)
        who = f" (lora.{names[target]})" if target in names else ""
        if t is None:
            if name in zeros:  # all zeros in the file: adds nothing, so it starts fresh
                fresh.append(name)
            else:
                bad.append(f"{name}{who}: the config's LoRA has a {list(m['a'].shape)} b {list(m['b'].shape)}; "
                           f"the file has no such layer")
            continue
        a, b = np.asarray(t["a"], np.float32), np.asarray(t["b"], np.float32)
        r, rf = m["a"].shape[-1], a.shape[-1]
        fits = (a.shape[:-1] == m["a"].shape[:-1] and b.shape[:-2] == m["b"].shape[:-2]
                and b.shape[-1] == m["b"].shape[-1] and (rf == r or rf < r <= stored.get(name, rf)))
        if not fits:
            extra = f" (stored at rank {stored[name]}, {rf} of it nonzero)" if stored.get(name, rf) != rf else ""
            bad.append(f"{name}{who}: the file has a {list(a.shape)} b {list(b.shape)}{extra}, the config's LoRA "
                       f"a {list(m['a'].shape)} b {list(m['b'].shape)}")
            continue
        ratio = lora_lib.find_target(file_targets, name).scale / target.scale
        if ratio != 1.0:
            b = b * np.float32(ratio)
            rescaled.append(name)
        if rf < r:  # the file's zero components: fresh ones in their place
            partly.append(f"{name} {rf} of {r}")
        m["a"] = np.concatenate([a, m["a"][..., rf:]], axis=-1).astype(m["a"].dtype)
        m["b"] = np.concatenate([b, m["b"][..., rf:, :]], axis=-2).astype(m["b"].dtype)
    if bad:
        raise ValueError(f"init_lora = {spec}: its LoRA does not fit the config's `lora` targets "
                         f"({len(bad)} layer{'s' if len(bad) > 1 else ''}):\n  " + "\n  ".join(bad))
    note = (f"LoRA initialised from init_lora = {what}: {len(mine) - len(fresh)} of {len(mine)} layers; "
            f"the optimizer state starts fresh")
    if fresh:
        note += f"; all zeros in the file, so fresh: {', '.join(fresh)}"
    if partly:
        note += f"; nonzero rank components only in part (the rest fresh): {', '.join(partly)}"
    if rescaled:
        note += f"; b rescaled from the file's alpha / rank to the config's: {', '.join(rescaled)}"
    return host, note


def init_lora_source(spec: str) -> tuple[Path, bool]:
    """(the path cfg.init_lora names, whether it is a training run rather than a LoRA file), or ValueError."""
    path = Path(spec).expanduser()
    if path.is_dir() or runs.split_variant(path)[1]:
        return path, True
    if path.is_file():
        return path, False
    raise ValueError(f"init_lora = {spec!r}: no such LoRA file or training run directory")


def place_like(host: dict, like: dict) -> dict:
    """The host tree `host` as arrays of `like`'s shardings and dtypes (every process gives the same values)."""
    return jax.tree_util.tree_map(
        lambda h, x: jax.make_array_from_callback(x.shape, x.sharding, lambda idx: np.asarray(h[idx], x.dtype)),
        host, like)


# ----------------------------------------------------------------------------- the loop

def save(run: Run, step: int) -> None:
    """Checkpoint `step` (asynchronously) and write its LoRA files (write_loras)."""
    # every process has taken the same number of batches, so process 0's loader position (the one
    # orbax writes) is every process's position
    runs.save_checkpoint(run.manager, step, run.state, run.loader.get_state())
    write_loras(run, step)


class Diverged(FloatingPointError):
    """Non-finite losses, `max_bad_steps` in a row for every LoRA: the run stops, its last checkpoint intact."""
    exit_status = 3


def run_steps(run: Run, validator: Validator, metrics: RunLog, signals: Signals | None = None) -> bool:
    """Train from the state's step to cfg.steps (True); a stop signal (`signals`) ends the step under
    way, saves it and raises Stopped."""
    cfg, sw = run.cfg, run.sweep
    signals = signals or Signals()
    signals.interruptible = False
    names = sw.names if sw is not None else ("",)  # one LoRA: no variant names
    # compiled: run eagerly, optax's schedule would move its Python numbers to the device behind the
    # loop's back; compiled, it also gives the lr the step applies (the eager value can be 1 ulp off)
    schedules = [jax.jit(training.lr_schedule(c.optim)) for c in (sw.configs if sw is not None else (cfg,))]
    step = int(jax.device_get(run.state["step"]))
    bad, t_last, s_last = np.zeros(len(names), int), time.time(), step  # non-finite steps in a row, per LoRA
    sums, counts = np.zeros((2, len(names))), np.zeros(len(names), int)  # loss and grad norm since the last row
    compiled, c_time, c_steps = set(), 0.0, 0  # batch shapes seen; compile steps' time and count since t_last
    bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step", dynamic_ncols=True, disable=not run.main)
    try:
        while step < cfg.steps:
            batch = {k: jax.make_array_from_process_local_data(run.shardings["batch"][k], x)
                     for k, x in next(run.loader).items()}
            shape = batch["mean"].shape
            if shape not in compiled:  # a new bucket: this step compiles; time it apart from steps/s
                jax.block_until_ready(run.state)
                t0 = time.time()
            run.state, out = run.step_fn(run.state, run.params, batch)
            step += 1
            if shape not in compiled:
                jax.block_until_ready(out)
                compiled.add(shape)
                dt = time.time() - t0
                c_time, c_steps = c_time + dt, c_steps + 1
                log(f"step {step}: compiled the step for batch {list(shape)} in {dt:.1f}s "
                    f"(shape {len(compiled)}; not counted in steps/s)")
            bar.update(1)
            # the step's metrics, fetched once and explicitly: the loop makes no implicit transfer
            # (tests/test_transfer_guard.py runs it under jax.transfer_guard("disallow"))
            out = jax.device_get(out)
            finite, losses, norms = (np.atleast_1d(out[k]) for k in ("finite", "loss", "grad_norm"))
            bad = np.where(finite, 0, bad + 1)
            sums += np.where(finite, np.stack([losses, norms]), 0.0)  # the interval's means: finite steps only
            counts += finite
            if not finite.all():
                for k in np.flatnonzero(~finite):
                    log(f"step {step}: {_who(names[k])}non-finite loss {losses[k]} / grad norm {norms[k]}; update "
                        f"skipped ({bad[k]} in a row)")
                metrics.write(step, {"nonfinite": int((~finite).sum())})
                if (bad >= cfg.max_bad_steps).all():
                    run.manager.wait_until_finished()
                    last = run.manager.latest_step()
                    raise Diverged(
                        f"{bad.min()} non-finite losses in a row up to step {step}"
                        f"{' for every LoRA of the sweep' if sw is not None else ''}; stopped. The last checkpoint "
                        f"({'none' if last is None else f'step {last}'}) is intact; lower --config.optim.lr "
                        f"or check the data")
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.time()
                counted = step - s_last - c_steps  # compile steps are left out of the rate
                rate = counted / max(now - t_last - c_time, 1e-9) if counted > 0 else None
                vals = {}
                mean_loss, mean_norm = sums / np.maximum(counts, 1)
                for k, name in enumerate(names):
                    o = sw.configs[k].optim if sw is not None else cfg.optim
                    finite_k = counts[k] > 0
                    one = {"loss": float(mean_loss[k] if finite_k else losses[k]),
                           "grad_norm": float(mean_norm[k] if finite_k else norms[k]),
                           "lr": float(jax.device_get(schedules[k](jax.device_put(max(step - 1, 0) // o.grad_accum))))}
                    vals.update({(f"variant/{name}/{key}" if name else key): v for key, v in one.items()})
                if rate is not None:
                    vals.update(steps_per_s=rate, examples_per_s=rate * cfg.batch_size)
                if c_steps:
                    vals.update(compiles=c_steps, compile_s=c_time)
                metrics.write(step, vals)
                t_last, s_last, c_time, c_steps = now, step, 0.0, 0
                sums[:], counts[:] = 0.0, 0
                if sw is None:
                    bar.set_postfix(loss=f"{vals['loss']:.4f}", lr=f"{vals['lr']:.2e}")
                else:
                    bar.set_postfix_str("loss " + " ".join(f"{n} {vals[f'variant/{n}/loss']:.4f}" for n in names))
            stop = signals.agreed()
            saved = step % cfg.checkpoint.every == 0 or step == cfg.steps or stop
            if saved:
                save(run, step)
            if validator.due(step) and not stop:
                # alone, a stop signal ends the validation at once (a resume redoes it); with several
                # processes it waits for the validation's end
                signals.interruptible = jax.process_count() == 1
                try:
                    validate(run, validator, metrics, step)
                except Interrupted:
                    log(f"step {step}: {signals.name} during the validation; it runs again on resume")
                finally:
                    signals.interruptible = False
                stop = signals.agreed()
            if stop:
                if not saved:
                    save(run, step)
                run.manager.wait_until_finished()
                raise Stopped(f"stopped by {signals.name} after step {step}, which is saved in "
                              f"{run.run_dir / 'checkpoints'}; rerun the same command to continue")
        bar.close()
        return True
    finally:
        run.manager.wait_until_finished()


def _who(name: str) -> str:
    return f"variant {name}: " if name else ""


def validate(run: Run, validator: Validator, metrics: RunLog, step: int) -> None:
    values, videos = validator(step, run.params, run.state["lora"], run.run_dir)
    if videos:
        log(f"step {step}: validation videos {', '.join(videos)}")
        metrics.videos(step, videos)
    if values:
        metrics.write(step, values)
        shown = {k: x for k, x in values.items() if run.sweep is None or "/sigma_" not in k}  # all in metrics.jsonl
        log(f"step {step}: " + ", ".join(f"{k} {x:.4f}" for k, x in shown.items()))
    metrics.mark_validated(step)


# ----------------------------------------------------------------------------- export

LORAS = "loras"  # the LoRA file pair of every checkpoint, beside config.json (or a sweep variant's)


def about(run: Run, step: int, cfg, targets) -> dict:
    """What a LoRA file of this run says about itself (safetensors metadata, `tools/lora.py info`)."""
    return {"project": "mochi_jax", "base_model": str(run.cfg.model.dit), "step": step, "run": run.run_dir.name,
            "targets": [dict(pattern=t.pattern, rank=t.rank, alpha=t.alpha) for t in targets],
            "lr": cfg.optim.lr, "seed": cfg.seed, "batch_size": run.cfg.batch_size, "clips": run.loader.plan.num_clips}


def write_loras(run: Run, step: int, final: bool = False) -> None:
    """The LoRA as a genmo / ComfyUI file and a diffusers file: at a checkpoint, into loras/ as
    <run>-step<N>.safetensors and <run>-step<N>.diffusers.safetensors (the oldest beyond
    checkpoint.keep_loras removed; 0 keeps all); at the end (`final`) as lora.safetensors and
    lora_diffusers.safetensors. A sweep writes each variant's into variants/<name>/ (with the config
    of that LoRA alone). Every process takes part (the factors are gathered); process 0 writes."""
    sw = run.sweep
    # the end-of-run export shows its progress: the gathering, then each file
    bar = tqdm(total=1 + 2 * (1 if sw is None else sw.size), desc="exporting LoRA", unit="part",
               dynamic_ncols=True, disable=not (final and run.main))
    bar.set_postfix_str("gathering the factors")
    lora = multihost_utils.process_allgather(run.state["lora"], tiled=True)  # whole factors on every host
    bar.update(1)
    if sw is None:
        outputs = [(run.run_dir, run.run_dir.name, lora, run.targets, run.cfg, None)]
    else:
        outputs = [(run.run_dir / "variants" / name, f"{run.run_dir.name}-{name}", sweep_lib.unpad(sw, k, lora),
                    sw.targets[k], sw.configs[k], sw.configs[k]) for k, name in enumerate(sw.names)]
    if not run.main:
        bar.close()
        return
    with bar:
        for output in outputs:
            _write_output(run, step, final, output, bar)


def _write_output(run: Run, step: int, final: bool, output: tuple, bar) -> None:
    """One LoRA's file pair (write_loras; `bar` counts the files)."""
    folder, stem, factors, targets, cfg, vcfg = output
    facts = about(run, step, cfg, targets)
    if final:
        genmo, diffusers = folder / "lora.safetensors", folder / "lora_diffusers.safetensors"
    else:
        genmo = folder / LORAS / f"{stem}-step{step:06d}.safetensors"
        diffusers = genmo.with_name(f"{stem}-step{step:06d}.diffusers.safetensors")
    genmo.parent.mkdir(parents=True, exist_ok=True)
    for path, save in ((genmo, lora_write.save_genmo), (diffusers, lora_write.save_diffusers)):
        bar.set_postfix_str(str(path.relative_to(run.run_dir)))
        save(path, factors, targets, cfg=run.dit_cfg, about=facts)
        bar.update(1)
    if vcfg is not None:
        write_atomically(folder / "config.json", vcfg.to_json(indent=2))
    keep = run.cfg.checkpoint.get("keep_loras", 0)
    if not final and keep > 0:
        saved = sorted(genmo.parent.glob(f"{stem}-step*.safetensors"))
        steps = sorted({p.name[len(stem) + 5:len(stem) + 11] for p in saved})
        for old in steps[:-keep]:
            for f in genmo.parent.glob(f"{stem}-step{old}*.safetensors"):
                f.unlink()


def export(run: Run) -> None:
    """The run's final LoRA files (write_loras), and the line that names them."""
    sw = run.sweep
    write_loras(run, int(run.state["step"]), final=True)
    where = (f"{run.run_dir / 'lora.safetensors'} (genmo / ComfyUI) and {run.run_dir / 'lora_diffusers.safetensors'} "
             f"(diffusers)" if sw is None else
             f"{run.run_dir / 'variants'}/<{'|'.join(sw.names)}>/lora.safetensors and lora_diffusers.safetensors")
    d = run.run_dir
    log(f"done: {int(run.state['step'])} steps; LoRA written to {where}")
    log(f"  per checkpoint: {d / LORAS if sw is None else d / 'variants' / '<name>' / LORAS}/ (LoRA files), "
        f"{d / 'checkpoints'}/ (to resume)")
    log(f"  curves: {d / plots.CURVES} (loss, validation loss, lr), {d / 'metrics.jsonl'}, {d / 'tensorboard'}/ "
        f"(tensorboard --logdir {d / 'tensorboard'}"
        + ("; the validation videos under IMAGES" if (d / "samples").is_dir() else "") + ")"
        + (f"; validation videos: {d / 'samples'}/" if (d / "samples").is_dir() else ""))


def train(cfg) -> Path:
    """Run (or resume) the training described by `cfg` (configs/lora.py); returns the run directory.
    Holds the run directory's lock throughout (runs.RunLock). remat='auto' is resolved here to the
    setting the compiler says fits (recorded in the run directory and its config.json). Raises Stopped
    (a stop signal; saved) or Diverged; a launch that fails before its first step leaves no run
    directory it made. Refused before anything is written: wandb enabled but not installed, a wrong
    entry of validation.prompts."""
    wandb = wandb_module(cfg)
    prompts = validation_prompts(cfg.validation)
    placement.start(cfg.distributed)
    run_dir = Path(cfg.run_dir).absolute()
    fresh = not run_dir.exists()
    writable_dir(run_dir)  # a read-only or misplaced run folder fails now, not at the first checkpoint
    with Signals() as signals, _lock(run_dir):
        started = False
        try:
            if cfg.model.remat == "auto":
                data = open_datasets(cfg.cache, cfg.get("datasets"), cfg.validation.holdout)[0]
                choice = resolve_auto_remat(cfg, *largest_latent(data))
                cfg.model.remat, cfg.model.remat_groups = choice.remat, choice.groups
                log(f"remat auto -> {choice.describe()}" if choice.tried else
                    f"remat auto -> {choice.groups or choice.remat} (picked for these settings before: "
                    f"{REMAT_RECORD} in the run directory)")
            run = setup(cfg)
            # wandb first: a login or network problem is told before the models load
            mirror = WandbMirror.start(wandb, cfg, run.run_dir) if wandb is not None and run.main else None
            with _finishing(mirror):
                validator = Validator(cfg, run.dit_cfg, run.heldout, run.targets, run.sweep)  # T5 comes and goes first
                load_state(run)
                step = int(run.state["step"])
                records = RunLog(run.run_dir, run.main, prompts=[p.text for p in prompts], wandb=mirror)
                # a checkpoint is saved before its step's validation runs, so a kill during that validation
                # (the final one included) resumes from this step with the validation still to do
                redo = step > 0 and validator.due(step) and not records.validated(step)
                if jax.process_count() > 1:  # every process takes part in validation: one decision
                    redo = bool(multihost_utils.broadcast_one_to_all(np.int32(redo)))
                records.open(step, redo_validation=redo)
                started = True
                try:
                    if redo:
                        log(f"step {step}: the validation after this checkpoint did not finish; running it again")
                        validate(run, validator, records, step)
                    signals.stop_point()  # with several processes, a signal to any of them during set-up
                    run_steps(run, validator, records, signals)
                finally:
                    records.close()
                    run.manager.close()
                export(run)
        except Interrupted:
            raise Stopped(f"stopped by {signals.name} before any new step; "
                          f"rerun the same command to continue") from None
        except Exception as e:
            failed = as_disk_error(e, run_dir)
            if failed is e:
                raise
            runs.remove_partial(run_dir / "checkpoints")  # a checkpoint the full disk cut short
            raise failed from None
        finally:
            if fresh and not started and jax.process_index() == 0:  # failed before its first step
                shutil.rmtree(run_dir, ignore_errors=True)  # made by this launch, which did nothing in it
    return run_dir


@contextlib.contextmanager
def _finishing(mirror: WandbMirror | None):
    """Finish the wandb run (when there is one) however the body ends: done (0), stopped by a signal
    (preempted, to be resumed), or failed (the exception's exit status, else 1)."""
    try:
        yield
    except BaseException as e:
        if mirror is not None:
            stopped = isinstance(e, (Stopped, Interrupted, KeyboardInterrupt))
            mirror.finish(Stopped.exit_status if stopped else getattr(e, "exit_status", 1), stopped=stopped)
        raise
    if mirror is not None:
        mirror.finish(0)


@contextlib.contextmanager
def _lock(run_dir: Path):
    """The run directory's lock (runs.RunLock), taken by process 0 for all: every process learns
    whether it got it."""
    lock = runs.RunLock(run_dir) if jax.process_index() == 0 else None
    refused = None
    if lock is not None:
        try:
            lock.__enter__()
        except runs.RunInUse as e:
            refused = e
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(refused is not None)):
        refused = refused or runs.RunInUse(f"{run_dir} is in use by another trainer (process 0 says which)")
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
