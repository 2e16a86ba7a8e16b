"""CLIP (ViT image tower + causal text tower) as Flax Linen modules, for scoring generated videos.

    pixels [B, S, S, 3] -> patches (conv p x p, stride p, no bias) -> [class token; patches] + positions
        -> ln_pre -> layers x Block -> ln_post(class token) -> proj              = image features [B, D]
    ids [B, L] -> token + position embeddings -> layers x causal Block -> ln_final
        -> the state at the EOS token -> proj                                    = text features [B, D]
    Block: x += o(attention(ln_1(x)));  x += fc2(act(fc1(ln_2(x))))   (q, k, v, o, fc1, fc2 with bias)

The features are unnormalised, like transformers' get_image_features / get_text_features;
`logits` = exp(logit_scale) * cosine similarity. The EOS position is argmax(ids) (OpenAI's
definition: <|endoftext|> has the largest id) when `eos_token_id` is None, else the first
position holding `eos_token_id` (transformers' rule for configs whose eos_token_id is not 2).

Parameters (Dense kernels [in, out]; each tower's layers stacked on a leading axis for nn.scan):
    vision/patch_embed                      [p, p, 3, W]
    vision/class_embedding                  [W]
    vision/position_embedding               [(S / p)^2 + 1, W]
    vision/{ln_pre,ln_post}/{scale,bias}    [W]
    vision/blocks/{ln_1,ln_2}/{scale,bias}  [N, W]
    vision/blocks/attn/{q,k,v,o}/kernel     [N, W, W]        .../bias [N, W]
    vision/blocks/mlp/fc1/kernel            [N, W, mlp]      .../bias [N, mlp]
    vision/blocks/mlp/fc2/kernel            [N, mlp, W]      .../bias [N, W]
    vision/proj/kernel                      [W, D]
    text/token_embedding                    [vocab, Wt]
    text/position_embedding                 [context_length, Wt]
    text/blocks/...                         (as vision/blocks, width Wt)
    text/ln_final/{scale,bias}              [Wt]
    text/proj/kernel                        [Wt, D]
    logit_scale                             []
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mochi_jax.models.layers import Dense, config_from_dict

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Defaults: OpenAI's ViT-B/32."""

    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp: int = 2048
    projection_dim: int = 512
    layer_norm_eps: float = 1e-5
    activation: str = "quick_gelu"  # OpenAI's x * sigmoid(1.702 x); 'gelu' (exact erf) for open_clip's own models
    eos_token_id: int | None = None  # None: pool the text at argmax(ids); else at the first position of this id
    param_dtype: str = "float32"
    compute_dtype: str = "float32"  # matmuls; layer norms, softmax and the residual stream are float32

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if heads < 1 or width % heads:
                raise ValueError(f"{tower}_width {width} is not a multiple of {tower}_heads {heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d) -> "CLIPConfig":
        return config_from_dict(cls, d, "CLIP")

    @classmethod
    def preset(cls, name: str, **overrides) -> "CLIPConfig":
        """'ViT-B/32', 'ViT-B/16' or 'ViT-L/14' (OpenAI's released sizes) plus `overrides`."""
        if name not in PRESETS:
            raise ValueError(f"unknown CLIP preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def arch(self) -> dict:
        """The architecture fields (what a converted checkpoint fixes)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("param_dtype", "compute_dtype")}


PRESETS = {
    "ViT-B/32": dict(),
    "ViT-B/16": dict(patch_size=16),
    "ViT-L/14": dict(patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16, vision_mlp=4096,
                     text_width=768, text_heads=12, text_mlp=3072, projection_dim=768),
}


# ----------------------------------------------------------------------------- modules

class LayerNorm(nn.Module):
    """LayerNorm over the last axis in float32 (biased variance), learned scale and bias."""

    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class _Base(nn.Module):
    cfg: CLIPConfig

    def dense(self, features, name, use_bias=True):
        return Dense(features, use_bias=use_bias, param_dtype=jnp.dtype(self.cfg.param_dtype),
                     compute_dtype=jnp.dtype(self.cfg.compute_dtype), name=name)

    def norm(self, name):
        return LayerNorm(self.cfg.layer_norm_eps, jnp.dtype(self.cfg.param_dtype), name=name)

    def table(self, name, shape):
        return self.param(name, nn.initializers.normal(0.02), shape, jnp.dtype(self.cfg.param_dtype))


class Attention(_Base):
    """Multi-head self-attention with biases, scale 1/sqrt(head dim); logits and softmax in float32."""

    heads: int = 1
    causal: bool = False

    @nn.compact
    def __call__(self, x):
        b, l, w = x.shape
        q, k, v = (self.dense(w, n)(x).reshape(b, l, self.heads, w // self.heads) for n in "qkv")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits / math.sqrt(w // self.heads)
        if self.causal:
            logits = jnp.where(jnp.tril(jnp.ones((l, l), bool)), logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.dense(w, "o")(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, w))


class MLP(_Base):
    """fc2(act(fc1(x))), the activation in float32."""

    hidden: int = 1

    @nn.compact
    def __call__(self, x):
        h = self.dense(self.hidden, "fc1")(x).astype(jnp.float32)
        if self.cfg.activation == "quick_gelu":
            h = h * jax.nn.sigmoid(1.702 * h)
        else:
            h = jax.nn.gelu(h, approximate=False)
        return self.dense(x.shape[-1], "fc2")(h.astype(x.dtype))


class Block(_Base):
    """Pre-norm transformer layer; `causal` masks later keys (the text tower)."""

    heads: int = 1
    mlp: int = 1
    causal: bool = False

    @nn.compact
    def __call__(self, x, _):
        cdt = jnp.dtype(self.cfg.compute_dtype)  # x: float32 residual stream [B, L, W]
        attn = Attention(self.cfg, heads=self.heads, causal=self.causal, name="attn")
        x = x + attn(self.norm("ln_1")(x).astype(cdt)).astype(jnp.float32)
        x = x + MLP(self.cfg, hidden=self.mlp, name="mlp")(self.norm("ln_2")(x).astype(cdt)).astype(jnp.float32)
        return x, None


def _layers(cfg, name, n, heads, mlp, causal):
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=nn.broadcast,
                    length=n)
    return stack(cfg, heads=heads, mlp=mlp, causal=causal, name=name)


class VisionTower(_Base):
    """pixels [B, S, S, 3] (normalised) -> image features [B, D] float32."""

    @nn.compact
    def __call__(self, pixels):
        cfg = self.cfg
        p, w, cdt = cfg.patch_size, cfg.vision_width, jnp.dtype(cfg.compute_dtype)
        b, hh, ww, _ = pixels.shape
        if (hh, ww) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"expected pixels [B, {cfg.image_size}, {cfg.image_size}, 3], got {pixels.shape}")
        kernel = self.table("patch_embed", (p, p, 3, w))
        patches = pixels.reshape(b, hh // p, p, ww // p, p, 3).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, -1, p, p, 3)
        x = jnp.einsum("bnijc,ijcd->bnd", patches.astype(cdt), kernel.astype(cdt),
                       preferred_element_type=jnp.float32)
        cls = jnp.broadcast_to(self.table("class_embedding", (w,)).astype(jnp.float32), (b, 1, w))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + self.table("position_embedding", (cfg.num_patches + 1, w)).astype(jnp.float32)
        x = self.norm("ln_pre")(x)
        x, _ = _layers(cfg, "blocks", cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp, False)(x, None)
        pooled = self.norm("ln_post")(x[:, 0])
        return self.dense(cfg.projection_dim, "proj", use_bias=False)(pooled.astype(cdt)).astype(jnp.float32)


class TextTower(_Base):
    """ids [B, L] (L <= context_length) -> text features [B, D] float32."""

    @nn.compact
    def __call__(self, ids):
        cfg = self.cfg
        w, cdt = cfg.text_width, jnp.dtype(cfg.compute_dtype)
        length = ids.shape[1]
        if length > cfg.context_length:
            raise ValueError(f"at most {cfg.context_length} tokens, got ids {ids.shape}")
        x = jnp.take(self.table("token_embedding", (cfg.vocab_size, w)), ids, axis=0).astype(jnp.float32)
        x = x + self.table("position_embedding", (cfg.context_length, w))[:length].astype(jnp.float32)
        x, _ = _layers(cfg, "blocks", cfg.text_layers, cfg.text_heads, cfg.text_mlp, True)(x, None)
        x = self.norm("ln_final")(x)
        if cfg.eos_token_id is None:
            eos = jnp.argmax(ids, axis=-1)
        else:
            eos = jnp.argmax(ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        return self.dense(cfg.projection_dim, "proj", use_bias=False)(pooled.astype(cdt)).astype(jnp.float32)


class CLIP(_Base):
    """Both towers and the logit scale; `encode_image`, `encode_text` as methods for `apply`."""

    def setup(self):
        self.vision = VisionTower(self.cfg)
        self.text = TextTower(self.cfg)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), (),
                                      jnp.dtype(self.cfg.param_dtype))

    def encode_image(self, pixels):
        return self.vision(pixels)

    def encode_text(self, ids):
        return self.text(ids)

    def __call__(self, pixels, ids):
        """-> logits_per_image [B_image, B_text]."""
        return cosine_logits(self.logit_scale, self.encode_image(pixels), self.encode_text(ids))


def cosine_logits(logit_scale, image_features, text_features):
    """exp(logit_scale) * cos(image_i, text_j): [B_image, B_text] float32."""
    i = image_features / jnp.linalg.norm(image_features, axis=-1, keepdims=True)
    t = text_features / jnp.linalg.norm(text_features, axis=-1, keepdims=True)
    return jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * (i @ t.T)


# ----------------------------------------------------------------------------- functions

@functools.partial(jax.jit, static_argnums=0)
def encode_image(cfg: CLIPConfig, params, pixels):
    """Normalised pixels [B, S, S, 3] (clip_image.preprocess) -> image features [B, D] float32."""
    return CLIP(cfg).apply({"params": params}, pixels, method=CLIP.encode_image)


@functools.partial(jax.jit, static_argnums=0)
def encode_text(cfg: CLIPConfig, params, ids):
    """Token ids [B, context_length] (clip_text.CLIPTokenizer) -> text features [B, D] float32."""
    return CLIP(cfg).apply({"params": params}, ids, method=CLIP.encode_text)


def logits(params, image_features, text_features):
    """logits_per_image [B_image, B_text] = exp(logit_scale) * cosine similarity (transpose for per-text)."""
    return cosine_logits(params["logit_scale"], image_features, text_features)


def init_params(cfg: CLIPConfig, rng) -> dict:
    """Random parameters (for tests; real ones come from checkpoints/clip.py)."""
    pixels = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
    ids = jnp.zeros((1, cfg.context_length), jnp.int32)
    return CLIP(cfg).init(rng, pixels, ids)["params"]


def abstract_params(cfg: CLIPConfig) -> dict:
    """The parameter tree as jax.ShapeDtypeStruct leaves, without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
