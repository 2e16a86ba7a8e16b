"""Tiny random-initialised Mochi models for the demo and the tests: no download needed.

`write_demo_models(root)` writes, in exactly the layout tools/convert_weights.py produces,
    root/dit        a 3-block DiT (2 heads x 16, text width 32, T5 width 32)
    root/vae        a VAE with 32-64 channels and one resnet per stage (x6 time, x8 space)
    root/t5         a 2-layer T5 encoder (d_model 32)
    root/tokenizer  a SentencePiece model trained on a few sentences (spiece.model)
so that every command (prepare, train, sample) runs end to end on a laptop CPU in minutes;
`write_demo_clip` adds a tiny random CLIP and its tokenizer for evaluate. The
weights are random: videos sampled from them are noise, but shapes, code paths, checkpoints and
files are those of the real model. Re-running reuses what exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece as spm
from flax import traverse_util

from mochi_jax.checkpoints import save_model
from mochi_jax.configs import common
from mochi_jax.lib.clip import BOS, EOS, bytes_to_unicode
from mochi_jax.models import clip as clip_lib
from mochi_jax.models import vae as vae_lib
from mochi_jax.models.dit import DiTConfig, abstract_variables
from mochi_jax.models.t5 import T5Config, init_params

DIT, VAE, T5 = common.DEMO_DIT, common.DEMO_VAE, common.DEMO_T5

CORPUS = [
    "a red ball bounces across a white floor",
    "a blue square slides slowly to the left",
    "a green circle grows and shrinks in the centre",
    "a yellow stripe moves from top to bottom",
    "the camera pans over a field of coloured dots",
    "two shapes orbit each other against a dark background",
    "a video of simple moving shapes in bright colours",
    "the quick brown fox jumps over the lazy dog",
]


def _tokenizer(folder: Path) -> Path:
    model = folder / "spiece.model"
    if model.exists():
        return model
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 4))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=100, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        hard_vocab_limit=False, minloglevel=2)
    corpus.unlink()
    return model


def random_like(shapes, key) -> dict:
    """Random weights for a tree of ShapeDtypeStructs (from jax.eval_shape of an init, so nothing is
    compiled): normal / sqrt(fan_in) for matrices and kernels, ones for norm weights, zeros for biases."""
    flat = traverse_util.flatten_dict(shapes)
    out = {}
    for i, (path, s) in enumerate(sorted(flat.items())):
        if len(s.shape) >= 2:
            fan_in = max(1, int(np.prod(s.shape[:-1])) // (s.shape[0] if path[0] == "blocks" else 1))
            out[path] = jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype) / np.sqrt(fan_in)
        else:
            out[path] = (jnp.ones if path[-1] in ("scale", "weight") else jnp.zeros)(s.shape, s.dtype)
    return traverse_util.unflatten_dict(out)


def write_demo_models(root, seed: int = 0, progress: bool = False) -> dict[str, Path]:
    """Write (or reuse) the tiny random models under `root`; returns {'dit', 'vae', 't5', 'tokenizer'} paths."""
    root = Path(root)
    paths = {"dit": root / "dit", "vae": root / "vae", "t5": root / "t5", "tokenizer": root / "tokenizer"}

    def key(i: int):  # made only when a model is missing: JAX starts no backend when all exist (multi-host
        return jax.random.split(jax.random.PRNGKey(seed), 3)[i]  # runs join their processes after this)

    if not paths["dit"].exists():
        cfg = DiTConfig(**DIT, param_dtype="float32", compute_dtype="float32", remat="none")
        shapes = abstract_variables(cfg)["params"]
        params = random_like(shapes, key(0))
        params["pos_frequencies"] = 0.1 * jax.random.normal(key(0), shapes["pos_frequencies"].shape)
        save_model(paths["dit"], params, "mochi_dit", cfg.arch(), unstack=[("blocks", cfg.depth - 1)],
                   progress=progress)
    if not paths["vae"].exists():
        cfg = vae_lib.VAEConfig(**VAE)
        shapes = jax.eval_shape(lambda: vae_lib.init(key(1), cfg))  # traced, not compiled: fast
        save_model(paths["vae"], random_like(shapes, key(1)), "mochi_vae", cfg.arch_dict(), progress=progress)
    if not paths["t5"].exists():
        cfg = T5Config(**T5, param_dtype="float32", compute_dtype="float32")
        shapes = jax.eval_shape(lambda: init_params(cfg, key(2)))
        save_model(paths["t5"], random_like(shapes, key(2)), "t5_encoder", cfg.arch(),
                   unstack=[("blocks", cfg.num_layers)], progress=progress)
    _tokenizer(paths["tokenizer"])
    return paths


def write_demo_clip(weights, tokenizer, seed: int = 0) -> None:
    """A tiny random CLIP (32 px, width 32) in the converted layout at `weights`, and a byte-level
    CLIP tokenizer (no merges) at `tokenizer`; each only if missing."""
    tokenizer = Path(tokenizer)
    chars = sorted(bytes_to_unicode().values(), key=ord)
    vocab = chars + [ch + "</w>" for ch in chars] + [BOS, EOS]
    if not (tokenizer / "vocab.json").is_file():
        tokenizer.mkdir(parents=True, exist_ok=True)
        (tokenizer / "merges.txt").write_text("#version: 0.2\n")
        (tokenizer / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    if not Path(weights).exists():
        cfg = clip_lib.CLIPConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
                         vision_mlp=64, vocab_size=len(vocab), text_width=32, text_layers=2, text_heads=2,
                         text_mlp=64, projection_dim=16)
        save_model(weights, clip_lib.init_params(cfg, jax.random.PRNGKey(seed)), "clip", cfg.arch(),
                   unstack=[(("vision", "blocks"), cfg.vision_layers), (("text", "blocks"), cfg.text_layers)])
