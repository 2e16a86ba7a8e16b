"""Activation checkpointing (remat) of the DiT's blocks, all of it in one place.

    policies  `remat_policy(name)`: a named jax.checkpoint policy ('none', 'full', 'dots',
              'dots_no_batch', 'offload_dots', 'save:<names>', 'offload:<names>'); `remat(cls, name)`
              wraps a Linen module in it
    inputs    'offload:residual' keeps every block's inputs (the residual streams x and y entering it,
              what even 'full' keeps for the backward pass) in pinned host memory; 'offload:residual_bf16'
              / 'save:residual_bf16' keep them in bfloat16 (`residual_store`, `store_inputs`)
    groups    'dots:16,full:31': a policy per consecutive group of the stacked blocks
              (`is_remat_groups`, `parse_remat_groups`; models/dit.py scans each group)
    auto      `ladder(n, attention)`: the settings from the least recomputation to the most, then the
              ones that keep the block inputs off the device; `choose(n, memory_of, budget)`: the first
              that fits, by bisection over the compiled memory of a few of them (the fit check and the
              trainer give `memory_of`), past 'full' only when 'full' does not fit
    reruns    `attention_reruns(hlo)`: how many attention forwards the compiled backward pass reruns
              per block (0 when the policy keeps the attention)

The DiT's blocks name what a name-based policy can keep (CHECKPOINT_NAMES); a fused attention kernel
(cuDNN, splash) needs its output and softmax statistics in the backward pass, so every policy that
keeps the attention keeps those ('dots', or 'attn' among the names).

Block inputs. A rematerialised block's backward reruns its forward from what was kept, so every
policy but 'none' keeps the block's inputs: the scan over the blocks stacks them, [blocks, B, N, width]
float32 (47 x 44,520 tokens x 3072 x 4 bytes = 24 GiB at 163 frames, most of a 'full' step's
temporaries). The inputs of a checkpointed function are always its residuals, so no policy can move
them as such; the block therefore names a copy of them at its top, `checkpoint_name(x, 'residual')`
(models/dit.py Block), and everything after uses the copy. A policy that offloads 'residual' keeps
that copy in pinned host memory (jax stages a device_put to host after it and one back before the
backward), the backward's recomputation starts from it, and the input itself, used by nothing the
backward runs, drops out of the residuals: the scan stacks only the host copies (`f32<host>[n, B, N,
D]` in the jaxpr; buffers in XLA's host memory space, `S(5)`, in the compiled program).
'offload:residual' alone recomputes like 'full' with the inputs on the host; 'offload:residual+attn'
also keeps the attention (on the host); 'save:<names>' keeps names on the device and the inputs as
'full' does.

bfloat16 block inputs ('offload:residual_bf16', 'save:residual_bf16'). A policy can only keep values
the forward computes, and a forward on bfloat16 inputs would not be the model's. `store_inputs` is
a jax.custom_vjp around the block instead: its forward is the block's, exactly, and keeps only its
inputs, the visual stream's rounded to bfloat16 (the text stream's, under 0.3 % of the bytes at 163
frames, as they are), in host memory for 'offload:'; its backward reruns the block from those (like
'full') and takes the gradients there, so the loss is exact and the gradients carry the rounding
(relative L2 error 0.1-1 % on the tiny random test models: tests/test_remat_offload.py). models/dit.py
applies it to the stacked blocks (the scan of `_grouped_blocks`); where it cannot (the last block,
unrolled blocks) these settings keep float32 inputs like 'offload:residual' / 'save:residual'.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero, custom_vjp_primal_tree_values

GIB = 1 << 30

# ----------------------------------------------------------------------------- policies

POLICIES = {
    "none": None,  # no rematerialisation: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only block inputs
    "dots": jax.checkpoint_policies.dots_saveable,  # keep every matmul output, attention's included
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls only
    # weight-matmul outputs are saved in host memory (pinned) instead of the accelerator's, and
    # brought back for the backward pass: dots_no_batch's recompute savings at 'full''s device memory
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}

RESIDUAL_NAME = "residual"  # a copy of the block's inputs, the residual streams x and y (models/dit.py Block)
# what the DiT's blocks name (models/dit.py)
CHECKPOINT_NAMES = ("qkv", "attn", "proj", "mlp_in", "mlp_out", RESIDUAL_NAME)
# the block inputs kept in a lower precision by `store_inputs`: a name of their own, alone after save: / offload:
STORED_DTYPES = {"residual_bf16": "bfloat16"}
ATTENTION_NAME = "attn"  # the DiT's attention (`layers.attention(..., name=ATTENTION_NAME)`)

# jax's checkpoint-name primitive, which name-based policies are asked about
_NAME_PRIMITIVE = jax.make_jaxpr(lambda x: checkpoint_name(x, ATTENTION_NAME))(0.0).eqns[0].primitive


def kernel_residual_name(name: str) -> str:
    """The checkpoint name a fused attention kernel gives its residuals when the attention is `name`."""
    return f"{name}/kernel"


def _is_fused_attention_residual(prim, params) -> bool:
    """The residuals of a fused kernel's forward: splash's (named) or the outputs of cuDNN's forward
    (output and softmax statistics; jax's cuDNN attention names nothing, so its primitive is matched)."""
    if prim is _NAME_PRIMITIVE:
        return params.get("name") == kernel_residual_name(ATTENTION_NAME)
    return getattr(prim, "name", "").startswith("dot_product_attention_fwd")


def _with_fused_attention(policy, keep):
    """`policy`, with the fused attention kernels' residuals decided by keep(*avals) (what the
    policy does with the attention's output)."""
    def extended(prim, *args, **params):
        if _is_fused_attention_residual(prim, params):
            return keep(*args)
        return policy(prim, *args, **params)
    return extended


def _parse_named(name: str) -> tuple[str, tuple[str, ...]] | None:
    """('save' | 'offload', names) of a valid name-based setting, else None."""
    kind, _, names = name.partition(":")
    chosen = tuple(n for n in names.split("+") if n)
    if kind not in ("save", "offload") or not chosen:
        return None
    if set(chosen) <= set(CHECKPOINT_NAMES) or (len(chosen) == 1 and chosen[0] in STORED_DTYPES):
        return kind, chosen
    return None


def residual_store(name: str) -> tuple[str, bool] | None:
    """(dtype, in host memory) of the block inputs under a setting that keeps them in a lower precision
    ('offload:residual_bf16' -> ('bfloat16', True), 'save:residual_bf16' -> ('bfloat16', False); see
    `store_inputs`), None for every other policy (which keeps them as they are, in float32)."""
    parsed = _parse_named(name) if name not in POLICIES else None
    if parsed and parsed[1][0] in STORED_DTYPES:
        return STORED_DTYPES[parsed[1][0]], parsed[0] == "offload"
    return None


def remat_policy(name: str):
    """The jax.checkpoint policy of a remat setting: a key of POLICIES, or name-based 'save:<names>'
    (keep only these named activations, recompute the rest) or 'offload:<names>' (keep them in
    pinned host memory), <names> joined by '+' from CHECKPOINT_NAMES, e.g. 'save:qkv+proj' or
    'offload:residual' (the block inputs on the host, the rest recomputed: see the module docstring).

    Keeping the attention ('dots', or 'attn' among the names) keeps what its backward needs on every
    backend, so the backward pass never reruns the attention forward: on 'xla' its matmul outputs, on
    the fused kernels (cuDNN, splash) their output and softmax statistics.

    'save:residual_bf16' / 'offload:residual_bf16' are no policy of jax.checkpoint's but `store_inputs`
    (models/dit.py applies it to the stacked blocks, `residual_store`); their policy here is the float32
    one, 'save:residual' / 'offload:residual', for the blocks it does not reach."""
    if name in POLICIES:
        policy = POLICIES[name]
        return _with_fused_attention(policy, lambda *_: True) if name == "dots" else policy
    parsed = _parse_named(name)
    if parsed:
        kind, chosen = parsed
        chosen = tuple(RESIDUAL_NAME if n in STORED_DTYPES else n for n in chosen)
        if kind == "save":
            policy = jax.checkpoint_policies.save_only_these_names(*chosen)
        else:
            policy = jax.checkpoint_policies.save_and_offload_only_these_names(
                names_which_can_be_saved=(), names_which_can_be_offloaded=chosen, offload_src="device",
                offload_dst="pinned_host")
        return _with_fused_attention(policy, lambda *a: policy(_NAME_PRIMITIVE, *a, name=ATTENTION_NAME))
    raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(POLICIES)}, or save:<names> / "
                     f"offload:<names> with names joined by '+' from {CHECKPOINT_NAMES} (or one of "
                     f"{sorted(STORED_DTYPES)}, alone)")


def store_inputs(fn: Callable, dtype: str, host: bool, rounded=True) -> Callable:
    """fn(carry, *args) -> carry' (a scan body: the result has the carry's structure and dtypes) as a
    function that keeps for its backward pass only `carry`, its leaves under `rounded` (True, or a
    pytree of bools that is a prefix of the carry's) in `dtype`, in pinned host memory when `host`,
    and the args as they are (the scan's own: the stacked weights, the block's LoRA and index; nothing
    per block is copied). Forward: fn's, exactly. Backward: fn's vjp at the kept carry, recomputing
    fn's forward (like remat 'full'). Cotangents go to the carry and to the args the outer
    differentiation perturbs (the LoRA in training; the weights too when they are differentiated),
    none to the others: a jax.custom_vjp with symbolic zeros, which tells which are perturbed."""
    dt = jnp.dtype(dtype)

    def lower(a, r=True):
        return a.astype(dt) if r and jnp.issubdtype(a.dtype, jnp.floating) else a

    @jax.custom_vjp
    def stored(carry, *args):
        return fn(carry, *args)

    def fwd(carry, *args):
        carry_v, args_v = custom_vjp_primal_tree_values((carry, args))
        kept = jax.tree_util.tree_map(lambda r, c: jax.tree_util.tree_map(lambda a: lower(a, r), c), rounded, carry_v)
        if host:
            kept = jax.device_put(kept, jax.memory.Space.Host)
        # which args carry a cotangent: said by the residuals' structure (a dict key), not by a value
        marked = tuple({"diff" if any(leaf.perturbed for leaf in jax.tree_util.tree_leaves(arg)) else "frozen": v}
                       for arg, v in zip(args, args_v))
        return fn(carry_v, *args_v), (kept, marked)

    def bwd(res, ct):
        kept, marked = res
        if host:
            kept = jax.device_put(kept, jax.memory.Space.Device)
        ct = jax.tree_util.tree_map(lambda c: jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c, ct,
                                    is_leaf=lambda c: isinstance(c, SymbolicZero))
        carry = jax.tree_util.tree_map(lambda k, c: k.astype(c.dtype), kept, ct)
        values = [next(iter(m.values())) for m in marked]
        diff = [i for i, m in enumerate(marked) if "diff" in m]

        def of_diff(c, *d):
            a = list(values)
            for i, v in zip(diff, d):
                a[i] = v
            return fn(c, *a)

        _, vjp = jax.vjp(of_diff, carry, *(values[i] for i in diff))
        ct_carry, *ct_diff = vjp(ct)
        cts = [None] * len(values)
        for i, c in zip(diff, ct_diff):
            cts[i] = c
        return (ct_carry, *cts)

    stored.defvjp(fwd, bwd, symbolic_zeros=True)
    return stored


def remat(module_cls, policy: str, static_argnums=()):
    """Wrap a Linen module class in nn.remat under a named policy ('none' returns it as is)."""
    fn = remat_policy(policy)
    if policy == "none":
        return module_cls
    return nn.remat(module_cls, policy=fn, prevent_cse=False, static_argnums=static_argnums)


# ----------------------------------------------------------------------------- groups


def is_remat_groups(spec: str) -> bool:
    """Whether a remat setting is a groups string ('dots:16,full:31', each item policy:count) rather than
    one policy ('full', 'save:qkv+attn')."""
    items = [x.strip() for x in spec.split(",") if x.strip()]
    return bool(items) and all(x.rpartition(":")[2].isdigit() for x in items)


def parse_remat_groups(spec: str, n: int) -> list[tuple[str, int]]:
    """'dots:16,save:qkv+proj:31' -> [('dots', 16), ('save:qkv+proj', 31)], checked: known policies,
    counts sum to n."""
    groups = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        policy, _, count = item.rpartition(":")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"remat_groups {spec!r}: each group is policy:count (a policy of "
                             f"{sorted(POLICIES)} or save:<names> / offload:<names>), got {item!r}")
        remat_policy(policy)  # raises naming the choices
        groups.append((policy, int(count)))
    if sum(c for _, c in groups) != n:
        raise ValueError(f"remat_groups {spec!r}: counts sum to {sum(c for _, c in groups)}, the model has {n} "
                         f"stacked blocks")
    return groups


# ----------------------------------------------------------------------------- remat='auto'

# Each keeps less than the one before and recomputes more. With a fused attention kernel (cuDNN, splash)
# 'dots' keeps every weight matmul and the kernel's residuals, as much as 'dots_no_batch' and
# recomputing less; the next rung down, 'save:attn', recomputes the matmuls but not the attention.
# With 'xla' attention 'dots' also keeps the [heads, S, S] logits, so 'dots_no_batch' is the rung below.
# After 'full', which recomputes the most, the rungs recompute as much and keep less on the device:
# OFFLOAD_RUNGS, the block inputs in pinned host memory (copied there and back: transfers, no FLOPs),
# then in bfloat16 there too (half the host bytes and transfers; the gradients carry the rounding).
OFFLOAD_RUNGS = ("offload:residual", "offload:residual_bf16")
LADDERS = {"xla": ("none", "dots", "dots_no_batch", "full") + OFFLOAD_RUNGS,
           "fused": ("none", "dots", "save:attn", "full") + OFFLOAD_RUNGS}


def ladder(n: int, attention: str = "xla") -> list[tuple[str, str]]:
    """(remat, remat_groups) settings for n stacked blocks, from the least recomputation to the most,
    then from 'full' to the least device memory: all blocks at one policy of the attention's LADDERS,
    then the first k blocks at it and the rest at the next one for k = n-1 .. 1, then all at the next,
    and so on to 'full', then on through 'offload:residual' (every block's inputs in host memory) to
    'offload:residual_bf16' (in bfloat16 there)."""
    policies = LADDERS["xla" if attention == "xla" else "fused"]
    out = [(policies[0], "")]
    for p, q in zip(policies, policies[1:]):
        out += [("full", f"{p}:{k},{q}:{n - k}") for k in range(n - 1, 0, -1)] + [(q, "")]
    return out


@dataclasses.dataclass
class Choice:
    remat: str
    groups: str
    bytes: int  # compiled memory per device
    budget: int
    tried: list  # [(remat, groups, bytes)] in the order compiled

    def describe(self) -> str:
        setting = self.groups or self.remat
        return (f"{setting}: {self.bytes / GIB:.2f} GiB within the {self.budget / GIB:.2f} GiB budget "
                f"({len(self.tried)} settings compiled)")


def choose(n: int, memory_of: Callable[[str, str], int], budget: int, attention: str = "xla") -> Choice:
    """The setting of `ladder(n, attention)` with the least recomputation whose compiled memory per
    device (`memory_of(remat, groups)`, bytes) is within `budget` bytes, by bisection (memory falls
    along the ladder: each step keeps fewer activations on the device), so about log2(3n) compiles.

    The ladder up to 'full' first ('full' compiled first): while 'full' fits, nothing is offloaded.
    Past it, the block inputs go to host memory ('offload:residual', by groups of blocks, then all) and
    then to bfloat16 there ('offload:residual_bf16'): 'full''s recomputation, plus host transfers (and
    the rounding of the gradients' inputs), for less device memory; 'offload:residual_bf16' compiled
    next. A ValueError when even that does not fit."""
    settings, memo, tried = ladder(n, attention), {}, []

    def mem(i: int) -> int:
        if i not in memo:
            memo[i] = memory_of(*settings[i])
            tried.append((*settings[i], memo[i]))
        return memo[i]

    full, last = settings.index(("full", "")), len(settings) - 1
    lo, hi = 0, full
    if mem(full) > budget:
        if mem(last) > budget:
            raise ValueError(f"remat='auto': even remat 'full' needs {mem(full) / GIB:.2f} GiB per device, and with "
                             f"the block inputs in host memory in bfloat16 ({settings[last][0]!r}) "
                             f"{mem(last) / GIB:.2f} GiB, over the {budget / GIB:.2f} GiB budget (a smaller clip or "
                             "batch, more fsdp / sequence devices, or a larger model.memory_budget_gb)")
        lo, hi = full + 1, last
    while lo < hi:
        mid = (lo + hi) // 2
        if mem(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return Choice(*settings[lo], mem(lo), budget, tried)


# ----------------------------------------------------------------------------- what the compiled program does

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ", re.M)
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations|called_computations)="
                    r"(\{[^}]*\}|%[\w.\-]+)")
_BACKWARD_LOOP = re.compile(r"while\([^\n]*?body=%([\w.\-]+)[^\n]*op_name=\"[^\"]*transpose\(")
_ATTENTION_FORWARD = re.compile(r'%splash_mha_fwd[\w.]* = .*custom-call\(|custom_call_target="__cudnn\$fmha(?!\w*Backward)')


def _computations(hlo: str) -> dict:
    """{computation name: its text} of an HLO module's text."""
    starts = [(m.group(1), m.start()) for m in _COMPUTATION.finditer(hlo)]
    return {name: hlo[a:b] for (name, a), (_, b) in zip(starts, starts[1:] + [(None, len(hlo))])}


def attention_reruns(hlo: str) -> int:
    """How many attention forward kernels (cuDNN's or splash's) the bodies of the backward pass's layer
    loops hold (one loop per remat group, summed): the attention forwards remat recomputes per block.
    -1 when the program has no attention kernel or no backward loop. From the compiled module's text
    (`compiled.as_text()`)."""
    if not _ATTENTION_FORWARD.search(hlo):
        return -1
    comps = _computations(hlo)

    def called(name: str) -> set:
        return {c.strip().lstrip("%") for group in _CALLS.findall(comps.get(name, ""))
                for c in group.strip("{}").split(",") if c.strip()}

    bodies = _BACKWARD_LOOP.findall(hlo)
    if not bodies:
        return -1
    seen, count = set(), 0
    for body in bodies:
        todo = [body]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            count += len(_ATTENTION_FORWARD.findall(comps.get(name, "")))
            todo += called(name)
    return count
