"""Compare LoRAs with their base model: `python -m mochi_jax.evaluate --config=configs/eval.py[:demo]`.

Every variant (the base, then each LoRA of `cfg.loras`) renders every prompt of the prompt file
with the same seeds, hence the same initial noise: the videos are paired, and each LoRA's effect
is measured as per-(prompt, seed) differences against the base. Metrics per video (mochi_jax.metrics):
CLIP-T and CLIPScore against the prompt, consecutive-frame and subject consistency of the CLIP
frame embeddings, pixel flicker, and where configured CLIP-I against reference videos and a style
probe. Outputs under cfg.out_dir:

    report.json                      every video's metrics; per variant (and per prompt) the mean and
                                     95% interval over seeds; paired deltas against the base
    report.md                        the same as tables, with the contact sheets
    sheets/<nn>_<prompt>.png         per prompt, one row per (seed, variant), frames evenly spaced
    videos/<variant>/<nn>_<prompt>_seed<seed>.mp4

Rendering: all LoRAs are brought to one structure, the union of their adapted layers with ranks
zero-padded to the largest (exact: zero rows add nothing), the strength and alpha / rank folded
into b, the base a zero adapter. With cfg.batch_loras the adapters are stacked on a leading axis
and ONE jitted step vmaps the DiT over them, so base and LoRAs denoise in the same call; otherwise
each variant runs alone through sampling.denoise. Either way swapping LoRAs of the same shapes
never recompiles (`compile_count`). Everything that can be wrong with the inputs (paths, prompt
file, CLIP weights, a LoRA that does not fit the base, a run without checkpoint, references) is
checked before the first step is rendered.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mochi_jax import metrics as M
from mochi_jax import sampling
from mochi_jax.models.dit import DiTConfig, abstract_variables
from mochi_jax.weights import dit_config
from mochi_jax.models.lora import LoraTarget, layers_of

METRICS = {  # name -> what it measures (report.md's legend)
    "clip_t": "mean cos(frame, prompt) of CLIP embeddings",
    "clip_score": "CLIPScore, 2.5 * max(cos(frame, prompt), 0), mean over frames",
    "consecutive_consistency": "mean cos(frame t-1, frame t) of CLIP embeddings",
    "subject_consistency": "VBench subject consistency on CLIP embeddings (previous and first frame)",
    "flicker": "(255 - mean |frame t+1 - frame t|) / 255 in pixels, 1 = static",
    "clip_i": "mean cos(frame, reference frame) of CLIP embeddings (needs cfg.references)",
    "style": "mean cos(frame, style prompt) of CLIP embeddings (needs cfg.style_prompt)",
}


# ----------------------------------------------------------------------------- inputs

def read_prompts(path) -> list[str]:
    """The non-empty lines of a text file (surrounding whitespace stripped; '#' starts a comment line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    prompts = [s for s in prompts if s and not s.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (one prompt per line)")
    return prompts


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
    from mochi_jax import cache
    from mochi_jax.video import VIDEO_SUFFIXES

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


def evenly_spaced(n_total: int, n: int) -> np.ndarray:
    """n indices spread evenly over 0 .. n_total-1, first and last included."""
    return np.unique(np.round(np.linspace(0, n_total - 1, min(n, n_total))).astype(int))


def read_references(videos, num_frames: int, per_video: int, fps: float, size) -> np.ndarray:
    """uint8 [N, H, W, 3]: `per_video` frames evenly spaced over the first frames of each video."""
    from mochi_jax.video import read_clip

    out = []
    for video, n in videos:
        frames = read_clip(video, n or num_frames, fps=fps, size=size)
        out.append(frames[evenly_spaced(len(frames), per_video)])
    return np.concatenate(out)


# ----------------------------------------------------------------------------- CLIP

class Scorer:
    """A converted CLIP and its tokenizer: (unnormalised) embeddings of prompts and frames."""

    def __init__(self, weights, tokenizer, batch: int = 32):
        from mochi_jax.clip_text import CLIPTokenizer
        from mochi_jax.convert.clip import load_clip

        self.tokenizer = CLIPTokenizer(tokenizer)
        if not Path(weights).exists():
            raise FileNotFoundError(f"CLIP weights {weights} do not exist (convert a CLIP with "
                                    f"`python tools/convert_weights.py clip SRC OUT`)")
        try:
            self.cfg, self.params = load_clip(weights)
        except Exception as e:
            raise ValueError(f"CLIP weights {weights} cannot be read ({type(e).__name__}: {e})") from e
        top = max(self.tokenizer.vocab.values())
        if top >= self.cfg.vocab_size:
            raise ValueError(f"CLIP tokenizer {self.tokenizer.path} has token ids up to {top}, but the CLIP "
                             f"weights {weights} know {self.cfg.vocab_size} tokens")
        self.batch = batch

    def text(self, prompts) -> np.ndarray:
        from mochi_jax.models.clip import encode_text

        return np.asarray(encode_text(self.cfg, self.params, self.tokenizer(list(prompts))))

    def images(self, frames) -> np.ndarray:
        """uint8 [T, H, W, 3] -> [T, D], in fixed-size batches (one compiled shape)."""
        from mochi_jax.clip_image import preprocess
        from mochi_jax.models.clip import encode_image

        pixels = preprocess(frames, size=self.cfg.image_size)
        n, b = len(pixels), self.batch
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], -n % b, axis=0)])
        out = [np.asarray(encode_image(self.cfg, self.params, pixels[i:i + b])) for i in range(0, len(pixels), b)]
        return np.concatenate(out)[:n]


def video_metrics(frames, image_emb, prompt_emb, ref_emb=None, style_emb=None) -> dict[str, float]:
    """Every metric of one video (see METRICS)."""
    out = {"clip_t": M.clip_t(image_emb, prompt_emb), "clip_score": M.clip_score(image_emb, prompt_emb),
           "consecutive_consistency": M.consecutive_consistency(image_emb),
           "subject_consistency": M.subject_consistency(image_emb), "flicker": M.flicker(frames)}
    if ref_emb is not None:
        out["clip_i"] = M.clip_i(image_emb, ref_emb)
    if style_emb is not None:
        out["style"] = M.style_probe(image_emb, style_emb)
    return out


# ----------------------------------------------------------------------------- LoRAs as one structure

@dataclasses.dataclass
class Variant:
    """One column of the comparison. `layers`: {layer path: (a [.., in, r], b [.., r, out])} with
    strength * alpha / r folded into b; empty for the base."""
    name: str
    source: str | None = None
    strength: float = 1.0
    layers: dict = dataclasses.field(default_factory=dict)


def param_shapes(cfg: DiTConfig) -> dict:
    """The DiT's parameter tree as ShapeDtypeStructs (traced, nothing allocated)."""
    return abstract_variables(cfg)["params"]


def check_fits(tree, shapes, source) -> None:
    """Raise LoraFormatError naming `source` and the layer when a factor does not fit the base."""
    from mochi_jax.lora_io import LoraFormatError

    for path, node in layers_of(tree):
        name = "/".join(path)
        kernel = shapes
        for k in path:
            kernel = kernel.get(k, {}) if isinstance(kernel, dict) else {}
        kernel = kernel.get("kernel") if isinstance(kernel, dict) else None
        if kernel is None:
            raise LoraFormatError(f"{source}: LoRA layer {name!r} is not a Dense layer of the base model")
        a, b = np.shape(node["a"]), np.shape(node["b"])
        k = tuple(kernel.shape)
        if a[:-1] != k[:-1] or b[:-2] != k[:-2] or b[-1] != k[-1] or a[-1] != b[-2]:
            raise LoraFormatError(f"{source}: LoRA layer {name!r} has a {a} and b {b}, which do not fit the "
                                  f"base model's kernel {k}")


def load_variant(path, strength: float, dit_cfg: DiTConfig, shapes) -> Variant:
    """A LoRA file in any supported format, or a training run directory, checked against the base."""
    from mochi_jax import lora_io
    from mochi_jax.sample import load_lora_or_run

    p = Path(path)
    tree, targets = load_lora_or_run(p, dit_cfg)
    check_fits(tree, shapes, p)
    combined, _ = lora_io.combine([(tree, targets, strength)])
    name = p.stem if p.is_file() else p.name
    return Variant(name if strength == 1 else f"{name}@{strength:g}", str(p), strength,
                   {path: (node["a"], node["b"]) for path, node in layers_of(combined)})


def stack_adapters(variants) -> tuple[dict, tuple[LoraTarget, ...]]:
    """All variants as one LoRA tree whose leaves have a leading variant axis K, and its targets
    (per-layer patterns, alpha = rank so the scale is 1). A layer a variant does not adapt, and
    ranks below the largest, are zeros: every variant computes exactly its own adapter."""
    k_all = len(variants)
    paths = sorted({p for v in variants for p in v.layers})
    tree, targets = {}, []
    for path in paths:
        have = [v.layers[path] for v in variants if path in v.layers]
        rank = max(a.shape[-1] for a, _ in have)
        a_st = np.zeros((k_all, *have[0][0].shape[:-1], rank), np.float32)
        b_st = np.zeros((k_all, *have[0][1].shape[:-2], rank, have[0][1].shape[-1]), np.float32)
        for k, v in enumerate(variants):
            if path in v.layers:
                a, b = v.layers[path]
                a_st[k, ..., :a.shape[-1]] = a
                b_st[k, ..., :b.shape[-2], :] = b
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node.update(a=a_st, b=b_st)
        targets.append(LoraTarget(f"^{'/'.join(path)}$", rank=rank, alpha=float(rank)))
    return tree, tuple(targets)


def variant_adapter(stacked, k: int):
    """Variant k's adapter out of `stack_adapters`' tree."""
    return jax.tree_util.tree_map(lambda x: x[k], stacked)


# ----------------------------------------------------------------------------- rendering

_TRACES = [0]


@functools.lru_cache(maxsize=16)
def _batched_step(cfg: DiTConfig, targets: tuple[LoraTarget, ...], guided: bool):
    """One Euler step of K variants at once: z [K, B, ...], adapters with a leading K axis."""
    one = sampling.euler_step(cfg, targets, guided)

    def step(params, loras, z, feats, mask, sigma, sigma_next, guidance):
        _TRACES[0] += 1  # runs once per trace, i.e. per compilation
        return jax.vmap(one, in_axes=(None, 0, 0, None, None, None, None, None))(
            params, loras, z, feats, mask, sigma, sigma_next, guidance)

    return jax.jit(step)


def compile_count() -> int:
    """Batched step functions traced here plus step functions sampling.denoise built: a swap of
    LoRAs with the same shapes leaves it unchanged."""
    return _TRACES[0] + sampling.compile_count()


def denoise_variants(cfg: DiTConfig, params, stacked, targets, noise, cond, uncond, sigmas, guidance: float,
                     batched: bool = True):
    """Latents [K, B, ...] of the K variants of `stack_adapters`, all from the same noise [B, ...]."""
    k_all = len(jax.tree_util.tree_leaves(stacked)[0]) if targets else 1
    stacked = jax.device_put(stacked)  # once, not at every step
    if not batched:
        return jnp.stack([sampling.denoise(cfg, params, noise, cond, uncond, sigmas, guidance,
                                           lora=(variant_adapter(stacked, k), targets)) for k in range(k_all)])
    guided = uncond is not None and guidance > 1.0
    feats, mask = cond
    if guided:
        feats, mask = jnp.concatenate([uncond[0], feats]), jnp.concatenate([uncond[1], mask])
    step = _batched_step(cfg, tuple(targets), guided)
    z = jnp.broadcast_to(jnp.asarray(noise, jnp.float32), (k_all, *np.shape(noise)))
    g = jnp.float32(guidance)
    for i in range(len(sigmas) - 1):
        z = step(params, stacked, z, feats, mask, jnp.float32(sigmas[i]), jnp.float32(sigmas[i + 1]), g)
    return z


# ----------------------------------------------------------------------------- report

def file_slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9@._-]+", "_", text).strip("_")[:n] or "x"


def _stats(values) -> dict:
    mean, half = M.mean_ci95(values)
    return {"mean": mean, "ci95": None if math.isnan(half) else half, "n": len(values)}


def summarize(records, variants, prompts, names) -> tuple[dict, dict]:
    """(summary, deltas): per variant (and per prompt) mean and 95% CI of every metric over its
    videos; per LoRA the same of the paired differences LoRA - base (same prompt, same seed)."""
    by_key = {(r["variant"], r["prompt_index"], r["seed"]): r["metrics"] for r in records}
    seeds = sorted({r["seed"] for r in records})
    summary, deltas = {}, {}
    for v in variants:
        def pick(fn, prompt_ids):
            return {m: _stats([fn(v.name, p, s, m) for p in prompt_ids for s in seeds]) for m in names}

        value = lambda name, p, s, m: by_key[(name, p, s)][m]  # noqa: E731
        delta = lambda name, p, s, m: by_key[(name, p, s)][m] - by_key[("base", p, s)][m]  # noqa: E731
        ids = range(len(prompts))
        summary[v.name] = {"all": pick(value, ids), "per_prompt": [pick(value, [p]) for p in ids]}
        if v.name != "base":
            deltas[v.name] = {"all": pick(delta, ids), "per_prompt": [pick(delta, [p]) for p in ids]}
    return summary, deltas


def fmt(stat: dict, signed: bool = False) -> str:
    m = f"{stat['mean']:+.4f}" if signed else f"{stat['mean']:.4f}"
    return m + (f" ± {stat['ci95']:.4f}" if stat["ci95"] is not None else "")


def table(rows: dict, names, signed: bool = False, first: str = "variant") -> list[str]:
    """Markdown table lines: one row per {label: {metric: stat}}."""
    out = [f"| {first} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    out += [f"| {label} | " + " | ".join(fmt(stats[m], signed) for m in names) + " |" for label, stats in rows.items()]
    return out


def contact_sheet(rows, path, gap: int = 4) -> Path:
    """PNG with one row per (label, [uint8 thumbnails of equal height]), the label on the left."""
    from PIL import Image, ImageDraw

    font_draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + max(int(font_draw.textlength(label)) for label, _ in rows)
    h = rows[0][1][0].shape[0]
    width = label_w + max(sum(t.shape[1] + gap for t in thumbs) for _, thumbs in rows)
    sheet = Image.new("RGB", (width, len(rows) * (h + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, thumbs) in enumerate(rows):
        y = gap + i * (h + gap)
        draw.text((4, y + h // 2 - 6), label, fill="black")
        x = label_w
        for t in thumbs:
            sheet.paste(Image.fromarray(t), (x, y))
            x += t.shape[1] + gap
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def thumbnails(frames, n: int, height: int) -> list[np.ndarray]:
    from PIL import Image

    t, h, w, _ = frames.shape
    size = (max(1, round(w * height / h)), height)
    return [np.asarray(Image.fromarray(frames[i]).resize(size, Image.Resampling.BILINEAR))
            for i in evenly_spaced(t, n)]


def write_markdown(report: dict, path: Path) -> Path:
    names, s, d = report["metrics"], report["summary"], report["deltas"]
    c = report["settings"]
    lines = ["# LoRA evaluation", "",
             f"{len(report['prompts'])} prompt(s) x seeds {report['seeds']}; {c['num_frames']} frames at "
             f"{c['height']}x{c['width']}, {c['steps']} steps, cfg {c['guidance']}. Every variant renders the "
             "same prompts from the same noise. Values: mean ± half-width of the 95% t-interval.", "",
             "## Mean over all videos", ""] + table({k: v["all"] for k, v in s.items()}, names)
    if d:
        lines += ["", "## Change against the base (paired by prompt and seed)", ""]
        lines += table({k: v["all"] for k, v in d.items()}, names, signed=True, first="LoRA")
    lines += ["", "Metrics: " + "; ".join(f"**{m}** {METRICS[m]}" for m in names) + "."]
    for p, prompt in enumerate(report["prompts"]):
        lines += ["", f"## {p + 1}. {prompt}", ""] + table({k: v["per_prompt"][p] for k, v in s.items()}, names)
        if d:
            lines += [""] + table({f"Δ {k}": v["per_prompt"][p] for k, v in d.items()}, names, signed=True,
                                  first="LoRA - base")
        lines += ["", f"![contact sheet]({report['sheets'][p]})"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# ----------------------------------------------------------------------------- demo inputs

def write_demo_clip(weights, tokenizer, seed: int = 0) -> None:
    """A tiny random CLIP (32 px, width 32) in the converted layout at `weights`, and a byte-level
    CLIP tokenizer (no merges) at `tokenizer`; each only if missing."""
    from mochi_jax.clip_text import BOS, EOS, bytes_to_unicode
    from mochi_jax.models.clip import CLIPConfig, init_params
    from mochi_jax.weights import save_model

    tokenizer = Path(tokenizer)
    chars = sorted(bytes_to_unicode().values(), key=ord)
    vocab = chars + [ch + "</w>" for ch in chars] + [BOS, EOS]
    if not (tokenizer / "vocab.json").is_file():
        tokenizer.mkdir(parents=True, exist_ok=True)
        (tokenizer / "merges.txt").write_text("#version: 0.2\n")
        (tokenizer / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    if not Path(weights).exists():
        cfg = CLIPConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                         vision_mlp=64, vocab_size=len(vocab), text_width=32, text_layers=2, text_heads=2,
                         text_mlp=64, projection_dim=16)
        save_model(weights, init_params(cfg, jax.random.PRNGKey(seed)), "clip", cfg.arch(),
                   unstack=[(("vision", "blocks"), cfg.vision_layers), (("text", "blocks"), cfg.text_layers)])


def prepare_demo(cfg) -> None:
    """The demo's inputs under cfg.demo_root, made if missing: the tiny random Mochi models, a tiny
    random CLIP and a prompt file."""
    from mochi_jax.demo import CORPUS, write_demo_models

    write_demo_models(Path(cfg.demo_root) / "models")
    write_demo_clip(cfg.clip, cfg.clip_tokenizer)
    prompts = Path(cfg.prompt_file)
    if not prompts.is_file():
        prompts.parent.mkdir(parents=True, exist_ok=True)
        prompts.write_text("\n".join(CORPUS[:2]) + "\n")


# ----------------------------------------------------------------------------- the run

def run(cfg) -> dict:
    """Validate the inputs, render base + LoRAs, score, write the report; returns report.json's dict."""
    from mochi_jax.convert import load_vae
    from mochi_jax.sample import parse_loras
    from mochi_jax.text import TextEncoder
    from mochi_jax.video import write_mp4
    from mochi_jax.weights import load_dit

    t_start = time.time()
    if cfg.get("demo_root"):
        prepare_demo(cfg)
    for key in ("dit", "vae", "t5", "tokenizer"):
        if not Path(cfg[key]).exists():
            raise FileNotFoundError(f"{key}: {cfg[key]} does not exist")
    prompts = read_prompts(cfg.prompt_file)
    seeds = parse_seeds(cfg.seeds)
    shape = sampling.latent_shape(cfg.num_frames, cfg.height, cfg.width)
    sigmas = sampling.sigma_schedule(cfg.steps, cfg.threshold_noise)
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")

    scorer = Scorer(cfg.clip, cfg.clip_tokenizer, cfg.clip_batch)
    ref_emb = None
    if cfg.references:
        videos = reference_videos(cfg.references, cfg.max_references)
        ref_emb = scorer.images(read_references(videos, cfg.num_frames, cfg.reference_frames, cfg.fps,
                                                (cfg.height, cfg.width)))
    text_emb = scorer.text(prompts + ([cfg.style_prompt] if cfg.style_prompt else []))
    style_emb = text_emb[-1] if cfg.style_prompt else None

    dit_cfg = dit_config(cfg.dit, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                         attention=cfg.attention, remat="none")
    shapes = param_shapes(dit_cfg)
    specs = parse_loras(cfg.loras if isinstance(cfg.loras, str) else ",".join(cfg.loras))
    variants = [Variant("base")] + [load_variant(path, s, dit_cfg, shapes) for path, s in specs]
    seen: dict[str, int] = {}
    for v in variants:  # unique names
        seen[v.name] = seen.get(v.name, 0) + 1
        if seen[v.name] > 1:
            v.name = f"{v.name}_{seen[v.name]}"
    stacked, targets = stack_adapters(variants)
    t_inputs = time.time() - t_start

    text = TextEncoder.load(cfg.t5, cfg.tokenizer)
    feats, mask = (np.asarray(x) for x in text(prompts + [cfg.negative_prompt], zero_empty=cfg.zero_empty_negative))
    del text
    dit_cfg, params = load_dit(cfg.dit, dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                               attention=cfg.attention, remat="none")
    vae_cfg, vae_params = load_vae(cfg.vae, compute_dtype=cfg.compute_dtype)
    t_load = time.time() - t_start - t_inputs
    print(f"evaluating {len(variants) - 1} LoRA(s) against the base on {len(prompts)} prompt(s) x {len(seeds)} "
          f"seed(s): {cfg.num_frames} frames at {cfg.height}x{cfg.width}, {cfg.steps} steps, cfg {cfg.guidance}, "
          f"{'all variants in one vmapped call' if cfg.batch_loras else 'one variant at a time'}", flush=True)

    out_dir = Path(cfg.out_dir)
    records, sheets, denoise_s, first_call_s, n_calls = [], [], 0.0, None, 0
    for p, prompt in enumerate(prompts):
        thumbs = {}
        for start in range(0, len(seeds), cfg.batch_size):
            batch = seeds[start:start + cfg.batch_size]
            padded = batch + [batch[-1]] * (cfg.batch_size - len(batch))  # one compiled batch shape
            n = len(padded)
            cond = (np.repeat(feats[p:p + 1], n, 0), np.repeat(mask[p:p + 1], n, 0))
            uncond = (np.repeat(feats[-1:], n, 0), np.repeat(mask[-1:], n, 0))
            t0 = time.time()
            z = denoise_variants(dit_cfg, params, stacked, targets, sampling.initial_noise(padded, shape), cond,
                                 uncond, sigmas, cfg.guidance, batched=cfg.batch_loras)
            z = jax.device_get(z)
            dt = time.time() - t0
            first_call_s = dt if first_call_s is None else first_call_s
            denoise_s, n_calls = denoise_s + dt, n_calls + 1
            for k, v in enumerate(variants):
                frames = sampling.decode_frames(vae_cfg, vae_params, z[k], tiled=cfg.tiled_decode)
                for seed, clip in zip(batch, frames):
                    video = write_mp4(out_dir / "videos" / file_slug(v.name) /
                                      f"{p + 1:02d}_{file_slug(prompt.lower())}_seed{seed}.mp4", clip, fps=cfg.fps)
                    scores = video_metrics(clip, scorer.images(clip), text_emb[p], ref_emb, style_emb)
                    records.append({"variant": v.name, "prompt_index": p, "prompt": prompt, "seed": seed,
                                    "video": str(video.relative_to(out_dir)), "metrics": scores})
                    thumbs[(seed, k)] = thumbnails(clip, cfg.sheet_frames, cfg.sheet_height)
            print(f"prompt {p + 1}/{len(prompts)}, seeds {batch}: {dt:.1f}s", flush=True)
        rows = [(f"{v.name}  seed {s}", thumbs[(s, k)]) for s in seeds for k, v in enumerate(variants)]
        sheet = contact_sheet(rows, out_dir / "sheets" / f"{p + 1:02d}_{file_slug(prompt.lower())}.png")
        sheets.append(str(sheet.relative_to(out_dir)))

    names = list(records[0]["metrics"])
    summary, deltas = summarize(records, variants, prompts, names)
    steady = (denoise_s - first_call_s) / (n_calls - 1) if n_calls > 1 else None
    report = {
        "settings": cfg.to_dict(), "prompts": prompts, "seeds": seeds, "metrics": names,
        "variants": [{"name": v.name, "lora": v.source, "strength": v.strength if v.source else None}
                     for v in variants],
        "lora_structure": {"layers": len(targets), "ranks": sorted({t.rank for t in targets})},
        "summary": summary, "deltas": deltas, "videos": records, "sheets": sheets,
        "timing": {"validate_s": t_inputs, "load_s": t_load, "denoise_s": denoise_s, "denoise_calls": n_calls,
                   "first_call_s": first_call_s, "steady_call_s": steady, "total_s": time.time() - t_start},
        "compile_count": compile_count(),
    }
    report = _json_safe(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, out_dir / "report.md")
    print_deltas(report)
    print(f"wrote {out_dir / 'report.json'}, {out_dir / 'report.md'}, {len(sheets)} contact sheet(s) and "
          f"{len(records)} videos in {time.time() - t_start:.1f}s", flush=True)
    return report


def print_deltas(report: dict) -> None:
    """Each LoRA's change against the base, mean ± 95% CI over all (prompt, seed) pairs."""
    names = report["metrics"]
    rows = report["deltas"] or {"base": report["summary"]["base"]}
    title = "LoRA - base (paired)" if report["deltas"] else "base (no LoRAs given)"
    width = max(len(title), *(len(k) for k in rows)) + 2
    cols = [max(len(m), 19) + 2 for m in names]
    print(title.ljust(width) + "".join(m.rjust(c) for m, c in zip(names, cols)))
    for label, stats in rows.items():
        print(label.ljust(width) + "".join(fmt(stats["all"][m], bool(report["deltas"])).rjust(c)
                                           for m, c in zip(names, cols)))


def main():
    from mochi_jax import cli

    # the report goes to files; the returned dict is not printed
    cli.run("configs/eval.py", lambda cfg: run(cfg) and None, "evaluation configuration: configs/eval.py[:preset]")


if __name__ == "__main__":
    main()
