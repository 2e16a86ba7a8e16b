"""AsymmDiT, the Mochi 1 diffusion transformer, as Flax Linen modules.

Parameter names follow genmo's original checkpoint (blocks.N.attn.qkv_x, mod_x, mlp_x.w1,
...), with Flax conventions: Dense kernels are [in, out]; the 47 symmetric blocks are stacked
on a leading layer axis under 'blocks' (one nn.scan); the last block is 'last_block'.

Every Dense declares the logical names of its kernel's dimensions where it is created
(`logical_axes` collects them for sharding), and the block's main activations carry checkpoint
names for name-based remat policies (models/remat.py): 'qkv' (q/k/v projections), 'attn'
(the attention: its output, or a fused kernel's output and softmax statistics), 'proj' (output
projections), 'mlp_in' / 'mlp_out' (the SwiGLU's matmuls), and 'residual': a copy of the block's
inputs (the residual streams x and y entering it), taken at its top, from which everything in the
block is computed. Every policy but 'none' keeps a block's inputs for the backward pass (the scan
stacks them: [blocks, B, N, 3072] float32, 24 GiB at 163 frames); a checkpointed function's inputs
themselves cannot be offloaded, the named copy can: 'offload:residual' keeps it in pinned host memory
and the inputs drop out of what the backward keeps ('full''s recomputation, the inputs on the host;
'offload:residual+attn' etc. combine it). 'offload:residual_bf16' / 'save:residual_bf16' keep the
stacked blocks' inputs in bfloat16 (remat.store_inputs: an exact forward, gradients from the
rounded inputs). models/remat.py's docstring has the details.

Call convention (the reference's tensors):
    latents  [B, C=12, T, H, W]   (DiT-space, i.e. normalised latents)
    t5_feats [B, L, 4096]
    t5_mask  [B, L] bool, True on real tokens (a prefix: T5 pads at the end)
    timestep [B] = 1000 * (1 - sigma)   (sigma = 1 is pure noise)
    -> velocity prediction [B, C, T, H, W] in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from mochi_jax.models import layers, quant, sharding
from mochi_jax.models import remat as remat_lib
from mochi_jax.models.layers import Dense, RMSNorm, config_from_dict, rms_norm
from mochi_jax.models.lora import LoraTarget
from mochi_jax.models.sharding import constrain

# Logical names of the activations (mapped to mesh axes by mochi_jax.models.sharding.RULES).
TOKENS = ("batch", "seq", "act_embed")  # visual stream [B, N, width]: tokens split over 'sequence'
TEXT = ("batch", None, "act_embed")  # text stream [B, L, text_width]


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    depth: int = 48
    num_heads: int = 24
    head_dim: int = 128
    text_width: int = 1536  # width of the text stream (diffusers: pooled_projection_dim)
    t5_dim: int = 4096
    in_channels: int = 12
    patch_size: int = 2
    time_embed_dim: int = 256
    pool_heads: int = 8
    norm_eps: float = 1e-6  # modulated RMS norms and the final LayerNorm
    qk_norm_eps: float = 1e-5
    rope_base_area: int = 192 * 192
    # frozen weights: float32 | bfloat16, or a weight-only quantized base, int8 | float8_e4m3fn: every
    # Dense kernel of 'blocks' and 'last_block' quantized with a float32 scale per output channel,
    # the rest bfloat16 (mochi_jax.models.quant)
    param_dtype: str = "bfloat16"
    compute_dtype: str = "bfloat16"  # matmuls and attention; norms, softmax, modulation are fp32
    attention: str = "xla"  # 'xla' | 'cudnn' | 'splash'
    # attention='splash': q and kv tile (tokens, a multiple of 128) of the forward and backward
    # kernels; 512 as in MaxText, which pads Mochi's 11k-45k joint tokens by at most 511 (< 5 %).
    splash_block: int = 512
    # a key of remat.POLICIES, or save:<names> / offload:<names> (models/remat.py), e.g. 'offload:residual':
    # 'full' with every block's inputs in pinned host memory; 'offload:residual_bf16': in bfloat16
    remat: str = "full"
    scan_layers: bool = True  # False: an unrolled Python loop (for tests and debugging)
    # A remat policy per consecutive group of the depth-1 stacked blocks, e.g. "dots:16,full:31"
    # (counts sum to depth-1); '' = `remat` for every block. Needs scan_layers.
    remat_groups: str = ""
    # The stacked blocks' weights ('blocks') live in pinned host memory (`variable_shardings`
    # places them there) and each block's weights are copied to the device inside the scan, where
    # that block runs (and again for its backward): about one block's weights on the device at a
    # time. Needs scan_layers. Without host-placed inputs the copy is a no-op.
    weights_on_host: bool = False

    def __post_init__(self):
        quant.check_param_dtype(self.param_dtype)
        if self.weights_on_host and not self.scan_layers:
            raise ValueError("model.weights_on_host needs scan_layers=True (the blocks are fetched one scan step "
                             "at a time)")

    @property
    def quantized(self) -> bool:
        return quant.is_quantized(self.param_dtype)

    @property
    def storage_dtype(self) -> str:
        """The dtype of the weights that are not quantized (all of them for a float base)."""
        return quant.STORAGE_DTYPE if self.quantized else self.param_dtype

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @staticmethod
    def mlp_inner(width: int) -> int:
        return (4 * width * 2) // 3

    @classmethod
    def from_dict(cls, d) -> "DiTConfig":
        return config_from_dict(cls, d, "DiT")

    ARCH_FIELDS = ("depth", "num_heads", "head_dim", "text_width", "t5_dim", "in_channels", "patch_size",
                   "time_embed_dim")

    def arch(self) -> dict:
        """The architecture fields (what a converted checkpoint fixes)."""
        return {k: getattr(self, k) for k in self.ARCH_FIELDS}

    # how the model runs: what a command's `model` block sets (checkpoints.dit_config), not the checkpoint
    SETTING_FIELDS = ("param_dtype", "compute_dtype", "attention", "splash_block", "remat", "remat_groups",
                      "scan_layers", "weights_on_host")

    def settings(self) -> dict:
        """The setting fields (SETTING_FIELDS) and their values."""
        return {k: getattr(self, k) for k in self.SETTING_FIELDS}


# ----------------------------------------------------------------------------- helpers

def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal features in [cos, sin] order, frequencies exp(-ln(max_period) * i / (dim/2))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_positions(t: int, h: int, w: int, base_area: int) -> jnp.ndarray:
    """[t*h*w, 3] positions (frame, row, column) of the visual tokens, in token order.

    Rows and columns are cell centres of a grid spanning [-h*s/2, h*s/2] (resp. w) with
    s = sqrt(base_area / (h*w)), so every resolution covers the same area.
    """
    s = (base_area / (h * w)) ** 0.5

    def centres(n):
        edges = jnp.linspace(-n * s / 2, n * s / 2, n + 1, dtype=jnp.float32)
        return (edges[:-1] + edges[1:]) / 2

    grid = jnp.meshgrid(jnp.arange(t, dtype=jnp.float32), centres(h), centres(w), indexing="ij")
    return jnp.stack(grid, axis=-1).reshape(-1, 3)


def rope_cos_sin(pos_frequencies, positions):
    """pos_frequencies [3, H, D/2], positions [N, 3] -> cos, sin of [N, H, D/2] (float32)."""
    angles = jnp.einsum("nd,dhf->nhf", positions, pos_frequencies.astype(jnp.float32))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate interleaved (even, odd) pairs of the head dim. x [B, N, H, D] float32."""
    even, odd = x[..., 0::2], x[..., 1::2]
    rot = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rot.reshape(x.shape)


def patchify(latents, p: int):
    """[B, C, T, H, W] -> [B, T*(H/p)*(W/p), p*p*C], tokens in (t, h, w) order, features (p1, p2, c)."""
    b, c, t, h, w = latents.shape
    x = latents.reshape(b, c, t, h // p, p, w // p, p)
    x = x.transpose(0, 2, 3, 5, 4, 6, 1)  # b t hp wp p1 p2 c
    return x.reshape(b, t * (h // p) * (w // p), p * p * c)


def unpatchify(x, t: int, hp: int, wp: int, p: int):
    """Inverse of patchify: [B, t*hp*wp, p*p*C] -> [B, C, t, hp*p, wp*p]."""
    b = x.shape[0]
    x = x.reshape(b, t, hp, wp, p, p, -1)
    x = x.transpose(0, 6, 1, 2, 4, 3, 5)  # b c t hp p1 wp p2
    return x.reshape(b, -1, t, hp * p, wp * p)


# ----------------------------------------------------------------------------- modules

class _Base(nn.Module):
    cfg: DiTConfig
    lora_targets: Sequence[LoraTarget] = ()
    IN_BLOCK = False  # the modules of a joint block: their Dense kernels are quantized in a quantized base

    def dense(self, features, name, axes, use_bias=True, **kw):
        """A Dense named `name` whose kernel [in, out] has the logical names `axes`."""
        cfg = self.cfg
        return Dense(features, axes=axes, use_bias=use_bias, param_dtype=jnp.dtype(cfg.storage_dtype),
                     compute_dtype=jnp.dtype(cfg.compute_dtype), lora_targets=self.lora_targets,
                     quant=cfg.param_dtype if cfg.quantized and self.IN_BLOCK else "", name=name, **kw)


class AttentionPool(_Base):
    """Pool T5 features into one vector: the masked mean queries [mean; tokens]."""

    @nn.compact
    def __call__(self, feats, mask):
        cfg = self.cfg
        b, l, d = feats.shape
        heads, hd = cfg.pool_heads, d // cfg.pool_heads
        m = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(feats.astype(jnp.float32) * m, axis=1, keepdims=True) / jnp.maximum(
            jnp.sum(m, axis=1, keepdims=True), 1.0)  # [B, 1, D]
        seq = jnp.concatenate([pooled, feats.astype(jnp.float32)], axis=1)  # [B, 1+L, D]
        kv = self.dense(2 * d, "to_kv", ("embed", "mlp"))(seq).reshape(b, 1 + l, 2, heads, hd)
        q = self.dense(d, "to_q", ("embed", "mlp"))(pooled).reshape(b, 1, heads, hd)
        key_mask = jnp.concatenate([jnp.ones((b, 1), bool), mask.astype(bool)], axis=1)
        out = layers.attention(q, kv[:, :, 0], kv[:, :, 1], key_mask, impl="xla")
        return self.dense(cfg.width, "to_out", ("mlp", "embed"))(out.reshape(b, d))


class TimestepEmbedder(_Base):
    @nn.compact
    def __call__(self, timestep):
        h = timestep_embedding(timestep, self.cfg.time_embed_dim)
        h = self.dense(self.cfg.width, "mlp_0", (None, "embed"))(h)
        return self.dense(self.cfg.width, "mlp_2", ("embed", None))(nn.silu(h))


class FeedForward(_Base):
    """SwiGLU: w2(silu(a) * g) where [a, g] = w1(x) (genmo's half order)."""

    hidden: int = 0
    IN_BLOCK = True

    @nn.compact
    def __call__(self, x):
        a, g = jnp.split(checkpoint_name(self.dense(2 * self.hidden, "w1", ("embed", "mlp"), use_bias=False)(x),
                                         "mlp_in"), 2, axis=-1)
        return checkpoint_name(self.dense(x.shape[-1], "w2", ("mlp", "embed"), use_bias=False)(nn.silu(a) * g),
                               "mlp_out")


class JointAttention(_Base):
    """Attention over [visual tokens; text tokens] with one softmax; padding text is never a key."""

    last: bool = False
    IN_BLOCK = True

    @nn.compact
    def __call__(self, x, y, y_mask, rope):
        cfg = self.cfg
        h, hd = cfg.num_heads, cfg.head_dim
        cdt = jnp.dtype(cfg.compute_dtype)
        b, n, _ = x.shape
        pdt = jnp.dtype(cfg.storage_dtype)

        def qkv(inp, proj, norm_q, norm_k):
            q, k, v = jnp.split(checkpoint_name(self.dense(3 * h * hd, proj, ("embed", "heads"), use_bias=False)(inp),
                                                "qkv").reshape(inp.shape[0], inp.shape[1], 3 * h, hd), 3, axis=2)
            q = RMSNorm(cfg.qk_norm_eps, pdt, name=norm_q)(q)
            k = RMSNorm(cfg.qk_norm_eps, pdt, name=norm_k)(k)
            return q, k, v

        qx, kx, vx = qkv(x, "qkv_x", "q_norm_x", "k_norm_x")
        qx, kx = apply_rope(qx, *rope), apply_rope(kx, *rope)
        qy, ky, vy = qkv(y, "qkv_y", "q_norm_y", "k_norm_y")
        # Sequence parallelism: tokens arrive split over 'sequence'; attention needs every key, so
        # q/k/v switch to heads split, tokens whole (an all-to-all), and back afterwards.
        heads_split = ("batch", None, "act_heads", None)
        q = constrain(jnp.concatenate([qx, qy], axis=1).astype(cdt), heads_split)
        k = constrain(jnp.concatenate([kx, ky], axis=1).astype(cdt), heads_split)
        v = constrain(jnp.concatenate([vx, vy], axis=1).astype(cdt), heads_split)
        key_mask = jnp.concatenate([jnp.ones((b, n), bool), y_mask], axis=1)
        out = layers.attention(q, k, v, key_mask, impl=cfg.attention, splash_block=cfg.splash_block,
                               name=remat_lib.ATTENTION_NAME)
        out = constrain(out, heads_split)
        out = out.reshape(b, -1, h * hd)
        out_x = checkpoint_name(constrain(self.dense(cfg.width, "proj_x", ("heads", "embed"))(out[:, :n]), TOKENS),
                                "proj")
        out_y = None if self.last else checkpoint_name(
            self.dense(cfg.text_width, "proj_y", ("heads", "embed"))(out[:, n:]), "proj")
        return out_x, out_y


class Block(_Base):
    """One joint block. The last block (last=True) updates only the visual stream."""

    last: bool = False
    IN_BLOCK = True

    @nn.compact
    def __call__(self, carry, c, y_mask, rope_cos, rope_sin):
        x, y = carry  # float32 residual streams [B, N, 3072], [B, L, 1536]
        x, y = constrain(x, TOKENS), constrain(y, TEXT)
        # a named copy of the block's inputs, from which the block computes everything: the backward pass's
        # recomputation starts from it, so a policy that offloads 'residual' keeps the block inputs in host
        # memory and the inputs themselves are not kept (models/remat.py)
        x = checkpoint_name(x, remat_lib.RESIDUAL_NAME)
        y = checkpoint_name(y, remat_lib.RESIDUAL_NAME)
        cfg = self.cfg
        eps = cfg.norm_eps
        cdt = jnp.dtype(cfg.compute_dtype)
        sc = nn.silu(c)
        scale_msa, gate_msa, scale_mlp, gate_mlp = jnp.split(
            self.dense(4 * cfg.width, "mod_x", ("embed", "mlp"))(sc).astype(jnp.float32)[:, None], 4, axis=-1)
        if self.last:
            scale_msa_y = self.dense(cfg.text_width, "mod_y", ("embed", "mlp"))(sc).astype(jnp.float32)[:, None]
        else:
            scale_msa_y, gate_msa_y, scale_mlp_y, gate_mlp_y = jnp.split(
                self.dense(4 * cfg.text_width, "mod_y", ("embed", "mlp"))(sc).astype(jnp.float32)[:, None], 4, axis=-1)

        x_in = (rms_norm(x, eps) * (1 + scale_msa)).astype(cdt)
        y_in = (rms_norm(y, eps) * (1 + scale_msa_y)).astype(cdt)
        attn_x, attn_y = JointAttention(cfg, self.lora_targets, last=self.last, name="attn")(
            x_in, y_in, y_mask, (rope_cos, rope_sin))

        x = x + rms_norm(attn_x, eps) * jnp.tanh(gate_msa)
        mlp_x = FeedForward(cfg, self.lora_targets, hidden=cfg.mlp_inner(cfg.width), name="mlp_x")
        x = x + rms_norm(mlp_x((rms_norm(x, eps) * (1 + scale_mlp)).astype(cdt)), eps) * jnp.tanh(gate_mlp)
        if not self.last:
            y = y + rms_norm(attn_y, eps) * jnp.tanh(gate_msa_y)
            mlp_y = FeedForward(cfg, self.lora_targets, hidden=cfg.mlp_inner(cfg.text_width), name="mlp_y")
            y = y + rms_norm(mlp_y((rms_norm(y, eps) * (1 + scale_mlp_y)).astype(cdt)), eps) * jnp.tanh(
                gate_mlp_y)
        return (x, y), None


class FinalLayer(_Base):
    @nn.compact
    def __call__(self, x, c):
        cfg = self.cfg
        shift, scale = jnp.split(self.dense(2 * cfg.width, "mod", ("embed", "mlp"))(nn.silu(c)).astype(jnp.float32)[:, None],
                                 2, axis=-1)
        x32 = x.astype(jnp.float32)
        mu = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
        x32 = (x32 - mu) * jax.lax.rsqrt(var + cfg.norm_eps)
        x = (x32 * (1 + scale) + shift).astype(jnp.dtype(cfg.compute_dtype))
        return self.dense(cfg.patch_size ** 2 * cfg.in_channels, "linear", ("embed", None))(x)


class MochiDiT(_Base):
    """The full AsymmDiT. See the module docstring for the call convention."""

    def param_axes(self) -> dict:
        return {"pos_frequencies": (None, None, None)}  # [3, heads, head_dim / 2], small: replicated

    @nn.compact
    def __call__(self, latents, t5_feats, t5_mask, timestep):
        cfg = self.cfg
        b, ch, t, hgt, wid = latents.shape
        p = cfg.patch_size
        if ch != cfg.in_channels or hgt % p or wid % p:
            raise ValueError(f"latents must be [B, {cfg.in_channels}, T, H, W] with H and W divisible by {p}, "
                             f"got {latents.shape}")
        hp, wp = hgt // p, wid // p
        cdt = jnp.dtype(cfg.compute_dtype)
        t5_mask = t5_mask.astype(bool)

        # Conditioning vector c [B, width] and text tokens y [B, L, text_width].
        c = TimestepEmbedder(cfg, self.lora_targets, name="t_embedder")(timestep).astype(jnp.float32)
        c = c + AttentionPool(cfg, self.lora_targets, name="t5_y_embedder")(t5_feats, t5_mask).astype(jnp.float32)
        y = self.dense(cfg.text_width, "t5_yproj", ("embed", None))(t5_feats.astype(cdt)).astype(jnp.float32)

        x = self.dense(cfg.width, "x_embedder", (None, "embed"))(patchify(latents, p).astype(cdt)).astype(jnp.float32)
        x = constrain(x, TOKENS)
        pos_freq = self.param("pos_frequencies", nn.initializers.normal(0.02),
                              (3, cfg.num_heads, cfg.head_dim // 2), jnp.float32)
        rope = rope_cos_sin(pos_freq, rope_positions(t, hp, wp, cfg.rope_base_area))

        block_args = (c, t5_mask, *rope)
        n_sym = cfg.depth - 1
        grouped = cfg.remat_groups or cfg.weights_on_host or remat_lib.residual_store(cfg.remat)
        if cfg.scan_layers and grouped and not self.is_initializing():
            x, y = self._grouped_blocks((x, y), block_args)
        elif cfg.scan_layers:
            block = remat_lib.remat(Block, cfg.remat)
            scanned = nn.scan(block, variable_axes={"params": 0, "lora": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast,) * len(block_args), length=n_sym)
            (x, y), _ = scanned(cfg, self.lora_targets, name="blocks")((x, y), *block_args)
        else:
            block = remat_lib.remat(Block, cfg.remat)
            for i in range(n_sym):
                (x, y), _ = block(cfg, self.lora_targets, name=f"blocks_{i}")((x, y), *block_args)
        (x, _), _ = remat_lib.remat(Block, cfg.remat)(cfg, self.lora_targets, last=True, name="last_block")(
            (x, y), *block_args)

        out = FinalLayer(cfg, self.lora_targets, name="final_layer")(x, c)
        return unpatchify(out.astype(jnp.float32), t, hp, wp, p)

    def _grouped_blocks(self, carry, block_args):
        """The stacked blocks with a remat policy per consecutive group (cfg.remat_groups; one group
        of cfg.remat when empty): one jax.lax.scan per group over the same stacked 'blocks' variables.
        Each step reads its block's weights from the whole stack by index, inside the rematerialised
        body: a group's slice of the stack would be a copy of its weights (18.7 GiB for the 10 B model).
        cfg.weights_on_host: each step then copies its block's weights to the device memory (inside the
        rematerialised body, so the backward fetches them again instead of keeping them).
        A group under 'offload:residual_bf16' / 'save:residual_bf16' runs its blocks in remat.store_inputs
        instead of jax.checkpoint: an exact forward that keeps each block's visual-stream input in bfloat16
        (the text stream's, L x text_width, under 0.3 % of the bytes at 163 frames, in float32)."""
        cfg = self.cfg
        params = self.variables["params"]["blocks"]
        lora = self.variables.get("lora", {}).get("blocks")
        rng = self.make_rng("dropout") if self.has_rng("dropout") else None
        block = Block(cfg, tuple(self.lora_targets), parent=None)  # unbound: applied functionally

        # every array the body uses is an argument (none closed over): remat.store_inputs's custom_vjp
        # gives cotangents to arguments only
        def run(carry, stack, args, key, lo, i):
            p = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), stack)
            if cfg.weights_on_host:
                p = jax.tree_util.tree_map(lambda a: jax.device_put(a, jax.memory.Space.Device), p)
            variables = {"params": p, **({"lora": lo} if lo is not None else {})}
            rngs = {"dropout": jax.random.fold_in(key, i)} if key is not None else {}
            return block.apply(variables, carry, *args, rngs=rngs)[0]

        start = 0
        groups = (remat_lib.parse_remat_groups(cfg.remat_groups, cfg.depth - 1) if cfg.remat_groups
                  else [(cfg.remat, cfg.depth - 1)])
        for policy, n in groups:
            store = remat_lib.residual_store(policy)
            if policy == "none":
                body = run
            elif store:  # the visual stream rounded; the text stream's inputs (< 1 % of the bytes) kept exact
                body = remat_lib.store_inputs(run, *store, rounded=(True, False))
            else:
                body = jax.checkpoint(run, policy=remat_lib.remat_policy(policy), prevent_cse=False)
            lo = jax.tree_util.tree_map(lambda a: a[start:start + n], lora)  # small, and differentiated: sliced
            carry, _ = jax.lax.scan(lambda c, x: (body(c, params, block_args, rng, *x), None), carry,
                                    (lo, jnp.arange(start, start + n)))
            start += n
        return carry


def stack_unrolled(params: dict, depth: int, shardings=None) -> dict:
    """Turn an unrolled tree (blocks_0 .. blocks_{depth-2}) into the scanned layout ('blocks');
    `shardings` (for the scanned layout) places each stacked leaf directly."""
    return layers.stack_layers(params, "blocks", depth - 1, shardings)


def dummy_inputs(cfg: DiTConfig, t5_len: int = 1):
    """The smallest valid call arguments (one patch, one text token): enough to build the variables."""
    p = cfg.patch_size
    return (jnp.zeros((1, cfg.in_channels, 1, p, p)), jnp.zeros((1, t5_len, cfg.t5_dim)),
            jnp.ones((1, t5_len), bool), jnp.zeros((1,)))


def abstract_variables(cfg: DiTConfig, lora_targets: Sequence[LoraTarget] = ()) -> dict:
    """{'params': ..., 'lora': ...} as ShapeDtypeStructs: traced, nothing allocated or compiled."""
    model = MochiDiT(cfg, tuple(lora_targets))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs(cfg)))


def logical_axes(cfg: DiTConfig, lora_targets: Sequence[LoraTarget] = ()) -> dict:
    """{'params': ..., 'lora': ...}: the logical axis names of every parameter and LoRA factor, as
    the layers declare them (e.g. blocks/attn/qkv_x/kernel -> ('layers', 'embed', 'heads')); leaves
    are tuples. mochi_jax.models.sharding maps them to mesh axes."""
    return layers.declared_axes(MochiDiT(cfg, tuple(lora_targets)), *dummy_inputs(cfg))


def variable_shardings(cfg: DiTConfig, lora_targets: Sequence[LoraTarget], mesh) -> dict:
    """{'params': ..., 'lora': ...}: NamedShardings on `mesh` by the logical-axis rules (FSDP over
    'embed', tensor parallelism over heads and MLP columns); with cfg.weights_on_host the stacked
    blocks' weights in pinned host memory (the scan copies each block to the device as it runs).
    Training and sampling place the weights with this one function."""
    names, shapes = logical_axes(cfg, lora_targets), abstract_variables(cfg, lora_targets)
    params = sharding.param_shardings(names["params"], shapes["params"], mesh)
    if cfg.weights_on_host:
        params = {**params, "blocks": jax.tree_util.tree_map(sharding.host_sharding, params["blocks"])}
    lora = sharding.param_shardings(names["lora"], shapes["lora"], mesh) if lora_targets else {}
    return {"params": params, "lora": lora}


def param_count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
