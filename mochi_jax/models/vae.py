"""The Mochi 1 video VAE (causal, x6 in time, x8 in space, 12 latent channels) as Flax Linen modules.

Call convention (the reference's tensors, channels first):
    encode(params, pixels [B, 3, T, H, W] in [-1, 1], cfg) -> (mean, logvar), each [B, 12, t, h, w]
    decode(params, latents [B, 12, t, h, w], cfg)          -> pixels [B, 3, T, H, W] (about [-1, 1])
with T = 6(t - 1) + 1 frames (7 <-> 2, 13 <-> 3, 163 <-> 28) and H = 8h, W = 8w. Latents are in
*VAE space*; `vae_to_dit` / `dit_to_vae` move them to and from the DiT's normalised space.
`params` is {'encoder': ..., 'decoder': ...} (either half may be absent if unused).

Inside, the modules work channels-last ([B, T, H, W, C]) and follow diffusers' AutoencoderKLMochi,
whose numbers they reproduce (see tests/test_vae.py):
  * causal 3-D convolutions pad by repeating the first frame in front (kt - 1 times) and by edge
    replication in space; never zeros.
  * GroupNorm (32 groups, eps 1e-5) over each frame separately (statistics over H, W and the
    group's channels, not over time).
  * encoder attention attends over time only: one causal sequence per pixel, C/32 heads of 32,
    q and k L2-normalised, scale 1/sqrt(32); a single frame skips it (out(v) only).
  * the encoder computes its own Fourier features (3 -> 15 channels) in float32.
  * the posterior is 12 means + 12 log-variances; the log-variance is clamped to [-30, 20]
    as diffusers' DiagonalGaussianDistribution does (genmo's original does not clamp).
  * **frame trimming follows diffusers, not genmo**: the decoder makes 6t frames (the up blocks
    drop nothing) and `decode` drops the first 5 at the very end. Genmo's original drops
    frames inside each up block instead; frame counts agree, the first frames' pixels do not.

Parameter names are ours (see mochi_jax/checkpoints/vae.py for the map from both checkpoint
layouts): dense kernels [in, out], conv kernels [kt, kh, kw, in, out], norms scale/bias.

Tiled processing (`tiled=True`, knobs in VAEConfig) bounds memory for big clips:
  * decoding streams over time in chunks of `chunk_frames` latent frames, carrying the last two
    input frames of every causal conv from chunk to chunk. The decoder has no attention and
    normalises per frame, so this is exact (same numbers as one pass, up to float rounding).
  * decoding and encoding split space into overlapping tiles (`tile_size`, `tile_overlap`, in
    pixels) that are blended with linear ramps across each overlap. This is an approximation:
    GroupNorm statistics are taken per tile and the receptive field is cut at tile borders.
    The error shrinks as tiles grow; on the tests' tiny random models with 32-px tiles it is
    <= 0.45 relative L2 and below diffusers' own tiling at the same settings (tests/test_vae.py).
    The encoder is never chunked in time (its causal attention sees every earlier frame), so
    its tiled memory still grows with the clip length.
With the defaults (256-px tiles, 64-px overlap, 2-frame chunks) a 480x848, 163-frame decode of the
released model in float32 compiles to a 4.7 GiB peak (XLA memory analysis, parameters and output
included) against 134 GiB untiled; see benchmarks/vae.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mochi_jax.models.layers import config_from_dict

# Per-channel statistics of the released VAE's latents (AutoencoderKLMochi.latents_mean / _std).
LATENTS_MEAN = np.array([
    -0.06730895953510081, -0.038011381506090416, -0.07477820912866141, -0.05565264470995561,
    0.012767231469026969, -0.04703542746246419, 0.043896967884726704, -0.09346305707025976,
    -0.09918314763016893, -0.008729793427399178, -0.011931556316503654, -0.0321993391887285,
], np.float32)
LATENTS_STD = np.array([
    0.9263795028493863, 0.9248894543193766, 0.9393059390890617, 0.959253732819592,
    0.8244560132752793, 0.917259975397747, 0.9294154431013696, 1.3720942357788521,
    0.881393668867029, 0.9168315692124348, 0.9185249279345552, 0.9274757570805041,
], np.float32)

LOGVAR_CLAMP = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    # Architecture (the released model's defaults; stored with converted weights).
    latent_channels: int = 12
    encoder_channels: tuple[int, ...] = (64, 128, 256, 384)
    decoder_channels: tuple[int, ...] = (128, 256, 512, 768)
    # resnets per stage: encoder block_in, down blocks..., block_out; the decoder reads it
    # backwards (block_in uses the last entry, block_out the first).
    layers_per_block: tuple[int, ...] = (3, 3, 4, 6, 3)
    temporal_expansions: tuple[int, ...] = (1, 2, 3)  # encoder order (decoder reverses)
    spatial_expansions: tuple[int, ...] = (2, 2, 2)
    encoder_attention: tuple[bool, ...] = (False, True, True, True, True)  # per encoder stage
    fourier_freqs: tuple[int, ...] = (6, 7)  # features sin/cos(2^f * 2 pi * x)
    norm_groups: int = 32
    norm_eps: float = 1e-5
    head_dim: int = 32
    # Numerics. float32 reproduces the reference; bfloat16 compute keeps norms/softmax in fp32.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    # Runtime knobs (not architecture): tiled encode/decode.
    tile_size: tuple[int, int] = (256, 256)  # pixels (H, W), multiples of 8
    tile_overlap: tuple[int, int] = (64, 64)  # pixels, multiples of 8, < tile_size
    chunk_frames: int = 2  # latent frames per temporal chunk of tiled decoding

    ARCH_FIELDS = ("latent_channels", "encoder_channels", "decoder_channels", "layers_per_block",
                   "temporal_expansions", "spatial_expansions", "encoder_attention", "fourier_freqs")

    def __post_init__(self):
        n = len(self.encoder_channels) - 1
        if not (len(self.decoder_channels) == n + 1 and len(self.layers_per_block) == n + 2
                and len(self.temporal_expansions) == n and len(self.spatial_expansions) == n
                and len(self.encoder_attention) == n + 2):
            raise ValueError(f"inconsistent VAE config lengths: {self}")
        for c in (*self.encoder_channels, *self.decoder_channels):
            if c % self.norm_groups or c % self.head_dim:
                raise ValueError(f"channel count {c} must be divisible by {self.norm_groups} (GroupNorm groups) "
                                 f"and {self.head_dim} (attention head size)")
        for size, ov in zip(self.tile_size, self.tile_overlap):
            if size % 8 or ov % 8 or not 0 <= ov < size:
                raise ValueError(f"tile_size {self.tile_size} and tile_overlap {self.tile_overlap} must be "
                                 f"multiples of 8 with 0 <= overlap < size")
        if self.chunk_frames < 1:
            raise ValueError("chunk_frames must be >= 1")

    @property
    def temporal_factor(self) -> int:
        return math.prod(self.temporal_expansions)

    @property
    def spatial_factor(self) -> int:
        return math.prod(self.spatial_expansions)

    @property
    def in_channels(self) -> int:  # RGB plus its Fourier features, as the encoder's proj_in sees it
        return 3 * (1 + 2 * len(self.fourier_freqs))

    def arch_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()
                if k in self.ARCH_FIELDS}

    @classmethod
    def from_dict(cls, d) -> "VAEConfig":
        return config_from_dict(cls, d, "VAE")


# ----------------------------------------------------------------------------- frames and latents

def latent_frames(num_frames: int, temporal_factor: int = 6) -> int:
    """6k+1 pixel frames -> k+1 latent frames."""
    if num_frames < 1 or (num_frames - 1) % temporal_factor:
        raise ValueError(f"frame count must be {temporal_factor}k+1 (1, {temporal_factor + 1}, "
                         f"{2 * temporal_factor + 1}, ..., 163), got {num_frames}")
    return (num_frames - 1) // temporal_factor + 1


def pixel_frames(num_latent_frames: int, temporal_factor: int = 6) -> int:
    """k+1 latent frames -> 6k+1 pixel frames."""
    return (num_latent_frames - 1) * temporal_factor + 1


def _stats(z):
    c = z.shape[1]
    if c != LATENTS_MEAN.shape[0]:
        raise ValueError(f"latents must be [B, {LATENTS_MEAN.shape[0]}, t, h, w], got {z.shape}")
    shape = (1, c) + (1,) * (z.ndim - 2)
    return jnp.asarray(LATENTS_MEAN).reshape(shape), jnp.asarray(LATENTS_STD).reshape(shape)


def vae_to_dit(z):
    """VAE-space latents [B, 12, ...] -> the DiT's normalised space: (z - mean) / std."""
    mean, std = _stats(z)
    return ((z.astype(jnp.float32) - mean) / std).astype(z.dtype)


def dit_to_vae(z):
    """DiT-space latents [B, 12, ...] -> VAE space: z * std + mean."""
    mean, std = _stats(z)
    return (z.astype(jnp.float32) * std + mean).astype(z.dtype)


def sample_posterior(rng, mean, logvar):
    """One draw z = mean + exp(logvar / 2) * noise."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


# ----------------------------------------------------------------------------- layers

def fourier_features(x, freqs: Sequence[int]):
    """[..., C] -> [..., C * (1 + 2F)]: x, then sin, then cos of 2^f * 2 pi * x, in float32.
    Within sin and cos the channel is the slow index and the frequency the fast one."""
    x = x.astype(jnp.float32)
    w = jnp.asarray([2.0 ** f for f in freqs], jnp.float32) * jnp.float32(2 * math.pi)
    h = (x[..., :, None] * w).reshape(*x.shape[:-1], -1)
    return jnp.concatenate([x, jnp.sin(h), jnp.cos(h)], axis=-1)


def _precision(cfg: VAEConfig):
    # float32 is the parity setting: ask for true fp32 matmuls/convs (no TF32 on GPU).
    return jax.lax.Precision.HIGHEST if jnp.dtype(cfg.compute_dtype) == jnp.float32 else None


class _Base(nn.Module):
    cfg: VAEConfig

    def dense(self, features, name, use_bias=True):
        cfg = self.cfg
        return nn.Dense(features, use_bias=use_bias, dtype=jnp.dtype(cfg.compute_dtype),
                        param_dtype=jnp.dtype(cfg.param_dtype), precision=_precision(cfg), name=name)

    def norm(self, name):
        return GroupNorm(self.cfg, name=name)


class GroupNorm(_Base):
    """GroupNorm of each frame: statistics over (H, W, channels of the group), in float32."""

    @nn.compact
    def __call__(self, x):  # [B, T, H, W, C]
        cfg = self.cfg
        c, g = x.shape[-1], cfg.norm_groups
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.dtype(cfg.param_dtype))
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.dtype(cfg.param_dtype))
        x32 = x.astype(jnp.float32).reshape(*x.shape[:-1], g, c // g)
        mu = jnp.mean(x32, axis=(2, 3, 5), keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), axis=(2, 3, 5), keepdims=True)
        y = ((x32 - mu) * jax.lax.rsqrt(var + cfg.norm_eps)).reshape(x.shape)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(jnp.dtype(cfg.compute_dtype))


class CausalConv3d(_Base):
    """3-D convolution, causal in time: kt - 1 copies of the first frame in front, edge padding of
    (k - 1) // 2 in space, no padding at the end.

    Streaming (see `_decode_streaming`): the 'cache' collection holds `prev`, the last kt - 1
    input frames of the previous chunk, and `started`, whether there was one. Once started, `prev`
    replaces the repeated first frame; when 'cache' is mutable the layer stores both for the next chunk.
    """

    features: int
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int] = (1, 1, 1)

    @nn.compact
    def __call__(self, x):  # [B, T, H, W, Cin] -> [B, T', H', W', Cout]
        cfg = self.cfg
        kt, kh, kw = self.kernel
        if kt > 1:
            front = jnp.repeat(x[:, :1], kt - 1, axis=1)
            if self.has_variable("cache", "prev"):
                prev = self.get_variable("cache", "prev").astype(x.dtype)
                front = jnp.where(self.get_variable("cache", "started"), prev, front)
            x = jnp.concatenate([front, x], axis=1)
            if self.is_mutable_collection("cache"):
                self.put_variable("cache", "prev", x[:, -(kt - 1):])
                self.put_variable("cache", "started", jnp.array(True))
        ph, pw = (kh - 1) // 2, (kw - 1) // 2
        if ph or pw:
            x = jnp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw), (0, 0)), mode="edge")
        cdt, pdt = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        k = self.param("kernel", nn.initializers.lecun_normal(), (kt, kh, kw, x.shape[-1], self.features), pdt)
        b = self.param("bias", nn.initializers.zeros, (self.features,), pdt)
        y = jax.lax.conv_general_dilated(x.astype(cdt), k.astype(cdt), self.stride, "VALID",
                                         dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                         precision=_precision(cfg))
        return y + b.astype(cdt)


class ResBlock(_Base):
    """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), 3x3x3 causal convolutions."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = CausalConv3d(self.cfg, c, (3, 3, 3), name="conv1")(nn.silu(self.norm("norm1")(x)))
        h = CausalConv3d(self.cfg, c, (3, 3, 3), name="conv2")(nn.silu(self.norm("norm2")(h)))
        return x + h


def _l2_normalize(x, eps: float):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def temporal_attention(q, k, v):
    """Causal attention, one sequence per leading index: q, k, v [N, T, heads, d] -> [N, T, heads, d].
    Logits and softmax in float32, scale 1/sqrt(d)."""
    t = q.shape[1]
    hi = jax.lax.Precision.HIGHEST
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32,
                        precision=hi) / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((t, t), bool))
    probs = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), axis=-1)
    return jnp.einsum("nhqk,nkhd->nqhd", probs.astype(v.dtype), v, precision=hi)


class AttentionBlock(_Base):
    """x + out(attention over time of norm(x)), one causal sequence per pixel position."""

    @nn.compact
    def __call__(self, x):  # [B, T, H, W, C]
        cfg = self.cfg
        b, t, hgt, wid, c = x.shape
        heads = c // cfg.head_dim
        qkv = self.dense(3 * c, "qkv", use_bias=False)(self.norm("norm")(x))  # q | k | v thirds
        out = self.dense(c, "out")
        if t == 1:  # nothing to attend to: softmax over one key is 1, so the result is v
            return x + out(qkv[..., 2 * c:])
        # one sequence per pixel: [B, T, H, W, 3C] -> [B*H*W, T, 3 * heads, d]
        qkv = qkv.transpose(0, 2, 3, 1, 4).reshape(b * hgt * wid, t, 3 * heads, cfg.head_dim)
        q, k, v = jnp.split(qkv, 3, axis=2)
        y = temporal_attention(_l2_normalize(q, cfg.norm_eps), _l2_normalize(k, cfg.norm_eps), v.astype(jnp.float32))
        y = y.reshape(b, hgt, wid, t, c).transpose(0, 3, 1, 2, 4)
        return x + out(y.astype(jnp.dtype(cfg.compute_dtype)))


class Stage(_Base):
    """`num_layers` resnet blocks ('res_i'), each followed by an attention block ('attn_i') if
    `attention`. Encoder down blocks put a strided causal conv ('conv_in') in front."""

    num_layers: int
    attention: bool = False
    down: tuple[int, int, int] | None = None  # (out channels, temporal, spatial) reduction

    @nn.compact
    def __call__(self, x):
        if self.down is not None:
            ch, st, ss = self.down
            x = CausalConv3d(self.cfg, ch, (st, ss, ss), (st, ss, ss), name="conv_in")(x)
        for i in range(self.num_layers):
            x = ResBlock(self.cfg, name=f"res_{i}")(x)
            if self.attention:
                x = AttentionBlock(self.cfg, name=f"attn_{i}")(x)
        return x


class UpBlock(_Base):
    """Resnet blocks, then a linear projection to C_out * st * ss * ss channels and depth-to-space:
    [B, T, H, W, C] -> [B, T*st, H*ss, W*ss, C_out]. No frame is dropped here (diffusers' order)."""

    num_layers: int
    out_channels: int
    temporal: int
    spatial: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResBlock(self.cfg, name=f"res_{i}")(x)
        st, ss, co = self.temporal, self.spatial, self.out_channels
        x = self.dense(co * st * ss * ss, "proj")(x)
        b, t, h, w, _ = x.shape
        x = x.reshape(b, t, h, w, co, st, ss, ss).transpose(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, t * st, h * ss, w * ss, co)


class Encoder(_Base):
    """[B, T, H, W, 3] in [-1, 1] -> raw moments [B, t, H/8, W/8, 2 * latent] (means, then log-variances)."""

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        ch, n = cfg.encoder_channels, cfg.layers_per_block
        x = fourier_features(x, cfg.fourier_freqs)  # 3 -> 15 channels, float32
        x = self.dense(ch[0], "proj_in")(x)
        x = Stage(cfg, n[0], cfg.encoder_attention[0], name="block_in")(x)
        for i in range(len(ch) - 1):
            down = (ch[i + 1], cfg.temporal_expansions[i], cfg.spatial_expansions[i])
            x = Stage(cfg, n[i + 1], cfg.encoder_attention[i + 1], down, name=f"down_{i}")(x)
        x = Stage(cfg, n[-1], cfg.encoder_attention[-1], name="block_out")(x)
        x = nn.silu(self.norm("norm_out")(x))
        return self.dense(2 * cfg.latent_channels, "proj_out", use_bias=False)(x).astype(jnp.float32)


class Decoder(_Base):
    """[B, t, h, w, latent] -> [B, 6t, 8h, 8w, 3]: all 6t frames (`decode` drops the first 5)."""

    @nn.compact
    def __call__(self, z):
        cfg = self.cfg
        ch, n = cfg.decoder_channels, cfg.layers_per_block
        x = self.dense(ch[-1], "conv_in")(z.astype(jnp.dtype(cfg.compute_dtype)))  # a 1x1x1 conv
        x = Stage(cfg, n[-1], name="block_in")(x)
        for i in range(len(ch) - 1):
            x = UpBlock(cfg, n[-i - 2], ch[-i - 2], cfg.temporal_expansions[-i - 1],
                        cfg.spatial_expansions[-i - 1], name=f"up_{i}")(x)
        x = Stage(cfg, n[0], name="block_out")(x)
        return self.dense(3, "proj_out")(nn.silu(x)).astype(jnp.float32)


# ----------------------------------------------------------------------------- API

def init(rng, cfg: VAEConfig = VAEConfig()) -> dict:
    """Random parameters {'encoder': ..., 'decoder': ...} (shapes do not depend on the clip size)."""
    k1, k2 = jax.random.split(rng)
    f, s = cfg.temporal_factor, cfg.spatial_factor
    enc = Encoder(cfg).init(k1, jnp.zeros((1, f + 1, s, s, 3), jnp.float32))["params"]
    dec = Decoder(cfg).init(k2, jnp.zeros((1, 2, 1, 1, cfg.latent_channels), jnp.float32))["params"]
    return {"encoder": enc, "decoder": dec}


def check_pixels(shape, cfg: VAEConfig) -> None:
    """Raise ValueError saying what is expected unless `shape` is [B, 3, 6k+1, 8m, 8n]."""
    f, s = cfg.temporal_factor, cfg.spatial_factor
    expect = f"pixels must be [B, 3, T, H, W] with T = {f}k+1 frames and H, W divisible by {s}"
    if len(shape) != 5:
        raise ValueError(f"{expect}; got a {len(shape)}-D array of shape {tuple(shape)}")
    _, c, t, h, w = shape
    if c != 3:
        raise ValueError(f"{expect}; got {c} channels (shape {tuple(shape)}), expected 3 (RGB in [-1, 1])")
    if t < 1 or (t - 1) % f:
        raise ValueError(f"{expect}; got T = {t} frames (shape {tuple(shape)}), expected {f}k+1 "
                         f"(1, {f + 1}, {2 * f + 1}, ..., 163)")
    if h % s or w % s:
        raise ValueError(f"{expect}; got H x W = {h} x {w} (shape {tuple(shape)}), not divisible by {s}")


def check_latents(shape, cfg: VAEConfig) -> None:
    expect = f"latents must be [B, {cfg.latent_channels}, t, h, w]"
    if len(shape) != 5:
        raise ValueError(f"{expect}; got a {len(shape)}-D array of shape {tuple(shape)}")
    if shape[1] != cfg.latent_channels:
        raise ValueError(f"{expect}; got {shape[1]} channels (shape {tuple(shape)}), "
                         f"expected {cfg.latent_channels}")
    if min(shape[2:]) < 1:
        raise ValueError(f"{expect} with t, h, w >= 1; got shape {tuple(shape)}")


def encode(params, pixels, cfg: VAEConfig = VAEConfig(), tiled: bool = False):
    """pixels [B, 3, 6k+1, H, W] in [-1, 1] -> (mean, logvar), each [B, 12, k+1, H/8, W/8] float32.

    `tiled`: encode overlapping spatial tiles (cfg.tile_size / tile_overlap) and blend them; the
    time axis is always encoded whole. jit with `static_argnames=('cfg', 'tiled')`.
    """
    check_pixels(pixels.shape, cfg)
    enc = Encoder(cfg)

    def run(x):  # [B, 3, T, h, w] -> [B, 24, t, h/8, w/8]
        x = jnp.transpose(x, (0, 2, 3, 4, 1)).astype(jnp.float32)  # channels-last inside
        return jnp.transpose(enc.apply({"params": params["encoder"]}, x), (0, 4, 1, 2, 3))

    if tiled:
        b, _, t, h, w = pixels.shape
        s = cfg.spatial_factor
        out_shape = (b, 2 * cfg.latent_channels, latent_frames(t, cfg.temporal_factor), h // s, w // s)
        moments = _tiled_2d(run, pixels, cfg, in_scale=s, out_scale=1, out_shape=out_shape)
    else:
        moments = run(pixels)
    mean, logvar = jnp.split(moments, 2, axis=1)
    return mean, jnp.clip(logvar, *LOGVAR_CLAMP)


def decode(params, latents, cfg: VAEConfig = VAEConfig(), tiled: bool = False, share=None):
    """VAE-space latents [B, 12, t, h, w] -> pixels [B, 3, 6(t-1)+1, 8h, 8w] float32.

    The decoder makes 6t frames and the first 5 are dropped at the very end (diffusers' order;
    genmo's original drops frames inside the up blocks, which changes the first frames).
    `tiled`: stream over time in chunks of cfg.chunk_frames latent frames (exact) and decode
    overlapping spatial tiles blended linearly (approximate). jit with `static_argnames=('cfg', 'tiled')`.
    `share` = (k, n), k possibly traced (e.g. a device's index inside shard_map): decode only tiles
    k, k + n, k + 2n, ... and return their blended part; the n parts sum to the whole decode.
    """
    check_latents(latents.shape, cfg)
    drop = cfg.temporal_factor - 1

    def run(z, stream):  # [B, 12, t, h, w] -> [B, 3, T, 8h, 8w]
        z = jnp.transpose(z, (0, 2, 3, 4, 1))  # channels-last inside
        if stream:
            x = _decode_streaming(params["decoder"], z, cfg)
        else:
            x = Decoder(cfg).apply({"params": params["decoder"]}, z)
        return jnp.transpose(x[:, drop:], (0, 4, 1, 2, 3))

    if not tiled:
        return run(latents, stream=False)
    b, _, t, h, w = latents.shape
    s = cfg.spatial_factor
    out_shape = (b, 3, pixel_frames(t, cfg.temporal_factor), h * s, w * s)
    return _tiled_2d(lambda z: run(z, stream=True), latents, cfg, in_scale=1, out_scale=s, out_shape=out_shape,
                     share=share)


# ----------------------------------------------------------------------------- tiling

def _decode_streaming(dec_params, z, cfg: VAEConfig):
    """Decode [B, t, h, w, C] in temporal chunks of cfg.chunk_frames latent frames -> [B, 6t, 8h, 8w, 3].

    One lax.scan over equal chunks carries every causal conv's cache (its last two input frames);
    the first step, with `started` False, pads with the first frame as the one-pass decoder does.
    The latents are padded at the end to a whole number of chunks and the extra frames dropped:
    the decoder is causal, so they change nothing before them. Exact.
    """
    model = Decoder(cfg)
    b, t = z.shape[:2]
    c = min(cfg.chunk_frames, t)
    n = -(-t // c)
    if n == 1:
        return model.apply({"params": dec_params}, z)
    z = jnp.pad(z, ((0, 0), (0, n * c - t), (0, 0), (0, 0), (0, 0)), mode="edge")
    chunks = z.reshape(b, n, c, *z.shape[2:]).swapaxes(0, 1)  # [n, B, c, h, w, C]
    shapes = jax.eval_shape(lambda: model.apply({"params": dec_params}, chunks[0], mutable=["cache"])[1])
    cache = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes["cache"])  # started = False

    def step(cache, zc):
        out, new = model.apply({"params": dec_params, "cache": cache}, zc, mutable=["cache"])
        return new["cache"], out

    _, outs = jax.lax.scan(step, cache, chunks)  # [n, B, 6c, H, W, 3]
    outs = outs.swapaxes(0, 1).reshape(b, -1, *outs.shape[3:])
    return outs[:, :t * cfg.temporal_factor]


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of evenly spaced tiles of length `tile` covering [0, size), neighbours overlapping by
    at least `overlap` (one tile if it fits)."""
    if size <= tile:
        return [0]
    n = 1 + math.ceil((size - tile) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def tile_weights(starts: Sequence[int], tile: int, scale: int) -> np.ndarray:
    """[n, tile * scale] blending weights along one axis: 1 inside a tile, a linear ramp across
    each overlap with a neighbour (rising where the tile enters, falling where it leaves), so
    two overlapping tiles cross-fade with weights summing to 1."""
    w = np.ones((len(starts), tile * scale), np.float32)
    for i in range(1, len(starts)):
        ov = (starts[i - 1] + tile - starts[i]) * scale
        if ov > 0:
            ramp = (np.arange(ov, dtype=np.float32) + 0.5) / ov
            w[i, :ov] = np.minimum(w[i, :ov], ramp)
            w[i - 1, -ov:] = np.minimum(w[i - 1, -ov:], 1.0 - ramp)
    return w


def _tiled_2d(fn, x, cfg: VAEConfig, in_scale: int, out_scale: int, out_shape, share=None):
    """Apply `fn` to overlapping spatial tiles of x [B, C, T, H, W] and blend the results.

    Tiles are laid out in latent units (size tile_size / 8, overlap tile_overlap / 8, clipped to
    the clip); x has `in_scale` pixels per latent (8 for pixels, 1 for latents) and fn's output
    [B, C', T', h', w'] has `out_scale`. The result is sum(weight * tile) / sum(weight), with each
    tile's weights pre-divided by the sum (static), accumulated under a lax.scan over tiles so
    that one tile's activations are alive at a time and no full-size temporary is made.
    `share` = (k, n): only tiles k, k + n, ... (padded with zero-weight tiles to a multiple of n).
    """
    s = cfg.spatial_factor
    lat_h, lat_w = x.shape[3] // in_scale, x.shape[4] // in_scale
    th, tw = min(cfg.tile_size[0] // s, lat_h), min(cfg.tile_size[1] // s, lat_w)
    ys = tile_starts(lat_h, th, min(cfg.tile_overlap[0] // s, th - 1))
    xs = tile_starts(lat_w, tw, min(cfg.tile_overlap[1] // s, tw - 1))
    if len(ys) == 1 and len(xs) == 1 and share is None:
        return fn(x)
    wy, wx = tile_weights(ys, th, out_scale), tile_weights(xs, tw, out_scale)
    grid = [(i, j) for i in range(len(ys)) for j in range(len(xs))]

    def region(i, j):  # where tile (i, j) lands in the output
        y0, x0 = ys[i] * out_scale, xs[j] * out_scale
        return np.s_[y0:y0 + th * out_scale, x0:x0 + tw * out_scale]

    total = np.zeros((lat_h * out_scale, lat_w * out_scale), np.float32)
    for i, j in grid:
        total[region(i, j)] += np.outer(wy[i], wx[j])
    masks = np.stack([np.outer(wy[i], wx[j]) / total[region(i, j)] for i, j in grid])
    y0s = np.asarray([ys[i] for i, _ in grid], np.int32)
    x0s = np.asarray([xs[j] for _, j in grid], np.int32)
    b, c, t = x.shape[:3]
    tiles = (jnp.asarray(y0s), jnp.asarray(x0s), jnp.asarray(masks))
    if share is not None:  # this share's tiles: every n-th from k, the grid padded with weightless tiles
        k, n = share
        pad = -len(grid) % n
        y0s, x0s = np.pad(y0s, (0, pad)), np.pad(x0s, (0, pad))
        masks = np.concatenate([masks, np.zeros((pad, *masks.shape[1:]), masks.dtype)])
        tiles = tuple(jnp.take(jnp.asarray(a).reshape(-1, n, *a.shape[1:]), k, axis=1) for a in (y0s, x0s, masks))

    def body(acc, tile):
        y0, x0, mask = tile
        inp = jax.lax.dynamic_slice(x, (0, 0, 0, y0 * in_scale, x0 * in_scale),
                                    (b, c, t, th * in_scale, tw * in_scale))
        out = fn(inp).astype(jnp.float32) * mask
        at = (0, 0, 0, y0 * out_scale, x0 * out_scale)
        cur = jax.lax.dynamic_slice(acc, at, out.shape)
        return jax.lax.dynamic_update_slice(acc, cur + out, at), None

    acc, _ = jax.lax.scan(body, jnp.zeros(out_shape, jnp.float32), tiles)
    return acc


def param_count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
