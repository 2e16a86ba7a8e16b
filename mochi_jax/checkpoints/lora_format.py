"""Mochi LoRA files: the layers of a block they can name and how each spelling names them, shared by
reading (lora_read.py) and writing (lora_write.py).

Any Dense of a block can be named: attn qkv/proj, mlp_{x,y}.w{1,2} (diffusers `ff.net.0.proj`,
`ff.net.2`, `ff_context.*`; w1's output halves are swapped there), mod_{x,y} (`norm1.linear`,
`norm1_context.linear`, `.linear_1` in the last block). genmo / ComfyUI spell a layer
`blocks.N.attn.qkv_x`, kohya `lora_unet_blocks_N_attn_qkv_x`, diffusers
`transformer_blocks.N.attn1.to_q` (+ to_k, to_v: the fused projections come in thirds).
"""

from __future__ import annotations

import numpy as np

from mochi_jax.models.dit import DiTConfig


class LoraFormatError(ValueError):
    """A LoRA file (or tree) cannot be read or written; the message names the file and keys."""


# Layers of one block a LoRA file can name: our path inside the block -> (diffusers modules
# (q/k/v thirds for the fused projections), exists in the last block, diffusers swaps the halves).
LAYERS = {
    "attn/qkv_x": (("attn1.to_q", "attn1.to_k", "attn1.to_v"), True, False),
    "attn/qkv_y": (("attn1.add_q_proj", "attn1.add_k_proj", "attn1.add_v_proj"), True, False),
    "attn/proj_x": (("attn1.to_out.0",), True, False),
    "attn/proj_y": (("attn1.to_add_out",), False, False),
    "mlp_x/w1": (("ff.net.0.proj",), True, True),
    "mlp_x/w2": (("ff.net.2",), True, False),
    "mlp_y/w1": (("ff_context.net.0.proj",), False, True),
    "mlp_y/w2": (("ff_context.net.2",), False, False),
    "mod_x": (("norm1.linear",), True, False),
    "mod_y": (("norm1_context.linear",), True, False),
}
GENMO = {layer.replace("/", "."): layer for layer in LAYERS}
KOHYA = {layer.replace("/", "_"): layer for layer in LAYERS}
DIFFUSERS = {m: (layer, i, len(ms)) for layer, (ms, _, _) in LAYERS.items() for i, m in enumerate(ms)}
DIFFUSERS["norm1_context.linear_1"] = ("mod_y", 0, 1)
# genmo's kwargs metadata: its rank/alpha/dropout group per layer
KWARGS_GROUP = {"attn/qkv_x": "qkv_proj", "attn/qkv_y": "qkv_proj", "attn/proj_x": "out_proj",
                "attn/proj_y": "out_proj"}


def layer_dims(layer: str, width: int, text_width: int, last: bool) -> tuple[int, int]:
    """(in, out) of a block Dense."""
    w, t = width, text_width
    iw, it = DiTConfig.mlp_inner(w), DiTConfig.mlp_inner(t)
    return {"attn/qkv_x": (w, 3 * w), "attn/qkv_y": (t, 3 * w), "attn/proj_x": (w, w), "attn/proj_y": (w, t),
            "mlp_x/w1": (w, 2 * iw), "mlp_x/w2": (iw, w), "mlp_y/w1": (t, 2 * it), "mlp_y/w2": (it, t),
            "mod_x": (w, 4 * w), "mod_y": (w, t if last else 4 * t)}[layer]


def text_width_shown(layer: str, d_in: int, d_out: int, last: bool) -> int | None:
    """The model's text stream width that an adapter of `layer` with (in, out) shows (out: of one
    q/k/v third where the file splits it), None for a layer of the visual stream alone."""
    if layer in ("attn/qkv_y", "mlp_y/w1"):
        return d_in
    if layer in ("attn/proj_y", "mlp_y/w2"):
        return d_out
    if layer == "mod_y":  # the last block's mod_y makes only the text stream's attention scale
        return d_out if last else d_out // 4
    return None


def diffusers_modules(layer: str, last: bool) -> tuple[str, ...]:
    """The diffusers modules of `layer` in a block (the last block's mod_y is `norm1_context.linear_1`)."""
    return ("norm1_context.linear_1",) if (last and layer == "mod_y") else LAYERS[layer][0]


def swap_halves(b: np.ndarray) -> np.ndarray:
    """Swap the two halves of the output (last) axis."""
    h = b.shape[-1] // 2
    return np.concatenate([b[..., h:], b[..., :h]], axis=-1)

