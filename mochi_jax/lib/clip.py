"""CLIP for scoring: the tokenizer, the image preprocessing, and `Scorer` (a converted CLIP's
prompt and frame embeddings). The model is mochi_jax/models/clip.py, its converter and loader
mochi_jax/checkpoints/clip.py.

    scorer = Scorer("ckpt/clip", "ckpt/clip_tokenizer")
    text = scorer.text(["a cat"])                # [1, D]
    frames = scorer.images(video)                # uint8 [T, H, W, 3] -> [T, D]

## Tokenizer
`CLIPTokenizer`: CLIP's byte-level BPE tokenizer, reproducing `transformers.CLIPTokenizer` (transformers 5) ids.

    tok = CLIPTokenizer("clip-vit-base-patch32")        # folder with vocab.json + merges.txt, or tokenizer.json
    ids = tok(["a photo of a cat", ""])                  # int32 [2, 77]

Per prompt: the literal strings of the special tokens ("<|startoftext|>", "<|endoftext|>", the pad
token) become their ids; the text between them is normalised (Unicode NFC, every whitespace run -> one space,
lower-cased character by character), split into words (runs of letters, single digits, runs of
other non-space characters, and the contractions 's 't 're 've 'm 'll 'd), each word's UTF-8
bytes mapped to GPT-2's printable byte alphabet, the last symbol marked with "</w>", and byte
pairs merged by rank. Then [BOS] + the first context_length - 2 tokens + [EOS], padded with the
pad token (transformers' default, and openai/clip-*'s, is "<|endoftext|>", i.e. the EOS id; a
folder's tokenizer_config.json / special_tokens_map.json may name another, e.g. "!" = 0 as in
open_clip, and is followed; like transformers, a "!" in the text then becomes the pad token too).

Difference from OpenAI's original tokenizer: that one first runs `ftfy.fix_text` and
`html.unescape` (so "&amp;" -> "&" and mojibake is repaired); transformers 5, and this module,
apply NFC instead and no ftfy (no dependency). Prompts that are clean text get the same ids.

## Preprocessing
`preprocess`: frames -> CLIP pixels, equal to `transformers.CLIPImageProcessor` with its defaults
(the PIL path).

    pixels = preprocess(frames)      # uint8 [T, H, W, 3] -> float32 [T, 224, 224, 3]

Per frame: resize with PIL's bicubic filter so the short side is `size` (the long side
int(size * long / short), truncated), centre crop crop_size x crop_size (top = (H - crop) // 2,
zero padding if the frame is smaller), rescale by 1/255 (in float64, then float32), then
(x - mean) / std in float32 with OpenAI's CLIP mean and std. PIL (pillow, a dependency of
imageio) does the resize, so the result is bit-for-bit the processor's. Note OpenAI's original
preprocessing (torchvision Resize + CenterCrop) rounds the crop offset, so odd-sized frames can
differ from it by one pixel of shift; transformers' processor is the one matched here.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from mochi_jax.checkpoints import load_clip
from mochi_jax.models.clip import encode_image, encode_text

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT_LENGTH = 77
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Unicode White_Space (what the `\s` of transformers' normaliser and splitter matches)
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                       "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes map to themselves, the
    other 68 bytes to chr(256), chr(257), ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, lower case (per character, as the Rust normaliser does)."""
    text = unicodedata.normalize("NFC", text)
    out, in_space = [], False
    for c in text:
        if c in WHITESPACE:
            if not in_space:
                out.append(" ")
            in_space = True
        else:
            out.append(c)
            in_space = False
    return "".join(c.lower() for c in out)


def _kind(c: str) -> str:
    if c in WHITESPACE:
        return "space"
    cat = unicodedata.category(c)
    return "letter" if cat[0] == "L" else "number" if cat[0] == "N" else "other"


def split_words(text: str) -> list[str]:
    """CLIP's pre-tokenisation of normalised text: contractions, letter runs, single digits
    (any Unicode number), runs of other non-space characters; spaces dropped."""
    words, i, n = [], 0, len(text)
    while i < n:
        kind = _kind(text[i])
        if kind == "space":
            i += 1
            continue
        c = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        if c is not None:
            j = i + len(c)
        elif kind == "number":
            j = i + 1
        else:
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def find_tokenizer_files(path) -> Path:
    """The folder holding vocab.json + merges.txt or tokenizer.json: `path`, or its tokenizer/."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    for folder in (path, path / "tokenizer"):
        if all((folder / f).is_file() for f in ("vocab.json", "merges.txt")) or (folder / "tokenizer.json").is_file():
            return folder
    raise FileNotFoundError(f"no CLIP tokenizer at {path} (looked for vocab.json + merges.txt or tokenizer.json, "
                            f"also in tokenizer/)")


def _read_vocab_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    else:
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
        vocab = model["vocab"]
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{folder}: merges must be pairs of symbols, got {bad[:3]}")
    return vocab, merges


def _configured_pad(folder: Path) -> str:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():
            pad = json.loads(f.read_text(encoding="utf-8")).get("pad_token")
            if pad is not None:
                return pad["content"] if isinstance(pad, dict) else pad
    return EOS


class CLIPTokenizer:
    """CLIP tokenisation to a fixed length; `__call__(prompts) -> int32 [B, context_length]`."""

    def __init__(self, path, context_length: int = CONTEXT_LENGTH, pad_token: str | None = None):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (BOS and EOS), got {context_length}")
        self.path = find_tokenizer_files(path)
        self.vocab, merges = _read_vocab_merges(self.path)
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        pad_token = _configured_pad(self.path) if pad_token is None else pad_token
        missing = [t for t in (BOS, EOS, pad_token) if t not in self.vocab]
        if missing:
            raise ValueError(f"{self.path}: the vocabulary lacks the special tokens {missing}")
        self.bos_id, self.eos_id, self.pad_id = self.vocab[BOS], self.vocab[EOS], self.vocab[pad_token]
        self.specials = sorted({BOS, EOS, pad_token}, key=len, reverse=True)  # longest first
        self.context_length = context_length
        self.byte_chars = bytes_to_unicode()
        self._cache: dict[str, list[int]] = {}

    def bpe(self, word: str) -> list[int]:
        """Token ids of one pre-tokenised word (its last symbol carries '</w>')."""
        if word in self._cache:
            return self._cache[word]
        symbols = [self.byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self.vocab.get(s, self.eos_id) for s in symbols]  # unknown symbols: the unk token (= EOS)
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS / EOS / padding."""
        out: list[int] = []
        for i, part in enumerate(_split_specials(text, self.specials)):
            if i % 2:
                out.append(self.vocab[part])
            else:
                for word in split_words(normalize(part)):
                    out.extend(self.bpe(word))
        return out

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        if isinstance(prompts, str):
            raise TypeError("pass a list of prompts, not a single string")
        ids = np.full((len(prompts), self.context_length), self.pad_id, np.int32)
        for b, text in enumerate(prompts):
            toks = [self.bos_id] + self.encode(text)[: self.context_length - 2] + [self.eos_id]
            ids[b, : len(toks)] = toks
        return ids


def _split_specials(text: str, specials: Sequence[str]) -> list[str]:
    """[text, special, text, special, ..., text]: the special-token strings cut out, leftmost
    first, the longest of those starting at one place."""
    parts, start, i = [], 0, 0
    while i < len(text):
        hit = next((s for s in specials if text.startswith(s, i)), None)
        if hit:
            parts += [text[start:i], hit]
            i = start = i + len(hit)
        else:
            i += 1
    return parts + [text[start:]]


# ----------------------------------------------------------------------------- preprocessing

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_short_side(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 with the short side `size`, PIL bicubic."""
    h, w = frame.shape[:2]
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_h, new_w = size, int(size * w / h)
    return np.asarray(Image.fromarray(frame).resize((new_w, new_h), resample=Image.Resampling.BICUBIC))


def center_crop(frame: np.ndarray, crop: int) -> np.ndarray:
    """[H, W, C] -> [crop, crop, C] from offset ((H - crop) // 2, (W - crop) // 2); a side shorter
    than `crop` is first zero-padded to it, the larger half of the padding before."""
    h, w = frame.shape[:2]
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    if pad_h or pad_w:
        top, left = (pad_h + 1) // 2, (pad_w + 1) // 2
        frame = np.pad(frame, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
        h, w = frame.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    return frame[top: top + crop, left: left + crop]


def preprocess(frames, size: int = 224, crop_size: int | None = None,
               mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """uint8 frames [T, H, W, 3] (or one [H, W, 3]) -> normalised float32 [T, crop, crop, 3]."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    crop = size if crop_size is None else crop_size
    out = np.empty((len(frames), crop, crop, 3), np.float32)
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    for t, frame in enumerate(frames):
        x = center_crop(resize_short_side(frame, size), crop)
        x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
        out[t] = (x - mean) / std
    return out


# ----------------------------------------------------------------------------- scoring

class Scorer:
    """A converted CLIP and its tokenizer: (unnormalised) embeddings of prompts and frames. The
    weights are replicated on this process's devices and each batch of frames is split over them."""

    def __init__(self, weights, tokenizer, batch: int = 32):
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
        devices = jax.local_devices()
        mesh = Mesh(np.array(devices), ("frames",))
        self.params = jax.device_put(self.params, NamedSharding(mesh, PartitionSpec()))
        self.frames = NamedSharding(mesh, PartitionSpec("frames"))
        self.batch = -(-batch // len(devices)) * len(devices)  # a multiple of the devices

    def text(self, prompts) -> np.ndarray:
        return np.asarray(encode_text(self.cfg, self.params, self.tokenizer(list(prompts))))

    def images(self, frames) -> np.ndarray:
        """uint8 [T, H, W, 3] -> [T, D], in fixed-size batches (one compiled shape)."""
        pixels = preprocess(frames, size=self.cfg.image_size)
        n, b = len(pixels), self.batch
        pixels = np.concatenate([pixels, np.repeat(pixels[-1:], -n % b, axis=0)])
        out = [np.asarray(encode_image(self.cfg, self.params, jax.device_put(pixels[i:i + b], self.frames)))
               for i in range(0, len(pixels), b)]
        return np.concatenate(out)[:n]
