"""Clips + captions -> the training cache (VAE posteriors and T5 features; format in
mochi_jax/lib/cache.py). The command is `python -m mochi_jax.prepare` (mochi_jax/prepare.py).

Every video (.mp4 .mov .webm .mkv, searched recursively, hidden files ignored) needs a caption
in a same-named .txt file. Each clip takes the bucket (H, W) with the closest aspect ratio
(distance of log(W/H)); its first `num_frames` frames at `fps` are cover-resized and centre-
cropped to it (mochi_jax.lib.video.read_clip) and encoded by the VAE; captions are encoded by T5 in
batches of `text_batch_size`.

Robustness: a bad clip (no caption, empty caption, zero-byte, unreadable or corrupt, too short,
too small with upscale=False) is skipped, recorded with its reason in the manifest and listed
in the final report; it never stops the run. Every file is written under a temporary name and
renamed, and the manifest is rewritten after every clip, so a killed run loses at most the clip
in flight. Re-running skips the clips already cached (nothing is re-read or re-validated) unless
`overwrite=True`; a cache made with different content settings (models, fps, frames, buckets,
...) is refused rather than mixed.

Devices: by default every local device is used (`devices`, `mesh`; see Models). T5's weights are
FSDP-sharded and each text batch is split between devices; the VAE's weights are replicated and
each clip is split spatially, so one long clip's activations are spread over all devices. The
cache is the same as one device makes (float rounding aside), so either may resume the other.
"""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from mochi_jax.checkpoints.common import read_metadata, writable_dir
from mochi_jax.checkpoints.vae import load_vae
from mochi_jax.lib import cache as cache_lib
from mochi_jax.lib.text import TextEncoder
from mochi_jax.lib.video import VIDEO_SUFFIXES, VideoError, from_unit, probe, read_clip, to_unit, write_mp4
from mochi_jax.models import sharding as sharding_lib
from mochi_jax.models import t5 as t5_lib
from mochi_jax.models import vae as vae_lib
from mochi_jax.models.layers import Dense, RMSNorm
from mochi_jax.models.t5 import T5Encoder
from mochi_jax.models.vae import latent_frames

# Settings that change what a cached clip holds: an existing cache made with other values is not reused.
CONTENT_KEYS = ("vae", "t5", "tokenizer", "fps", "num_frames", "buckets", "upscale", "max_length",
                "vae_dtype", "t5_dtype", "tiled", "tile_size", "tile_overlap")


class Skip(Exception):
    """A clip that is left out; str() is the reason."""


# ----------------------------------------------------------------------------- inputs

def find_sources(input_dir) -> list[Path]:
    """Videos under input_dir (recursive, sorted, hidden files and folders ignored)."""
    root = Path(input_dir)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def orphan_captions(input_dir, sources) -> list[Path]:
    """.txt files under input_dir (hidden ones ignored) that caption none of `sources`."""
    root = Path(input_dir)
    captioned = {src.with_suffix("") for src in sources}
    return sorted(p for p in root.rglob("*.txt") if p.is_file() and p.with_suffix("") not in captioned
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def clip_name(source: Path, input_dir) -> str:
    """'sub/clip' for input_dir/sub/clip.mp4."""
    return source.relative_to(input_dir).with_suffix("").as_posix()


def read_caption(video: Path) -> str:
    """The stripped text of video's same-named .txt, or Skip('no caption' | 'empty caption' | ...)."""
    txt = video.with_suffix(".txt")
    if not txt.is_file():
        raise Skip(f"no caption: {txt.name} not found")
    try:
        caption = txt.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise Skip(f"unreadable caption: {txt.name} ({e})") from e
    if not caption:
        raise Skip(f"empty caption: {txt.name} has no text")
    return caption


def choose_bucket(height: int, width: int, buckets) -> tuple[int, int]:
    """The (H, W) bucket whose aspect ratio is closest to width/height (in log ratio; first on ties)."""
    return tuple(min(buckets, key=lambda b: abs(math.log((b[1] / b[0]) / (width / height)))))


# ----------------------------------------------------------------------------- models

class Models:
    """The VAE and T5 of a prepare config, loaded once, with numpy in and out.

    On one device (cfg.devices=1, or a machine with one) everything lives on that device. On
    several: T5's weights are sharded over `mesh` (cfg.mesh, logical names from t5.logical_axes)
    and each text batch is split over data x fsdp where it divides; the VAE's weights are
    replicated and each clip's pixels are split spatially (`spatial_split`) so one long clip's
    encode is spread over all devices; XLA's SPMD partitioner exchanges the convolution halos and
    all-reduces the GroupNorm statistics. Tiled encoding/decoding is not split (each device runs
    the whole clip)."""

    def __init__(self, cfg):

        for what, path in (("VAE", cfg.vae), ("T5", cfg.t5), ("tokenizer", cfg.tokenizer)):
            if not Path(path).exists():
                raise FileNotFoundError(f"{what} not found at {path}: convert the weights with tools/convert_weights.py "
                                        f"(see the README) or set --config.{what.lower()}=...")
        self.tiled, self.batch = bool(cfg.tiled), int(cfg.text_batch_size)
        self.mesh = prepare_mesh(cfg)
        self._splits, self._t5 = {}, None
        t5_shardings = vae_shardings = self.text_sharding = None
        if self.mesh is not None:

            t5_shardings = _t5_shardings(cfg.t5, self.mesh)
            vae_shardings = NamedSharding(self.mesh, PartitionSpec())  # replicated: every leaf
            # the text batch over every mesh axis that divides it (the T5 computes data-parallel)
            batch_rule = (("batch", tuple(a for a in sharding_lib.AXES if a in self.mesh.shape)),)
            rows = sharding_lib.spec(("batch",), (self.batch,), self.mesh, rules=batch_rule)[0]
            self.text_sharding = NamedSharding(self.mesh, PartitionSpec(rows, None))
        self.vae_cfg, self.vae_params = load_vae(cfg.vae, dtype=cfg.vae_dtype or None, shardings=vae_shardings,
                                                 tile_size=tuple(cfg.tile_size), tile_overlap=tuple(cfg.tile_overlap))
        self.text = TextEncoder.load(cfg.t5, cfg.tokenizer, max_length=cfg.max_length, dtype=cfg.t5_dtype or None,
                                     shardings=t5_shardings)
        self._encode = jax.jit(vae_lib.encode, static_argnames=("cfg", "tiled"))
        self._decode = jax.jit(vae_lib.decode, static_argnames=("cfg", "tiled"))
        if self.mesh is not None:
            split = self.text_sharding.spec[0]
            shape = {k: v for k, v in self.mesh.shape.items() if v > 1}
            print(f"prepare: {self.mesh.devices.size} devices, mesh {shape}: T5 weights sharded, text batches of "
                  f"{self.batch} " + (f"split over {split}" if split else "replicated (the batch does not divide)")
                  + "; VAE weights replicated, " + ("tiled clips encoded whole on every device" if self.tiled
                                                    else "each clip split spatially"))

    # ------------------------------------------------------------------ placement

    def _spatial(self, latent_hw):
        """(sharding, encode, decode) for a clip of latent size (h, w): pixels [1, 3, T, H, W] and
        latents [1, 12, t, h, w] split along the height over dh and the width over dw devices
        (`spatial_split`), copies on any devices left, and the jitted VAE calls with their outputs
        pinned to that sharding. (None, plain jits) on one device or when tiled."""

        key = tuple(int(v) for v in latent_hw)
        if self.mesh is None or self.tiled:
            return None, self._encode, self._decode
        if key not in self._splits:
            n = self.mesh.devices.size
            dh, dw = spatial_split(*key, n)
            if dh * dw < n:
                print(f"prepare: note: a {key[0]}x{key[1]}-latent clip ({8 * key[0]}x{8 * key[1]} pixels) "
                      + (f"splits over {dh * dw} of the {n} devices ({dh} along the height x {dw} along the width; "
                         f"neither side divides further), the other devices compute copies" if dh * dw > 1 else
                         f"cannot be split over the {n} devices (neither latent side divides); every device "
                         "encodes it whole"))
            # the devices in the order of self.mesh, so the replicated weights share the device assignment
            mesh = Mesh(self.mesh.devices.reshape(dh, dw, n // (dh * dw)), ("height", "width", "copies"))
            sh = NamedSharding(mesh, PartitionSpec(None, None, None, "height", "width"))
            self._splits[key] = (sh, jax.jit(vae_lib.encode, static_argnames=("cfg", "tiled"), out_shardings=(sh, sh)),
                                 jax.jit(vae_lib.decode, static_argnames=("cfg", "tiled"), out_shardings=sh))
        return self._splits[key]

    # ------------------------------------------------------------------ encoders

    def encode_call(self, pixels: np.ndarray):
        """(the jitted encode for these pixels [1, 3, T, H, W], the pixels placed for it)."""
        s = self.vae_cfg.spatial_factor
        sh, enc, _ = self._spatial((pixels.shape[-2] // s, pixels.shape[-1] // s))
        return enc, (pixels if sh is None else jax.device_put(pixels, sh))

    def encode_video(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [T, H, W, 3] -> (mean, logvar) float32 [12, t, h, w] in VAE space."""
        enc, pixels = self.encode_call(np.moveaxis(to_unit(frames), -1, 0)[None])  # [1, 3, T, H, W]
        mean, logvar = enc(self.vae_params, pixels, cfg=self.vae_cfg, tiled=self.tiled)
        return np.asarray(mean[0], np.float32), np.asarray(logvar[0], np.float32)

    def decode(self, mean: np.ndarray) -> np.ndarray:
        """VAE-space latents [12, t, h, w] -> uint8 [T, H, W, 3]."""
        sh, _, dec = self._spatial(mean.shape[-2:])
        z = mean[None] if sh is None else jax.device_put(mean[None], sh)
        pixels = dec(self.vae_params, z, cfg=self.vae_cfg, tiled=self.tiled)
        return from_unit(np.moveaxis(np.asarray(pixels[0]), 0, -1))

    def _text_batch(self, prompts: list[str]):
        if self.mesh is None:
            return self.text(prompts)

        if self._t5 is None:
            self._t5 = _batch_split_t5(self.text.cfg, self.text_sharding)
        ids, mask = self.text.tokenizer(prompts)
        return self._t5(self.text.params, *(jax.device_put(a, self.text_sharding) for a in (ids, mask)))

    def encode_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (feats float32 [B, L, D], mask bool [B, L]); batches padded to one size (one compile)."""
        padded = list(prompts) + [""] * (-len(prompts) % self.batch)
        feats, masks = zip(*(self._text_batch(padded[i:i + self.batch]) for i in range(0, len(padded), self.batch)))
        n = len(prompts)
        return np.concatenate(feats)[:n].astype(np.float32), np.concatenate(masks)[:n].astype(bool)


def prepare_mesh(cfg):
    """The device mesh of a prepare run (cfg.devices of this process's devices, -1 = all, shaped by
    cfg.mesh), or None when that is one device: then everything runs as on a single-device machine."""

    devices = jax.local_devices()
    want = int(cfg.get("devices", -1))
    if want == 0 or want < -1 or want > len(devices):
        raise ValueError(f"devices={want}: choose -1 (all {len(devices)}) or 1..{len(devices)}")
    devices = devices if want == -1 else devices[:want]
    if len(devices) == 1:
        return None
    sizes = cfg.get("mesh", None)
    sizes = dict(sizes.to_dict() if hasattr(sizes, "to_dict") else sizes or {"fsdp": -1})
    return sharding_lib.make_mesh(sizes, devices)


def spatial_split(latent_h: int, latent_w: int, n: int) -> tuple[int, int]:
    """(dh, dw): how many devices split a clip's latent height and width. Each must divide its side
    (then every encoder resolution, 8, 4, 2 and 1 pixels per latent, divides too) and dh * dw must
    divide n; the most devices win, then the wider split: the width first, then the height, and
    (1, 1) (no split) when neither side divides."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    best = (1, 1)
    for dw in divisors:
        for dh in divisors:
            if (n % (dh * dw) or latent_w % dw or latent_h % dh
                    or (dh * dw, dw) <= (best[0] * best[1], best[1])):
                continue
            best = (dh, dw)
    return best


def _batch_split_t5(t5_cfg, text_sharding):
    """The jitted T5 encoder (ids, mask [B, L] -> features, mask) for sharded weights: every Dense
    and RMSNorm sees and returns activations [B, L, features] split along the batch only, as
    `text_sharding` splits ids, and whole along the features. XLA then all-gathers each layer's
    weights as it runs (FSDP) and every device computes its own prompts exactly as one device
    would; left to itself XLA may keep the weights split and add up partial products from the
    devices, which rounds differently (in bfloat16, visibly)."""

    rows = NamedSharding(text_sharding.mesh, PartitionSpec(text_sharding.spec[0], None, None))

    def keep_rows(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, (Dense, RMSNorm)):
            return next_fun(*args, **kwargs)
        x = jax.lax.with_sharding_constraint(args[0], rows)
        return jax.lax.with_sharding_constraint(next_fun(x, *args[1:], **kwargs), rows)

    @jax.jit
    def run(params, ids, mask):
        with nn.intercept_methods(keep_rows):
            return T5Encoder(t5_cfg).apply({"params": params}, ids, mask)

    return run


def _t5_shardings(path, mesh):
    """NamedShardings for the converted T5 at `path` (stacked layout) from its logical axes, or None
    if `path` is no converted T5 (load_t5 then says what is wrong)."""
    meta = read_metadata(path)
    if meta.get("model") != "t5_encoder" or "config" not in meta:
        return None
    cfg = t5_lib.T5Config.from_dict(meta["config"])
    abstract = t5_lib.abstract_params(cfg)
    return sharding_lib.param_shardings(t5_lib.logical_axes(cfg), abstract, mesh)


def load_models(cfg) -> Models:
    return Models(cfg)


# ----------------------------------------------------------------------------- the run

def settings(cfg) -> dict:
    """The config as plain JSON values (tuples become lists), as stored in the manifest."""
    return json.loads(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)))


def check_config(cfg) -> None:
    latent_frames(int(cfg.num_frames))  # raises unless 6k+1
    if not cfg.buckets or any(len(b) != 2 or b[0] % 8 or b[1] % 8 or min(b) <= 0 for b in cfg.buckets):
        raise ValueError(f"buckets must be (H, W) pairs of positive multiples of 8, got {cfg.buckets}")
    if cfg.fps <= 0 or cfg.text_batch_size < 1:
        raise ValueError(f"fps and text_batch_size must be positive, got {cfg.fps} and {cfg.text_batch_size}")


def _existing(out: Path, cfg, current: dict) -> dict[str, dict]:
    """Clip entries of an earlier run in `out` whose files still exist: {name: entry}."""
    if cfg.overwrite or not (out / cache_lib.MANIFEST).exists():
        return {}
    old = cache_lib.read_manifest(out)
    differ = {k: (old.get("config", {}).get(k), current[k]) for k in CONTENT_KEYS
              if old.get("config", {}).get(k) != current[k]}
    if differ:
        lines = ", ".join(f"{k}: cached {a!r} vs now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"{out} holds a cache made with other settings ({lines}); use another output_dir "
                         "or --config.overwrite=True to re-encode everything")
    return {c["name"]: c for c in old["clips"] if (out / c["file"]).is_file()}


def prepare(cfg) -> dict:
    """Encode input_dir into output_dir; returns the report {'output_dir', 'clips' (all cached names),
    'new' (encoded now), 'reused' (already cached), 'skipped' [{'source', 'reason'}]} and prints it."""
    check_config(cfg)
    input_dir, out = Path(cfg.input_dir), Path(cfg.output_dir)
    if not input_dir.exists():
        raise FileNotFoundError(errno.ENOENT, "input_dir does not exist", str(input_dir))
    if not input_dir.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "input_dir is a file, not a folder of clips", str(input_dir))
    sources = find_sources(input_dir)
    orphans = orphan_captions(input_dir, sources)
    if not sources:  # before any model is loaded
        raise ValueError(f"{input_dir}: no videos ({' '.join(VIDEO_SUFFIXES)}) to prepare, so no cache to write"
                         + (f"; {len(orphans)} caption(s) without a video: "
                            + ", ".join(str(p.relative_to(input_dir)) for p in orphans[:10])
                            + (" ..." if len(orphans) > 10 else "") if orphans else ""))
    writable_dir(out)
    cache_lib.remove_stale_temporaries(out)
    current = settings(cfg)
    done = _existing(out, cfg, current)
    manifest = {"format": cache_lib.FORMAT, "config": current, "clips": [],
                "empty_prompt": cache_lib.EMPTY_PROMPT, "skipped": []}
    report = {"output_dir": str(out), "new": [], "reused": [], "skipped": manifest["skipped"]}

    models = None

    def get_models() -> Models:
        nonlocal models
        if models is None:
            models = load_models(cfg)
        return models

    def save_manifest():
        manifest["clips"].sort(key=lambda c: c["name"])
        cache_lib.write_manifest(out, manifest)

    empty_prompt_due = [bool(cfg.overwrite or not (out / cache_lib.EMPTY_PROMPT).is_file())]

    def encode_empty_prompt():  # with the first clip encoded (no model is loaded for a run that has none)
        if empty_prompt_due[0]:
            feats, mask = get_models().encode_text([""])
            cache_lib.write_arrays(out / cache_lib.EMPTY_PROMPT, {"t5_feats": feats[0], "t5_mask": mask[0]})
            empty_prompt_due[0] = False

    manifest["skipped"] += [{"source": str(p), "reason": f"caption without a video: no {p.stem}"
                             f"{'/'.join(VIDEO_SUFFIXES)} beside it"} for p in orphans]
    bar = tqdm(total=len(sources), desc="prepare", unit="clip")

    def skip(source, reason: str):
        manifest["skipped"].append({"source": str(source), "reason": reason})
        bar.update()

    todo, names = [], {}
    for src in sources:
        name = clip_name(src, input_dir)
        if name in names:
            skip(src, f"duplicate name: {names[name].name} has the same name and caption file")
        elif name in done:
            manifest["clips"].append(done[name])
            report["reused"].append(name)
            bar.update()
        else:
            todo.append((name, src))
        names.setdefault(name, src)

    for start in range(0, len(todo), cfg.text_batch_size):
        ready = []  # (name, source, caption, frames) of clips that read fine
        for name, src in todo[start:start + cfg.text_batch_size]:
            try:
                caption = read_caption(src)
                bucket = choose_bucket(*probe(src)[:2], cfg.buckets)
                ready.append((name, src, caption, read_clip(src, cfg.num_frames, cfg.fps, bucket, cfg.upscale)))
            except Skip as e:
                skip(src, str(e))
            except VideoError as e:
                skip(src, f"{e.kind}: {e.detail}")
        save_manifest()
        if not ready:
            continue
        encode_empty_prompt()
        feats, masks = get_models().encode_text([r[2] for r in ready])
        for (name, src, caption, frames), feat, mask in zip(ready, feats, masks):
            mean, logvar = get_models().encode_video(frames)
            file = f"clips/{name}.safetensors"
            cache_lib.write_arrays(out / file, {"mean": mean, "logvar": logvar, "t5_feats": feat, "t5_mask": mask})
            manifest["clips"].append({
                "name": name, "file": file, "source": str(src), "caption": caption,
                "num_frames": int(frames.shape[0]), "height": int(frames.shape[1]), "width": int(frames.shape[2]),
                "latent_shape": list(mean.shape)})
            save_manifest()
            if cfg.previews:
                recon = get_models().decode(mean)
                write_mp4(out / "previews" / f"{name}.mp4", np.concatenate([frames, recon], axis=2), fps=cfg.fps)
            report["new"].append(name)
            bar.update()
    bar.close()
    if manifest["clips"]:
        encode_empty_prompt()  # e.g. a resumed cache whose empty-prompt file went missing
    save_manifest()
    report["clips"] = [c["name"] for c in manifest["clips"]]
    print(format_report(report))
    if not manifest["clips"]:
        raise ValueError(f"{input_dir}: none of its {len(sources)} videos could be prepared (the reasons are "
                         "listed above)")
    return report


def format_report(report: dict) -> str:
    lines = [f"prepared {len(report['clips'])} clips in {report['output_dir']} "
             f"({len(report['new'])} encoded now, {len(report['reused'])} already cached), "
             f"{len(report['skipped'])} skipped" + (":" if report["skipped"] else "")]
    lines += [f"  skipped {s['source']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines)
