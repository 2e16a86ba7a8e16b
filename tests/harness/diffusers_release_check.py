"""One diffusers release against LoRA files: run by diffusers_releases.py in a Python environment
that has that release (torch, diffusers, peft, safetensors; no mochi_jax, no JAX).

    python diffusers_release_check.py FOLDER

FOLDER holds model.json (MochiTransformer3DModel arguments), base.safetensors (its weights),
inputs.safetensors and lora_*.safetensors. For each LoRA file the model is run three ways: the
base; the exact meaning of a diffusers LoRA without alphas (every module's weight plus
lora_B @ lora_A); and the model after diffusers' own Mochi LoRA loader
(Mochi1LoraLoaderMixin.lora_state_dict + load_lora_into_transformer). Prints one JSON line:
per file the ranks it holds, the loader's error relative to the LoRA's effect,
|loader - exact| / |exact - base|, and the warnings diffusers logged while loading.
"""

import json
import logging
import sys
from importlib import metadata
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import MochiTransformer3DModel
from diffusers.loaders.lora_pipeline import Mochi1LoraLoaderMixin
from safetensors.torch import load_file


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main(folder: Path) -> dict:
    config = json.loads((folder / "model.json").read_text())
    base = load_file(str(folder / "base.safetensors"))
    x = load_file(str(folder / "inputs.safetensors"))

    def model():
        m = MochiTransformer3DModel(**config)
        m.load_state_dict(base)
        return m.eval()

    def forward(m) -> np.ndarray:
        with torch.no_grad():
            out = m(hidden_states=x["latents"], encoder_hidden_states=x["feats"], timestep=x["timestep"],
                    encoder_attention_mask=x["mask"], return_dict=False)[0]
        return out.double().numpy()

    ref = forward(model())
    files = {}
    for f in sorted(folder.glob("lora_*.safetensors")):
        sd = load_file(str(f))
        exact_model = model()
        weights = dict(exact_model.named_parameters())
        with torch.no_grad():
            for k, a in sd.items():
                if k.endswith(".lora_A.weight"):
                    module = k[len("transformer."):-len(".lora_A.weight")]
                    weights[module + ".weight"] += sd[k.replace(".lora_A.", ".lora_B.")] @ a
        exact = forward(exact_model)

        m = model()
        caught = Warnings()
        logging.getLogger("diffusers").addHandler(caught)
        try:
            state = Mochi1LoraLoaderMixin.lora_state_dict(str(folder), weight_name=f.name)
            state = state[0] if isinstance(state, tuple) else state
            Mochi1LoraLoaderMixin.load_lora_into_transformer(state, transformer=m)
        finally:
            logging.getLogger("diffusers").removeHandler(caught)
        got = forward(m)
        files[f.stem] = {
            "ranks": sorted({int(v.shape[0]) for k, v in sd.items() if k.endswith(".lora_A.weight")}),
            "adapters": sum(k.endswith(".lora_A.weight") for k in sd),
            "wrong_share": float(np.linalg.norm(got - exact) / np.linalg.norm(exact - ref)),
            "warnings": caught.messages}
    return {"diffusers": diffusers.__version__, "peft": metadata.version("peft"), "torch": torch.__version__,
            "files": files}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
