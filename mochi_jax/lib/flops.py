"""FLOP model of one LoRA training step of the Mochi DiT (matmuls and attention only).

    from mochi_jax.lib.flops import flops_per_step, flop_breakdown
    flops_per_step(cfg, 37, 480, 848, "full")   # 6.71e14 for the 10 B model, 256 text tokens

Used by benchmarks/gpu_step.py to turn seconds per step into TFLOP/s and a fraction of the chip's
peak. The formula is in `flop_breakdown`'s docstring; tests/test_gpu_step.py checks it against XLA's
`compiled.cost_analysis()` of the real step.
"""

from __future__ import annotations

from mochi_jax.models.dit import DiTConfig
from mochi_jax.models.remat import is_remat_groups, parse_remat_groups, remat_policy
from mochi_jax.models.lora import LoraTarget, REFERENCE_TARGETS, find_target, targets_from_config

TEXT_TOKENS = 256  # T5 tokens per caption (Mochi pads or truncates to 256)


def visual_tokens(cfg: DiTConfig, frames: int, height: int, width: int) -> int:
    """Visual tokens per sample: latent frames (F-1)/6+1 x (H/8/p) x (W/8/p); 1590 per latent frame
    at 480x848."""
    if frames < 1 or (frames - 1) % 6:
        raise ValueError(f"frames must be 6k+1, got {frames}")
    p = cfg.patch_size
    return ((frames - 1) // 6 + 1) * (height // 8 // p) * (width // 8 // p)


def _dense(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def _recompute_share(policy: str, attention: str) -> tuple[bool, float]:
    """(matmuls recomputed?, share of the attention's forward recomputed) in a block's backward under a
    remat policy.

    'full' recomputes the whole block forward, and so do 'offload:residual' and 'offload:residual_bf16' /
    'save:residual_bf16', which keep only the block inputs as 'full' does, elsewhere (host memory,
    bfloat16: copies, no FLOPs). 'dots' keeps every matmul output and the attention
    (on the fused kernels, cuDNN and splash, their output and softmax statistics: remat.remat_policy);
    'dots_no_batch' / 'offload_dots' keep only dots without batch dimensions (the weight matmuls, LoRA
    included), so the attention is recomputed. Name-based policies are counted coarsely: the matmuls
    are recomputed unless all four named matmul outputs are kept, the attention unless 'attn' is; on
    'xla' keeping 'attn' keeps its output only, and the backward recomputes QK^T (half its forward)
    for the softmax probabilities; 'residual' among the names (the block inputs) changes nothing here."""
    remat_policy(policy)  # raises for an unknown policy
    if ":" in policy:  # save:<names> / offload:<names>: the named activations are kept, the rest recomputed
        kept = set(policy.partition(":")[2].split("+"))  # 'residual', 'residual_bf16': the block inputs, kept by all
        attn = 1.0 if "attn" not in kept else (0.5 if attention == "xla" else 0.0)
        return not {"qkv", "proj", "mlp_in", "mlp_out"} <= kept, attn
    if policy in ("none", "dots"):
        return False, 0.0
    if policy == "full":
        return True, 1.0
    return False, 1.0  # dots_no_batch, offload_dots


def flop_breakdown(cfg: DiTConfig, frames: int, height: int, width: int, remat: str | None = None,
                   targets=None, text_tokens: int = TEXT_TOKENS, batch: int = 1, as_xla_counts: bool = False) -> dict:
    """FLOPs of one train step, by part. Counts matmuls (2 m k n each) and attention, nothing else
    (norms, RoPE, softmax, loss and AdamW are elementwise, < 1 % at the real size).

    Per sample, N visual tokens (`visual_tokens`), L text tokens, S = N + L, widths D = heads x head_dim
    and Dt = text_width, MLP inner F = mlp_inner(D), Ft = mlp_inner(Dt), d(m, k, n) = 2 m k n:

      block forward  Fb = d(N,D,3D) + d(L,Dt,3D)                      qkv_x, qkv_y
                        + 4 S^2 D                                     QK^T and PV, all S queries and keys
                        + d(N,D,D) + d(L,D,Dt)                        proj_x, proj_y   (no proj_y in the last block)
                        + d(N,D,2F) + d(N,F,D) + d(L,Dt,2Ft) + d(L,Ft,Dt)   SwiGLU MLPs (no mlp_y in the last)
                        + d(1,D,4D) + d(1,D,4Dt)                      modulation (last block: d(1,D,Dt))
                        + sum over LoRA layers of d(M,in,r) + d(M,r,out)
      block backward Bb = input gradients of every frozen matmul but the modulation (whose input, c, does
                          not depend on the LoRA): the same FLOPs as their forward; no weight gradients
                        + attention: 2 x its forward (dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q)
                        + LoRA: 2 x its forward (dh, db, da, dx)
      recompute      Rb = Fb under 'full' and 'offload:residual' ('full' with the block inputs in host memory;
                          also 'offload:residual_bf16'); the attention's 4 S^2 D under 'dots_no_batch' / 'offload_dots';
                          0 under 'none' and 'dots'; the matmuls but not the attention under 'save:attn'
                          (`_recompute_share`; `cfg.remat_groups` or a groups string: a policy per stacked block)
      outside blocks E = forward of the embedders (x_embedder, t5_yproj, timestep MLP, caption pool) and
                          the final layer, + the final linear's input gradient

      total = batch x (sum over the `depth` blocks of Fb + Bb + Rb  +  E)

    Input gradients are counted in the first block too: the scanned blocks share one backward body,
    so XLA computes them there as well. With unrolled blocks (cfg.scan_layers=False) block 0's qkv_x and
    qkv_y input gradients (frozen and LoRA) are not computed (nothing before them depends on the LoRA),
    and the count leaves them out.
    cuDNN's flash-attention backward also recomputes QK^T (another 2 S^2 D per block); that is
    hardware work, not model work, and is reported apart as 'flash_bwd_recompute', outside 'total'.

    as_xla_counts=True gives what XLA's HloCostAnalysis (`compiled.cost_analysis()['flops']`) reports
    for the compiled scanned step instead: a while loop's body is counted once whatever its trip
    count, so each lax.scan (one per remat group) contributes one block, and cuDNN attention, a
    custom call, counts 0. XLA adds the elementwise FLOPs this model leaves out.
    """
    targets = tuple(targets_from_config(REFERENCE_TARGETS) if targets is None else targets)
    remat = cfg.remat if remat is None else remat
    n, l = visual_tokens(cfg, frames, height, width), text_tokens
    s, d, dt = n + l, cfg.width, cfg.text_width
    f, ft = cfg.mlp_inner(d), cfg.mlp_inner(dt)

    def lora(path: str, m: int, k: int, out: int) -> int:
        t: LoraTarget | None = find_target(targets, path)
        return 0 if t is None or t.rank <= 0 else _dense(m, k, t.rank) + _dense(m, t.rank, out)

    def block(prefix: str, last: bool) -> dict:
        frozen = (_dense(n, d, 3 * d) + _dense(l, dt, 3 * d) + _dense(n, d, d) + _dense(n, d, 2 * f)
                  + _dense(n, f, d))
        lo = (lora(f"{prefix}/attn/qkv_x", n, d, 3 * d) + lora(f"{prefix}/attn/qkv_y", l, dt, 3 * d)
              + lora(f"{prefix}/attn/proj_x", n, d, d))
        if last:
            mod = _dense(1, d, 4 * d) + _dense(1, d, dt)
        else:
            frozen += _dense(l, d, dt) + _dense(l, dt, 2 * ft) + _dense(l, ft, dt)
            lo += lora(f"{prefix}/attn/proj_y", l, d, dt)
            mod = _dense(1, d, 4 * d) + _dense(1, d, 4 * dt)
        attn = 0 if as_xla_counts and cfg.attention == "cudnn" else 4 * s * s * d
        return dict(forward=frozen + attn + lo + mod, backward=frozen + 2 * attn + 2 * lo,
                    attention=4 * s * s * d, matmul_fwd=frozen + lo + mod, attn_counted=attn)

    def recompute(b: dict, policy: str) -> int:
        mm, at = _recompute_share(policy, cfg.attention)
        return (b["matmul_fwd"] if mm else 0) + int(at * b["attn_counted"])

    n_sym = cfg.depth - 1
    # a groups string ("dots:16,full:31") sets the stacked blocks' policies; the last block keeps cfg.remat
    spec = remat if is_remat_groups(remat) else (cfg.remat_groups if remat == cfg.remat else "")
    groups = parse_remat_groups(spec, n_sym) if spec else [(remat, n_sym)]
    if as_xla_counts:  # one scan per group, each body counted once
        groups = [(p, 1) for p, _ in groups]
    last_policy = cfg.remat if spec else remat
    sym, last = block("blocks", False), block("last_block", True)
    t5 = cfg.t5_dim
    embed = (_dense(n, cfg.in_channels * cfg.patch_size ** 2, d) + _dense(l, t5, dt)
             + _dense(1, cfg.time_embed_dim, d) + _dense(1, d, d)
             + _dense(l + 1, t5, 2 * t5) + _dense(1, t5, t5) + 4 * (l + 1) * t5 + _dense(1, t5, d))
    final_out = cfg.patch_size ** 2 * cfg.in_channels
    final = _dense(1, d, 2 * d) + _dense(n, d, final_out)
    n_counted = sum(c for _, c in groups)
    skipped = 0  # block 0's qkv input gradients, which an unrolled model does not compute
    if not cfg.scan_layers and not as_xla_counts:
        skipped = _dense(n, d, 3 * d) + _dense(l, dt, 3 * d)
        for path, m, k in (("blocks_0/attn/qkv_x", n, d), ("blocks_0/attn/qkv_y", l, dt)):
            t = find_target(targets, path)
            skipped += _dense(m, k, t.rank) if t is not None and t.rank > 0 else 0
    out = dict(
        forward=n_counted * sym["forward"] + last["forward"] + embed + final,
        backward=n_counted * sym["backward"] + last["backward"] + _dense(n, final_out, d) - skipped,
        recompute=sum(c * recompute(sym, p) for p, c in groups) + recompute(last, last_policy),
    )
    out = {k: batch * v for k, v in out.items()}
    out["attention_forward"] = batch * (n_counted * sym["attention"] + last["attention"])
    out["flash_bwd_recompute"] = out["attention_forward"] // 2 if cfg.attention == "cudnn" else 0
    out["total"] = out["forward"] + out["backward"] + out["recompute"]
    out.update(visual_tokens=n, text_tokens=l, batch=batch, remat=remat)
    return out


def flops_per_step(cfg: DiTConfig, frames: int, height: int, width: int, remat: str | None = None,
                   targets=None, text_tokens: int = TEXT_TOKENS, batch: int = 1) -> int:
    """Matmul + attention FLOPs of one LoRA train step: forward, backward (input gradients of the frozen
    matmuls, no weight gradients; LoRA gradients) and remat recompute. See `flop_breakdown`."""
    return flop_breakdown(cfg, frames, height, width, remat, targets, text_tokens, batch)["total"]


def sampler_flops(cfg: DiTConfig, frames: int, height: int, width: int, steps: int = 64, guided: bool = True,
                  text_tokens: int = TEXT_TOKENS) -> int:
    """Matmul + attention FLOPs of rendering one video without LoRA: `steps` DiT forwards (`flop_breakdown`'s
    forward), two per step with classifier-free guidance. The VAE decode is not counted."""
    fwd = flop_breakdown(cfg, frames, height, width, remat="none", targets=(), text_tokens=text_tokens)["forward"]
    return steps * (2 if guided else 1) * fwd
