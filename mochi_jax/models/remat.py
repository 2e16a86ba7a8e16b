"""Activation checkpointing (remat) of the DiT's blocks, all of it in one place.

    policies  `remat_policy(name)`: a named jax.checkpoint policy ('none', 'full', 'dots',
              'dots_no_batch', 'offload_dots', 'save:<names>', 'offload:<names>'); `remat(cls, name)`
              wraps a Linen module in it
    groups    'dots:16,full:31': a policy per consecutive group of the stacked blocks
              (`is_remat_groups`, `parse_remat_groups`; models/dit.py scans each group)
    auto      `ladder(n, attention)`: the settings from the least recomputation to the most;
              `choose(n, memory_of, budget)`: the first that fits, by bisection over the compiled
              memory of a few of them (the fit check and the trainer give `memory_of`)
    reruns    `attention_reruns(hlo)`: how many attention forwards the compiled backward pass reruns
              per block (0 when the policy keeps the attention)

The DiT's blocks name what a name-based policy can keep (CHECKPOINT_NAMES); a fused attention kernel
(cuDNN, splash) needs its output and softmax statistics in the backward pass, so every policy that
keeps the attention keeps those ('dots', or 'attn' among the names).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

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

CHECKPOINT_NAMES = ("qkv", "attn", "proj", "mlp_in", "mlp_out")  # what the DiT's blocks name (models/dit.py)
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


def remat_policy(name: str):
    """The jax.checkpoint policy of a remat setting: a key of POLICIES, or name-based 'save:<names>'
    (keep only these named activations, recompute the rest) or 'offload:<names>' (keep them in
    pinned host memory), <names> joined by '+' from CHECKPOINT_NAMES, e.g. 'save:qkv+proj'.

    Keeping the attention ('dots', or 'attn' among the names) keeps what its backward needs on every
    backend, so the backward pass never reruns the attention forward: on 'xla' its matmul outputs, on
    the fused kernels (cuDNN, splash) their output and softmax statistics."""
    if name in POLICIES:
        policy = POLICIES[name]
        return _with_fused_attention(policy, lambda *_: True) if name == "dots" else policy
    kind, _, names = name.partition(":")
    chosen = tuple(n for n in names.split("+") if n)
    if kind in ("save", "offload") and chosen and set(chosen) <= set(CHECKPOINT_NAMES):
        if kind == "save":
            policy = jax.checkpoint_policies.save_only_these_names(*chosen)
        else:
            policy = jax.checkpoint_policies.save_and_offload_only_these_names(
                names_which_can_be_saved=(), names_which_can_be_offloaded=chosen, offload_src="device",
                offload_dst="pinned_host")
        return _with_fused_attention(policy, lambda *a: policy(_NAME_PRIMITIVE, *a, name=ATTENTION_NAME))
    raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(POLICIES)}, or save:<names> / "
                     f"offload:<names> with names joined by '+' from {CHECKPOINT_NAMES}")


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
LADDERS = {"xla": ("none", "dots", "dots_no_batch", "full"), "fused": ("none", "dots", "save:attn", "full")}


def ladder(n: int, attention: str = "xla") -> list[tuple[str, str]]:
    """(remat, remat_groups) settings for n stacked blocks, from the least recomputation to the most:
    all blocks at one policy of the attention's LADDERS, then the first k blocks at it and the rest
    at the next one for k = n-1 .. 1, then all at the next, and so on to 'full'."""
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
    device (`memory_of(remat, groups)`, bytes) is within `budget` bytes, by bisection over the ladder
    (memory falls along it: each step keeps fewer activations), so about log2(3n) compiles. A
    ValueError when even 'full' does not fit."""
    settings, memo, tried = ladder(n, attention), {}, []

    def mem(i: int) -> int:
        if i not in memo:
            memo[i] = memory_of(*settings[i])
            tried.append((*settings[i], memo[i]))
        return memo[i]

    last = len(settings) - 1
    if mem(last) > budget:
        raise ValueError(f"remat='auto': even remat 'full' needs {mem(last) / GIB:.2f} GiB per device, over the "
                         f"{budget / GIB:.2f} GiB budget (a smaller clip or batch, more fsdp / sequence devices, or "
                         "a larger model.memory_budget_gb)")
    lo, hi = 0, last
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
