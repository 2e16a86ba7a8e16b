"""The evaluation report: per-variant statistics, paired deltas against the base, markdown
tables, contact sheets, the HTML page and the console summary.

    summary, deltas = summarize(records, variants, prompts, names)
    write_markdown(report, out_dir / "report.md")
    write_curves(training_curves(variants), out_dir)   # the LoRAs' training curves, under curves/
    write_html(report, out_dir / "report.html")         # videos side by side, tables, curves
"""

from __future__ import annotations

import html
import math
import os
import re
import shutil
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mochi_jax.lib import metrics as M
from mochi_jax.lib import plots
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


# ----------------------------------------------------------------------------- the HTML page

def poster_of(video: str) -> str:
    """The poster (first frame, PNG) of a report video: videos/<variant>/<name>.mp4 ->
    posters/<variant>/<name>.png, relative to the report's folder as the video is."""
    parts = Path(video).parts
    return str(Path("posters", *parts[1:] if parts[:1] == ("videos",) else parts).with_suffix(".png"))


def training_run(source) -> Path | None:
    """The training run directory a LoRA came from: the nearest of the LoRA's folder (or the LoRA
    file's) and up to three folders above it that holds a run's config.json and its curves.png or
    metrics.jsonl (a run, <run>/variants/<name>, <run>/checkpoints/<step>, <run>/loras/<file>, ...);
    None if there is none."""
    if not source:
        return None
    p = Path(source).absolute()
    start = p if p.is_dir() else p.parent
    for d in [start, *start.parents][:4]:
        if (d / "config.json").is_file() and ((d / "curves.png").is_file() or (d / "metrics.jsonl").is_file()):
            return d
    return None


def training_curves(variants) -> list[dict]:
    """One entry per training run the LoRAs of `variants` came from (a sweep's variants share
    theirs): {"run": its directory, "variants": [names], "image": curves/<run>.png, the picture in
    the report's folder, "from": "curves.png" (copied) or "metrics.jsonl" (drawn)}."""
    runs: dict[Path, list[str]] = {}
    for v in variants:
        run = training_run(getattr(v, "source", None))
        if run is not None:
            runs.setdefault(run, []).append(v.name)
    out, used = [], set()
    for run, names in runs.items():
        stem = file_slug(run.name)
        while stem in used:
            stem += "_"
        used.add(stem)
        out.append({"run": str(run), "variants": names, "image": f"curves/{stem}.png",
                    "from": "curves.png" if (run / "curves.png").is_file() else "metrics.jsonl"})
    return out


def write_curves(entries, out_dir: Path) -> list[Path]:
    """The pictures of `training_curves` into out_dir/curves/: each run's curves.png copied, or drawn
    from its metrics.jsonl (mochi_jax/lib/plots.py); written atomically."""
    written = []
    for e in entries:
        dest, run = out_dir / e["image"], Path(e["run"])
        dest.parent.mkdir(parents=True, exist_ok=True)
        if e["from"] == "curves.png":
            tmp = dest.with_name(f".{dest.stem}.tmp{os.getpid()}.png")
            try:
                shutil.copyfile(run / "curves.png", tmp)
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            written.append(dest)
        elif plots.plot_curves(plots.read_rows(run / "metrics.jsonl"), dest, title=run.name) is not None:
            written.append(dest)
    return written


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 8px; }
h2 { font-size: 17px; margin: 28px 0 8px; }
p.settings, p.legend { color: #555; font-size: 13px; max-width: 1100px; }
table { border-collapse: collapse; margin: 6px 0 12px; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; }
table.metrics td { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.metrics th { background: #f3f3f3; text-align: left; }
table.variants td { text-align: left; }
.scroll { overflow-x: auto; }
table.videos th { font-size: 13px; padding: 2px 8px; vertical-align: middle; white-space: nowrap; }
table.videos thead th { text-align: center; }
table.videos td.video { padding: 4px; vertical-align: top; }
table.videos figure { margin: 0; }
table.videos video { display: block; background: #000; }
table.videos figcaption { font-size: 12px; color: #333; margin-top: 2px; }
table.videos figcaption .m { color: #666; font-size: 11px; }
img.sheet, img.curves { max-width: 100%; border: 1px solid #ddd; }
figure.curves { display: inline-block; vertical-align: top; max-width: 560px; margin: 8px 16px 16px 0; }
figure.curves figcaption { font-size: 12px; color: #555; }
"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _href(rel: str) -> str:
    return _esc(urllib.parse.quote(Path(rel).as_posix()))


def html_table(rows: dict, names, signed: bool = False, first: str = "variant") -> str:
    """An HTML table, one row per {label: {metric: stat}} (as `table` makes in markdown)."""
    head = "".join(f"<th>{_esc(m)}</th>" for m in names)
    body = "".join(f"<tr><th>{_esc(label)}</th>" + "".join(f"<td>{_esc(fmt(stats[m], signed))}</td>" for m in names)
                   + "</tr>" for label, stats in rows.items())
    return f'<table class="metrics"><thead><tr><th>{_esc(first)}</th>{head}</tr></thead><tbody>{body}</tbody></table>'


def display_size(height: int, width: int, smallest: int = 240, largest: int = 424) -> tuple[int, int]:
    """(height, width) a video cell shows a height x width video at: its width brought into
    [smallest, largest] pixels, the aspect kept."""
    w = min(max(width, smallest), largest)
    return max(1, round(height * w / width)), w


def write_html(report: dict, path: Path) -> Path:
    """report.html beside the videos: the settings, the metric tables, per prompt a grid of videos
    (one row per seed, one column per variant: `<video>` autoplay muted loop, with its first frame
    as poster where evaluate wrote one, and its metrics), the per-prompt tables and contact sheet,
    and the training curves of the LoRAs' runs. Relative links only, no JavaScript; written atomically."""
    path = Path(path)
    out_dir = path.parent
    names, s, d = report["metrics"], report["summary"], report["deltas"]
    c = report["settings"]["sampling"]
    variants = [v["name"] for v in report["variants"]]
    by_key = {(r["variant"], r["prompt_index"], r["seed"]): r for r in report["videos"]}
    vh, vw = display_size(c["height"], c["width"])
    parts = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             '<title>LoRA evaluation</title>', f"<style>{_CSS}</style></head><body>", "<h1>LoRA evaluation</h1>",
             f'<p class="settings">{len(report["prompts"])} prompt(s) x seeds {_esc(report["seeds"])}; '
             f'{c["num_frames"]} frames at {c["height"]}x{c["width"]}, {c["steps"]} steps, cfg {c["guidance"]}. '
             "Every variant renders the same prompts from the same noise. Values: mean ± half-width of the 95% "
             "t-interval.</p>"]
    rows = "".join(f"<tr><th>{_esc(v['name'])}</th><td>{_esc(v['lora'] or '(no LoRA)')}</td>"
                   f"<td>{'' if v['strength'] is None else _esc(v['strength'])}</td></tr>" for v in report["variants"])
    parts += ['<h2>Variants</h2><table class="metrics variants"><thead><tr><th>variant</th><th>LoRA</th>'
              f"<th>strength</th></tr></thead><tbody>{rows}</tbody></table>",
              "<h2>Mean over all videos</h2>", html_table({k: v["all"] for k, v in s.items()}, names)]
    if d:
        parts += ["<h2>Change against the base (paired by prompt and seed)</h2>",
                  html_table({k: v["all"] for k, v in d.items()}, names, signed=True, first="LoRA")]
    parts.append('<p class="legend">Metrics: ' + "; ".join(f"<b>{_esc(m)}</b> {_esc(M.METRICS.get(m, ''))}"
                                                            for m in names) + ".</p>")
    for p, prompt in enumerate(report["prompts"]):
        parts.append(f'<section class="prompt" id="prompt-{p + 1}"><h2>{p + 1}. {_esc(prompt)}</h2>')
        head = "".join(f"<th>{_esc(v)}</th>" for v in variants)
        parts.append(f'<div class="scroll"><table class="videos"><thead><tr><th></th>{head}</tr></thead><tbody>')
        for seed in report["seeds"]:
            parts.append(f'<tr><th>seed {_esc(seed)}</th>')
            for v in variants:
                r = by_key.get((v, p, seed))
                if r is None:
                    parts.append('<td class="video"></td>')
                    continue
                poster = poster_of(r["video"])
                poster = f' poster="{_href(poster)}"' if (out_dir / poster).is_file() else ""
                m = " · ".join(f"{k} {x:.3f}" for k, x in r["metrics"].items() if isinstance(x, (int, float)))
                parts.append(f'<td class="video"><figure style="width:{vw}px">'
                             f'<video src="{_href(r["video"])}"{poster} width="{vw}" height="{vh}" autoplay muted loop playsinline preload="auto" '
                             f'title="{_esc(v)}, seed {_esc(seed)}"></video>'
                             f'<figcaption>{_esc(v)} · seed {_esc(seed)}<br><span class="m">{_esc(m)}</span>'
                             "</figcaption></figure></td>")
            parts.append("</tr>")
        parts.append("</tbody></table></div>")
        parts.append(html_table({k: v["per_prompt"][p] for k, v in s.items()}, names))
        if d:
            parts.append(html_table({f"Δ {k}": v["per_prompt"][p] for k, v in d.items()}, names, signed=True,
                                    first="LoRA - base"))
        if p < len(report.get("sheets", [])):
            parts.append(f'<details><summary>contact sheet</summary><img class="sheet" '
                         f'src="{_href(report["sheets"][p])}" alt="contact sheet of prompt {p + 1}"></details>')
        parts.append("</section>")
    curves = [e for e in report.get("curves", []) if (out_dir / e["image"]).is_file()]
    if curves:
        parts.append("<h2>Training curves</h2>")
        for e in curves:
            parts.append(f'<figure class="curves"><img class="curves" src="{_href(e["image"])}" '
                         f'alt="training curves of {_esc(e["run"])}"><figcaption>{_esc(e["run"])} '
                         f'({_esc(", ".join(e["variants"]))})</figcaption></figure>')
    parts.append("</body></html>\n")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text("\n".join(parts), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
