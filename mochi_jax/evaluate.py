"""Compare LoRAs with their base model: `python -m mochi_jax.evaluate --config=configs/eval.py[:demo]`.

Every variant (the base, then each LoRA of `cfg.loras`) renders every prompt of the prompt file
with the same seeds, hence the same initial noise: the videos are paired, and each LoRA's effect
is measured as per-(prompt, seed) differences against the base. Metrics per video
(mochi_jax/lib/metrics.py): CLIP-T and CLIPScore against the prompt, consecutive-frame and subject
consistency of the CLIP frame embeddings, pixel flicker, and where configured CLIP-I against
reference videos and a style probe. Outputs under cfg.out_dir:

    report.json                      every video's metrics; per variant (and per prompt) the mean and
                                     95% interval over seeds; paired deltas against the base
    report.md                        the same as tables, with the contact sheets
    report.html                      per prompt the videos side by side (a row per seed, a column per
                                     variant, playing), the tables, the LoRAs' training curves
    posters/<variant>/<nn>_<prompt>_seed<seed>.png   each video's first frame (the page's posters)
    curves/<run>.png                 each LoRA's training run's curves.png (or drawn from its metrics.jsonl)
    sheets/<nn>_<prompt>.png         per prompt, one row per (seed, variant), frames evenly spaced
    videos/<variant>/<nn>_<prompt>_seed<seed>.mp4
    .parts/                          finished batches (records, thumbnails): a killed evaluation, rerun
                                     with the same settings and LoRAs, renders only what is missing and
                                     writes the same report

Rendering runs over the device mesh of cfg.mesh (lib/sampling.py: the weights sharded, batches or
tokens split); with several processes (one per host) every process renders and process 0 writes.
SIGTERM or Ctrl-C stops it with status 75 (lib/stopping.py): alone at once, with several processes
all of them before the next batch; what is finished stays in .parts for the rerun.

The pieces: `check_inputs` (everything that can be wrong with the inputs: paths, prompt file, CLIP
weights, a LoRA that does not fit the base, a run without checkpoint, references, before anything
is rendered), `render_and_score` (mochi_jax/lib/variants.py renders base and LoRAs, in one vmapped
call with cfg.batch_loras), then the report (mochi_jax/lib/report.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from mochi_jax import cli, demo
from mochi_jax.checkpoints import dit_config, load_dit, load_vae, t5_settings, vae_settings
from mochi_jax.checkpoints.files import writable_dir, write_atomically
from mochi_jax.lib import cache, placement, sampling
from mochi_jax.lib.clip import Scorer
from mochi_jax.lib.metrics import video_metrics
from mochi_jax.lib.report import (contact_sheet, file_slug, json_safe, poster_of, print_deltas, summarize, thumbnails,
                                  training_curves, write_curves, write_html, write_markdown)
from mochi_jax.lib.stopping import Interrupted, Signals, Stopped
from mochi_jax.lib.text import TextEncoder, read_prompts
from mochi_jax.lib.variants import denoise_variants, load_variants, stack_adapters
from mochi_jax.lib.video import VIDEO_SUFFIXES, VideoReader, evenly_spaced, read_clip, write_image, write_mp4
from mochi_jax.models import sharding as sharding_lib

# ----------------------------------------------------------------------------- inputs

def parse_seeds(seeds) -> list[int]:
    """'1,2,3', 7 or [1, 2, 3] -> a non-empty list of distinct ints."""
    if isinstance(seeds, int):
        out = [seeds]
    elif isinstance(seeds, str):
        out = [int(s) for s in seeds.replace(" ", "").split(",") if s]
    else:
        out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ValueError(f"seeds must be one or more distinct integers, got {seeds!r}")
    return out


def reference_videos(path, limit: int = 0) -> list[tuple[Path, int | None]]:
    """(video, frame count or None) for a folder of videos, one video, or a prepared cache folder
    (its manifest's sources, with the frame counts they were prepared at); the first `limit` if > 0."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"references {p} do not exist")
    if (p / cache.MANIFEST).is_file():
        clips = cache.read_manifest(p)["clips"]
        missing = [str(c.get("source", c["name"])) for c in clips if not Path(c.get("source", "")).is_file()]
        if missing:
            raise FileNotFoundError(f"references {p / cache.MANIFEST}: source videos not found: {', '.join(missing)}")
        out = [(Path(c["source"]), c.get("num_frames")) for c in clips]
    elif p.is_dir():
        out = [(v, None) for v in sorted(p.rglob("*")) if v.is_file() and v.suffix.lower() in VIDEO_SUFFIXES]
    else:
        out = [(p, None)] if p.suffix.lower() in VIDEO_SUFFIXES else []
    if not out:
        raise ValueError(f"references {p}: no videos ({', '.join(VIDEO_SUFFIXES)}) and no cache manifest")
    return out[:limit] if limit > 0 else out


def read_references(videos, num_frames: int, per_video: int, fps: float, size) -> np.ndarray:
    """uint8 [N, H, W, 3]: `per_video` frames evenly spaced over the first frames of each video."""
    out = []
    for video, n in videos:
        frames = read_clip(video, n or num_frames, fps=fps, size=size)
        out.append(frames[evenly_spaced(len(frames), per_video)])
    return np.concatenate(out)


@dataclasses.dataclass
class Inputs:
    """Everything checked before rendering: prompts, seeds, the variants and their stacked adapters,
    the CLIP scorer with the prompt, reference and style embeddings."""
    prompts: list
    seeds: list
    dit_cfg: object
    variants: list
    stacked: dict
    targets: tuple
    scorer: Scorer
    text_emb: np.ndarray
    ref_emb: np.ndarray | None
    style_emb: np.ndarray | None
    place: sampling.Placement  # the mesh and the shardings of the weights and stacked adapters


def check_inputs(cfg) -> Inputs:
    """Read and check every input (no model but CLIP is loaded); raises naming what is wrong."""
    m, s = cfg.model, cfg.sampling
    for key in ("dit", "vae", "t5", "tokenizer"):
        if not Path(m[key]).exists():
            make = f" (make it with tools/convert_weights.py {key} <the official weights> {m[key]})" if key != "tokenizer" else ""
            raise FileNotFoundError(f"model.{key}: {m[key]} does not exist{make}")
    prompts = read_prompts(cfg.prompt_file)
    seeds = parse_seeds(cfg.seeds)
    sampling.latent_shape(s.num_frames, s.height, s.width)
    sampling.sigma_schedule(s.steps, s.threshold_noise)
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")

    scorer = Scorer(cfg.clip.checkpoint, cfg.clip.tokenizer, cfg.clip.batch)
    ref_emb = None
    if cfg.references:
        videos = reference_videos(cfg.references, cfg.max_references)
        ref_emb = scorer.images(read_references(videos, s.num_frames, cfg.reference_frames, s.fps,
                                                (s.height, s.width)))
    text_emb = scorer.text(prompts + ([cfg.style_prompt] if cfg.style_prompt else []))
    style_emb = text_emb[-1] if cfg.style_prompt else None

    dit_cfg = dit_config(m, remat="none", remat_groups="")
    note = placement.cpu_note(dit_cfg.width)
    if note:
        print(f"mochi_jax.evaluate: {note}", flush=True)
    variants = load_variants(cfg.loras, dit_cfg)
    stacked, targets = stack_adapters(variants)
    place = sampling.placement(dit_cfg, targets, sharding_lib.make_mesh(cfg.mesh.to_dict()), variants=True)
    return Inputs(prompts, seeds, dit_cfg, variants, stacked, targets, scorer, text_emb, ref_emb, style_emb, place)


# ----------------------------------------------------------------------------- rendering and scoring

PARTS = ".parts"  # under out_dir: each finished (prompt, seeds) batch's records and thumbnails, for resuming


def render_key(cfg, inp: Inputs) -> str:
    """A fingerprint of everything a render depends on: the settings (but the output folder and how
    the processes of several hosts join, e.g. the coordinator's port) and the LoRA factors
    themselves (a retrained run under the same path is a different LoRA)."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("out_dir", "distributed")}
    h = hashlib.sha256(json.dumps(json_safe(settings), sort_keys=True, default=str).encode())
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(inp.stacked)[0], key=lambda x: str(x[0])):
        h.update(str(path).encode())
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()


class Parts:
    """The finished batches of an evaluation in out_dir/.parts: a batch's video records and contact
    sheet thumbnails are written (atomically, by process 0) once its videos are, so a killed
    evaluation rerun with the same settings and LoRAs renders only what is missing. Parts of other
    settings are removed."""

    def __init__(self, out_dir: Path, key: str):
        self.dir = out_dir / PARTS
        stamp = self.dir / "key"
        self.main = jax.process_index() == 0
        if self.main and (not stamp.is_file() or stamp.read_text() != key):
            if self.dir.exists():
                print(f"evaluate: {self.dir} holds renders of other settings or LoRAs; rendering anew", flush=True)
                shutil.rmtree(self.dir)
            write_atomically(stamp, key)

    def _path(self, p: int, start: int) -> Path:
        return self.dir / f"{p:04d}_{start:04d}.npz"

    def load(self, p: int, start: int):
        """(records, {(seed, variant index): thumbnails}) of a finished batch, or None (the same
        answer in every process: process 0's). Only process 0 reads the batch (the other processes
        get ([], {}): they write nothing, and their out_dir need not be process 0's)."""
        path = self._path(p, start)
        done = path.is_file() if self.main else False
        if jax.process_count() > 1:
            done = bool(multihost_utils.broadcast_one_to_all(np.int32(done)))
        if not done:
            return None
        if not self.main:
            return [], {}
        with np.load(path) as z:
            records = json.loads(str(z["records"]))
            thumbs = {tuple(json.loads(k)): list(z[k]) for k in z.files if k != "records"}
        return records, thumbs

    def finished(self, batches) -> int:
        """How many of `batches` are finished (process 0's count, in every process)."""
        n = sum(self._path(*b).is_file() for b in batches) if self.main else 0
        if jax.process_count() > 1:
            n = int(multihost_utils.broadcast_one_to_all(np.int32(n)))
        return n

    def save(self, p: int, start: int, records: list, thumbs: dict) -> None:
        if not self.main:
            return
        arrays = {json.dumps(list(k)): np.stack(v) for k, v in thumbs.items()}
        write_atomically(self._path(p, start), lambda f: np.savez(f, records=json.dumps(records), **arrays))


def decode_and_score(cfg, inp: Inputs, vae, z, p: int, seeds: list, out_dir: Path, main: bool) -> tuple[list, dict]:
    """Decode the latents z [K variants, B, ...] of prompt `p` and `seeds`, write each video and its
    poster (`main`: process 0), score them; returns (video records, {(seed, variant index): thumbnails})."""
    s, prompt = cfg.sampling, inp.prompts[p]
    recs, th = [], {}
    for k, v in enumerate(inp.variants):
        frames = sampling.decode_frames(*vae, z[k], tiled=s.tiled_decode)
        for seed, clip in zip(seeds, frames):
            video = out_dir / "videos" / file_slug(v.name) / f"{p + 1:02d}_{file_slug(prompt.lower())}_seed{seed}.mp4"
            if main:
                write_mp4(video, clip, fps=s.fps)
                write_image(out_dir / poster_of(str(video.relative_to(out_dir))), clip[0])
            scores = video_metrics(clip, inp.scorer.images(clip), inp.text_emb[p], inp.ref_emb, inp.style_emb)
            recs.append(json_safe({"variant": v.name, "prompt_index": p, "prompt": prompt, "seed": seed,
                                   "video": str(video.relative_to(out_dir)), "metrics": scores}))
            th[(seed, k)] = thumbnails(clip, cfg.sheet_frames, cfg.sheet_height)
    return recs, th


def render_and_score(cfg, inp: Inputs, out_dir: Path, signals: Signals | None = None) -> tuple[list, list, dict]:
    """Render every (prompt, seeds batch) for all variants over the mesh of cfg.mesh, write the mp4s
    and contact sheets (process 0), score every video; batches finished by an earlier run with the
    same settings are taken from out_dir/.parts. A stop signal (`signals`) raises Stopped: alone at
    once, with several processes before the next batch. Returns (records, sheet paths, timing): in
    process 0 every video's record, in the others those they rendered."""
    m, s = cfg.model, cfg.sampling
    dit_cfg = inp.dit_cfg
    parts = Parts(out_dir, render_key(cfg, inp))
    batches = [(p, start) for p in range(len(inp.prompts)) for start in range(0, len(inp.seeds), cfg.batch_size)]
    done = {b: parts.load(*b) for b in batches}
    todo = [b for b in batches if done[b] is None]
    if len(todo) < len(batches):
        print(f"evaluate: {len(batches) - len(todo)} of {len(batches)} batches already rendered in {parts.dir}",
              flush=True)
    shape = sampling.latent_shape(s.num_frames, s.height, s.width)
    sigmas = sampling.sigma_schedule(s.steps, s.threshold_noise)
    records, sheets, denoise_s, first_call_s, n_calls = [], [], 0.0, None, 0
    try:
        if todo:  # load the models only for what is left
            text = TextEncoder.load(m.t5, m.tokenizer, **t5_settings(m))
            feats, mask = (np.asarray(x) for x in text(inp.prompts + [s.negative_prompt],
                                                       zero_empty=s.zero_empty_negative))
            del text  # T5 is freed before the DiT is loaded
            _, params = load_dit(m.dit, dtype=dit_cfg.param_dtype, shardings=inp.place.params, **dit_cfg.settings())
            stacked = jax.device_put(inp.stacked, inp.place.lora)
            vae_cfg, vae_params = load_vae(m.vae, shardings=inp.place.replicated, **vae_settings(m))
            print(f"evaluating {len(inp.variants) - 1} LoRA(s) against the base on {len(inp.prompts)} prompt(s) x "
                  f"{len(inp.seeds)} seed(s): {s.num_frames} frames at {s.height}x{s.width}, {s.steps} steps, "
                  f"cfg {s.guidance}, "
                  f"{'all variants in one vmapped call' if cfg.batch_loras else 'one variant at a time'}; "
                  + sampling.describe_mesh(inp.place.mesh, sampling.dit_rows(cfg.batch_size, s.guidance),
                                           dit_cfg.num_heads), flush=True)
        for p, prompt in enumerate(inp.prompts):
            thumbs = {}
            for start in range(0, len(inp.seeds), cfg.batch_size):
                batch = inp.seeds[start:start + cfg.batch_size]
                if done[(p, start)] is not None:
                    recs, th = done[(p, start)]
                    records += recs
                    thumbs.update(th)
                    continue
                if signals is not None:
                    signals.stop_point()  # every process stops here, before the same batch
                padded = batch + [batch[-1]] * (cfg.batch_size - len(batch))  # one compiled batch shape
                n = len(padded)
                cond = (np.repeat(feats[p:p + 1], n, 0), np.repeat(mask[p:p + 1], n, 0))
                uncond = (np.repeat(feats[-1:], n, 0), np.repeat(mask[-1:], n, 0))
                t0 = time.time()
                z = sampling.to_host(denoise_variants(dit_cfg, params, stacked, inp.targets,
                                                      sampling.initial_noise(padded, shape), cond, uncond, sigmas,
                                                      s.guidance, batched=cfg.batch_loras))
                dt = time.time() - t0
                first_call_s = dt if first_call_s is None else first_call_s
                denoise_s, n_calls = denoise_s + dt, n_calls + 1
                recs, th = decode_and_score(cfg, inp, (vae_cfg, vae_params), z, p, batch, out_dir, parts.main)
                parts.save(p, start, recs, th)
                records += recs
                thumbs.update(th)
                print(f"prompt {p + 1}/{len(inp.prompts)}, seeds {batch}: {dt:.1f}s", flush=True)
            sheet = out_dir / "sheets" / f"{p + 1:02d}_{file_slug(prompt.lower())}.png"
            if parts.main:
                contact_sheet([(f"{v.name}  seed {sd}", thumbs[(sd, k)])
                               for sd in inp.seeds for k, v in enumerate(inp.variants)], sheet)
            sheets.append(str(sheet.relative_to(out_dir)))
    except Interrupted:  # alone: at once; several processes: where they agreed to stop
        raise Stopped(f"stopped by {signals.name} with {parts.finished(batches)} of {len(batches)} batches rendered "
                      f"(kept in {parts.dir}); rerun the same command to render the rest") from None
    steady = (denoise_s - first_call_s) / (n_calls - 1) if n_calls > 1 else None
    timing = {"denoise_s": denoise_s, "denoise_calls": n_calls, "first_call_s": first_call_s, "steady_call_s": steady,
              "batches_resumed": len(batches) - len(todo)}
    return records, sheets, timing


def write_posters(records, out_dir: Path) -> None:
    """The poster (first frame) of every video that has none yet: videos rendered before posters were
    written, taken from an earlier run's finished batches."""
    for r in records:
        poster, video = out_dir / poster_of(r["video"]), out_dir / r["video"]
        if not poster.is_file() and video.is_file():
            with VideoReader(video) as v:
                first = v.read([0], v.info.fps, (v.info.height, v.info.width)).get(0)
            if first is not None:
                write_image(poster, first)


# ----------------------------------------------------------------------------- the command

def run(cfg) -> dict | None:
    """Check the inputs, render base + LoRAs, score, write the report; returns report.json's dict
    (process 0; the other processes of several hosts None). Raises Stopped on SIGTERM or SIGINT
    (see the module docstring)."""
    placement.start(cfg.get("distributed"))  # several hosts: joined before any device is used
    demo.ensure(cfg)
    with Signals() as signals:
        try:
            return _run(cfg, signals)
        except Interrupted:
            raise Stopped(f"stopped by {signals.name}; the finished batches are kept in {Path(cfg.out_dir) / PARTS}; "
                          f"rerun the same command to continue") from None


def _run(cfg, signals: Signals) -> dict | None:
    t_start = time.time()
    inp = check_inputs(cfg)
    out_dir = writable_dir(cfg.out_dir)  # a read-only or misplaced output folder fails now, not after rendering
    t_inputs = time.time() - t_start
    records, sheets, timing = render_and_score(cfg, inp, out_dir, signals)
    if jax.process_index() != 0:  # the report is process 0's
        print(f"process {jax.process_index()}: rendered; process 0 writes the report", flush=True)
        return None
    names = list(records[0]["metrics"])
    summary, deltas = summarize(records, inp.variants, inp.prompts, names)
    report = json_safe({
        "settings": cfg.to_dict(), "prompts": inp.prompts, "seeds": inp.seeds, "metrics": names,
        "variants": [{"name": v.name, "lora": v.source, "strength": v.strength if v.source else None}
                     for v in inp.variants],
        "lora_structure": {"layers": len(inp.targets), "ranks": sorted({t.rank for t in inp.targets})},
        "summary": summary, "deltas": deltas, "videos": records, "sheets": sheets,
        "curves": training_curves(inp.variants),
        "timing": {"validate_s": t_inputs, **timing, "total_s": time.time() - t_start},
    })
    write_atomically(out_dir / "report.json", json.dumps(report, indent=1) + "\n")
    write_markdown(report, out_dir / "report.md")
    write_posters(records, out_dir)
    curves = write_curves(report["curves"], out_dir)
    write_html(report, out_dir / "report.html")
    print_deltas(report)
    print(f"wrote {out_dir / 'report.json'}, {out_dir / 'report.md'}, {len(sheets)} contact sheet(s), "
          f"{len(records)} videos (posters: {out_dir / 'posters'}/)"
          + (f", {len(curves)} training curve(s) in {out_dir / 'curves'}/" if curves else "")
          + f" in {time.time() - t_start:.1f}s", flush=True)
    print(f"open {out_dir / 'report.html'} in a browser: the videos side by side, the tables and the curves",
          flush=True)
    return report


def main():
    # the report goes to files; the returned dict is not printed
    cli.run("configs/eval.py", lambda cfg: run(cfg) and None, "evaluation configuration: configs/eval.py[:preset]",
            command="mochi_jax.evaluate")


if __name__ == "__main__":
    main()
