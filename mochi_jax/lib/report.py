"""The evaluation report: per-variant statistics, paired deltas against the base, markdown
tables, contact sheets and the console summary.

    summary, deltas = summarize(records, variants, prompts, names)
    write_markdown(report, out_dir / "report.md")
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mochi_jax.lib import metrics as M
from mochi_jax.lib.video import evenly_spaced


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
    t, h, w, _ = frames.shape
    size = (max(1, round(w * height / h)), height)
    return [np.asarray(Image.fromarray(frames[i]).resize(size, Image.Resampling.BILINEAR))
            for i in evenly_spaced(t, n)]


def write_markdown(report: dict, path: Path) -> Path:
    names, s, d = report["metrics"], report["summary"], report["deltas"]
    c = report["settings"]["sampling"]
    lines = ["# LoRA evaluation", "",
             f"{len(report['prompts'])} prompt(s) x seeds {report['seeds']}; {c['num_frames']} frames at "
             f"{c['height']}x{c['width']}, {c['steps']} steps, cfg {c['guidance']}. Every variant renders the "
             "same prompts from the same noise. Values: mean ± half-width of the 95% t-interval.", "",
             "## Mean over all videos", ""] + table({k: v["all"] for k, v in s.items()}, names)
    if d:
        lines += ["", "## Change against the base (paired by prompt and seed)", ""]
        lines += table({k: v["all"] for k, v in d.items()}, names, signed=True, first="LoRA")
    lines += ["", "Metrics: " + "; ".join(f"**{m}** {M.METRICS[m]}" for m in names) + "."]
    for p, prompt in enumerate(report["prompts"]):
        lines += ["", f"## {p + 1}. {prompt}", ""] + table({k: v["per_prompt"][p] for k, v in s.items()}, names)
        if d:
            lines += [""] + table({f"Δ {k}": v["per_prompt"][p] for k, v in d.items()}, names, signed=True,
                                  first="LoRA - base")
        lines += ["", f"![contact sheet]({report['sheets'][p]})"]
    path.write_text("\n".join(lines) + "\n")
    return path


def json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


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
