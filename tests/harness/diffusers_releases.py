"""Does every diffusers release with Mochi LoRAs apply our diffusers export exactly? Run by hand
(CI installs one diffusers); docs/loras.md quotes its table.

    PYTHONPATH=. python tests/harness/diffusers_releases.py /tmp/d032/bin/python /tmp/d035/bin/python ...

Each argument is a Python with one diffusers release (and torch==2.13.0, peft, safetensors), e.g.
`python3 -m venv /tmp/d032 && /tmp/d032/bin/pip install diffusers==0.32.0 torch==2.13.0
'huggingface_hub<1.0' 'peft<0.15' safetensors numpy`; this Python (with its own diffusers) is
always checked too. Into a temporary folder go a tiny random MochiTransformer3DModel (3 heads x 8,
4 blocks), its inputs and two random LoRAs on attention, MLP and modulation layers, alphas folded:
`mixed` with ranks 1 to 4, `one_odd` with rank 4 everywhere but rank 1 on the last block's
norm1_context.linear_1 (diffusers 0.32 to 0.34 rescale when several modules differ from the most
common rank, not when one does). Each is written twice:

    ours       mochi_jax's save_diffusers: every adapter zero-padded to one rank
    per_rank   each adapter at its own rank (what save_diffusers wrote before the padding)

Then every Python runs diffusers_release_check.py on them: diffusers' own Mochi LoRA loader
against the exact W + lora_B @ lora_A, as |loader - exact| / |exact - base| of the model output.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from dit_ref import make_reference, our_config, random_inputs
from mochi_jax.checkpoints import lora_format, lora_write
from mochi_jax.models.lora import LoraTarget

HERE = Path(__file__).resolve().parent
# layer -> (rank, alpha); mod_y of the last block separately
MIXED = {"attn/qkv_x": (4, 6.0), "attn/qkv_y": (4, 2.0), "attn/proj_x": (2, 1.5), "attn/proj_y": (2, 4.0),
         "mlp_x/w1": (3, 3.0), "mlp_y/w2": (1, 2.0), "mod_x": (2, 1.0), "last_block/mod_y": (1, 5.0)}
ONE_ODD = {"attn/qkv_x": (4, 6.0), "attn/proj_x": (4, 1.5), "mlp_x/w1": (4, 3.0), "last_block/mod_y": (1, 5.0)}


def random_lora(cfg, spec, seed=0):
    """(tree, targets): random factors for every `spec` layer of every block (last_block/... only there)."""
    rng = np.random.default_rng(seed)
    tree, targets = {}, []

    def add(group, layer, rank, alpha, n, last):
        d_in, d_out = lora_format.layer_dims(layer, cfg.width, cfg.text_width, last)
        lead = (n,) if n else ()
        node = tree.setdefault(group, {})
        for part in layer.split("/"):
            node = node.setdefault(part, {})
        node["a"] = (rng.standard_normal(lead + (d_in, rank)) / d_in ** 0.5).astype(np.float32)
        node["b"] = (0.5 * rng.standard_normal(lead + (rank, d_out))).astype(np.float32)
        targets.append(LoraTarget(f"^{group}/{layer}$", rank, alpha))

    for layer, (rank, alpha) in spec.items():
        if layer.startswith("last_block/"):
            add("last_block", layer.split("/", 1)[1], rank, alpha, 0, True)
            continue
        add("blocks", layer, rank, alpha, cfg.depth - 1, False)
        if lora_format.LAYERS[layer][1]:
            add("last_block", layer, rank, alpha, 0, True)
    return tree, tuple(targets)


def per_rank(padded: Path, out: Path) -> Path:
    """The padded file with every adapter cut back to its own rank (its non-zero rows of lora_A)."""
    sd = load_file(str(padded))
    cut = {}
    for k, a in sd.items():
        if k.endswith(".lora_A.weight"):
            b = sd[k.replace(".lora_A.", ".lora_B.")]
            keep = np.any(a != 0, axis=1) & np.any(b != 0, axis=0)
            cut[k], cut[k.replace(".lora_A.", ".lora_B.")] = a[keep], b[:, keep]
    save_file(cut, str(out), metadata={"format": "pt"})
    return out


def main(pythons: list[str]) -> list[dict]:
    cfg = our_config("h3d8")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = make_reference(cfg, seed=11)
        save_file({k: v.contiguous().numpy() for k, v in model.state_dict().items()}, str(folder / "base.safetensors"))
        (folder / "model.json").write_text(json.dumps(dict(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            num_layers=cfg.depth, pooled_projection_dim=cfg.text_width, in_channels=cfg.in_channels,
            text_embed_dim=cfg.t5_dim, time_embed_dim=cfg.time_embed_dim)))
        latents, feats, mask, timestep = random_inputs(cfg, seed=4)
        save_file({"latents": latents, "feats": feats, "mask": mask, "timestep": timestep},
                  str(folder / "inputs.safetensors"))
        for name, spec in (("mixed", MIXED), ("one_odd", ONE_ODD)):
            tree, targets = random_lora(cfg, spec)
            ours = lora_write.save_diffusers(folder / f"lora_{name}_ours.safetensors", tree, targets)
            per_rank(ours, folder / f"lora_{name}_per_rank.safetensors")
        results = []
        for python in [sys.executable] + pythons:
            run = subprocess.run([python, str(HERE / "diffusers_release_check.py"), str(folder)],
                                 capture_output=True, text=True)
            if run.returncode:
                raise RuntimeError(f"{python} failed:\n{run.stderr[-3000:]}")
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"{'diffusers':>10} {'peft':>7}  {'file':17} {'ranks':12} {'adapters':>8}  |loader - exact| / |LoRA effect|")
    for r in sorted(results, key=lambda r: [int(x) for x in r["diffusers"].split(".")[:3]]):
        for name, f in r["files"].items():
            print(f"{r['diffusers']:>10} {r['peft']:>7}  {name[5:]:17} {str(f['ranks']):12} {f['adapters']:8d}  "
                  f"{f['wrong_share']:.2e}" + (f"  ({len(f['warnings'])} warnings)" if f["warnings"] else ""))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
