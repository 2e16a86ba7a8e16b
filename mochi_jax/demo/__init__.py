"""The demo: tiny random models, synthetic clips and their cache, made on first use, so every command
runs end to end with no download. Production code reaches it through one hook, `ensure(cfg)`,
which does nothing unless the config is a demo preset (only those carry a `demo` block; see
configs/common.py `demo`). Everything is made under the demo's own root (runs/demo): a folder the
user names, such as another input_dir, is never written into.

    models.py   write_demo_models (tiny DiT, VAE, T5, tokenizer), write_demo_clip, random_like
    clips.py    make_clips: captioned synthetic videos of moving shapes
"""

from __future__ import annotations

from pathlib import Path

from mochi_jax.demo.clips import make_clips
from mochi_jax.demo.models import CORPUS, DIT, T5, VAE, random_like, write_demo_clip, write_demo_models
from mochi_jax.lib import cache as cache_lib
from mochi_jax.lib import preparation, sources

__all__ = ["CORPUS", "DIT", "T5", "VAE", "ensure", "make_clips", "random_like", "write_demo_clip", "write_demo_models"]


def ensure(cfg) -> None:
    """Make what a demo preset's `cfg.demo` asks for, where missing: the tiny random models under
    root/models; `clips` synthetic clips in root/clips; the cache of `prepare` (a prepare config);
    with `clip_model`, a tiny random CLIP and a prompt file root/eval_prompts.txt."""
    d = cfg.get("demo") if hasattr(cfg, "get") else None
    if not d:
        return
    root = Path(d.root)
    write_demo_models(root / "models")
    clips = root / "clips"
    if d.clips and not (clips.is_dir() and sources.find_sources(clips)):
        make_clips(clips, n=d.clips, num_frames=d.clip_frames, size=tuple(d.clip_size))
    if d.prepare and not (Path(d.prepare.output_dir) / cache_lib.MANIFEST).is_file():
        print(f"demo: caching the synthetic clips of {d.prepare.input_dir} into {d.prepare.output_dir}", flush=True)
        preparation.prepare(d.prepare)
    if d.clip_model:
        write_demo_clip(root / "models" / "clip", root / "models" / "clip_tokenizer")
        prompts = root / "eval_prompts.txt"
        if not prompts.is_file():
            prompts.write_text("\n".join(CORPUS[:2]) + "\n")
