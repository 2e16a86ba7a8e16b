"""Prompts -> T5 features: the model's own SentencePiece tokenizer and one jitted encoder call.

Tokenisation reproduces transformers' T5Tokenizer / T5TokenizerFast as Mochi's pipelines call
it (`padding="max_length", truncation=True, max_length=256`): SentencePiece pieces, truncated to
max_length - 1, then the end-of-sequence id (1), then padding id 0 up to max_length. The mask
marks the real tokens, EOS included; "" becomes just EOS. Special-token strings written in a
prompt ("</s>", "<pad>", "<unk>", "<extra_id_N>") become their ids, as in transformers.

    tok = T5Tokenizer("mochi-1-preview/tokenizer")            # folder or spiece.model
    cfg, params = load_t5("ckpt/t5")                           # from convert_t5
    feats, mask = encode(["a cat", ""], tok, cfg, params)      # [2, 256, 4096] f32, [2, 256] bool
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import re
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mochi_jax.models.t5 import T5Config, T5Encoder
from mochi_jax.checkpoints.t5 import load_t5

MAX_LENGTH = 256


def find_spiece(path) -> Path:
    """`path` itself, or spiece.model inside it, or inside its tokenizer/ (a diffusers repo root)."""
    path = Path(path)
    for cand in (path, path / "spiece.model", path / "tokenizer" / "spiece.model"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no SentencePiece model at {path} (looked for spiece.model and tokenizer/spiece.model)")


def read_prompts(path) -> list[str]:
    """The non-empty lines of a text file (surrounding whitespace stripped; '#' starts a comment line)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory (a prompt file is needed: one prompt per line)", str(path))
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    prompts = [s for s in prompts if s and not s.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts (one prompt per line)")
    return prompts


class T5Tokenizer:
    """T5 tokenisation to a fixed length from the model's `spiece.model`.

    `extra_ids` sentinel tokens <extra_id_0..N-1> sit above the SentencePiece vocabulary in
    reverse order (<extra_id_0> is the last id), as in transformers.
    """

    def __init__(self, path, max_length: int = MAX_LENGTH, extra_ids: int = 100):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        import sentencepiece  # here: importing the sampler (which imports this module) needs no tokenizer backend

        self.path = find_spiece(path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        self.max_length = max_length
        self.eos_id, self.pad_id = self.sp.eos_id(), self.sp.pad_id()
        if self.eos_id < 0 or self.pad_id < 0:
            raise ValueError(f"{self.path}: a T5 SentencePiece model needs pad and eos pieces")
        n = self.sp.get_piece_size()
        self.special = {self.sp.id_to_piece(i): i for i in (self.pad_id, self.eos_id, self.sp.unk_id())}
        self.special.update({f"<extra_id_{i}>": n + extra_ids - 1 - i for i in range(extra_ids)})
        self.vocab_size = n + extra_ids
        alternatives = sorted(self.special, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def pieces(self, text: str) -> list[int]:
        """Token ids of `text`, without EOS or padding."""
        out: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # a special-token string, matched verbatim
                out.append(self.special[part])
            elif part:
                out.extend(self.sp.encode(part))
        return out

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [B, max_length], mask bool [B, max_length])."""
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts, not a single string")
        ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
        mask = np.zeros((len(prompts), self.max_length), bool)
        for b, text in enumerate(prompts):
            toks = self.pieces(text)[: self.max_length - 1] + [self.eos_id]
            ids[b, : len(toks)] = toks
            mask[b, : len(toks)] = True
        return ids, mask


@functools.partial(jax.jit, static_argnums=0)
def encode_tokens(cfg: T5Config, params, ids, mask, drop=None):
    """The jitted encoder: ids [B, L], mask [B, L] -> (features [B, L, D] f32, mask [B, L] bool).

    `drop` [B] bool: samples whose features are zeroed and mask cleared (genmo's empty prompt).
    """
    feats, mask = T5Encoder(cfg).apply({"params": params}, ids, mask)
    if drop is not None:
        feats = jnp.where(drop[:, None, None], 0.0, feats)
        mask = mask & ~drop[:, None]
    return feats, mask


def encode(prompts: Sequence[str], tokenizer: T5Tokenizer, cfg: T5Config, params, zero_empty: bool = False):
    """Prompts -> (features [B, max_length, d_model] float32, mask [B, max_length] bool), one jitted call.

    zero_empty=False (diffusers): "" is encoded like any prompt (one valid token, EOS).
    zero_empty=True (genmo's original): every "" gets zero features and an all-False mask. genmo
    zeroes the ids and mask of an empty prompt; its DiT then never looks at those features, so zero
    features are the same to the model and make the output deterministic.
    """
    ids, mask = tokenizer(prompts)
    drop = np.array([zero_empty and p == "" for p in prompts], bool)
    return encode_tokens(cfg, params, ids, mask, drop)


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """Tokenizer + config + weights, callable on a list of prompts (see `encode`)."""

    tokenizer: T5Tokenizer
    cfg: T5Config
    params: dict

    @classmethod
    def load(cls, weights, tokenizer, max_length: int = MAX_LENGTH, dtype=None, shardings=None, **overrides):
        """`weights`: a checkpoint written by convert_t5; `tokenizer`: spiece.model or its folder."""
        cfg, params = load_t5(weights, dtype=dtype, shardings=shardings, **overrides)
        return cls(T5Tokenizer(tokenizer, max_length=max_length), cfg, params)

    def __call__(self, prompts: Sequence[str], zero_empty: bool = False):
        return encode(prompts, self.tokenizer, self.cfg, self.params, zero_empty=zero_empty)
