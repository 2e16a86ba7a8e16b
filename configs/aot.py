"""The `aot` block of the training, sampling and prepare configs: what `python -m mochi_jax.aot`
compiles ahead of time on a CPU host, and for which hardware.

    python -m mochi_jax.aot --config=configs/lora.py --config.aot.target=v5e-16
    python -m mochi_jax.aot --config=configs/lora.py --config.aot.target=h100
    python -m mochi_jax.aot --config=configs/sample.py --config.aot.target=h100
    python -m mochi_jax.aot --config=configs/prepare.py --config.aot.target=h100 --config.aot.what=t5

Everything else (model, LoRA, optimizer, mesh, batch, attention, remat, dtypes) is the config's own,
so the program compiled is the one the command would run (attention 'auto': the target's kernel).
"""

import ml_collections


def section() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        # TPU slice ('v5e-16', 'v5p-8', 'v6e-8', 'v4-8', or a topology such as 'v5p:2x2x1') or NVIDIA
        # GPU ('h100', 'h200', 'a100-80gb', 'rtx4090'; '-N' for N of them, e.g. 'h100-8'); see mochi_jax/aot/targets.py
        target="",
        # 'train' (lora config), 'sample' (sample config; with the lora config: the validation renders),
        # 'vae_encode' or 't5' (prepare config); '' = the config's own command
        what="",
        # the DiT / VAE / T5 shapes: '' = the converted checkpoint's metadata when the config's path holds
        # one, else the released model; or a configs/dit.py preset ('mochi', 'small', 'tiny'), or a path
        model="",
        # the clip (pixels); 0 = the config's own (prepare: num_frames and its largest bucket; lora: the
        # prepare defaults, i.e. what `mochi_jax.prepare` caches; sample: num_frames, height, width)
        num_frames=0, height=0, width=0,
        text_tokens=256,  # T5 tokens of a caption (the cache's and the sampler's length)
        gpus_per_host=8,  # GPU targets with more GPUs than this span several hosts
        gpu_memory_fraction=0.75,  # of a GPU's memory JAX's allocator takes (XLA_CLIENT_MEM_FRACTION; 0.75 by default)
        memory_gib=0.0,  # > 0: the memory per device to check against instead of the target's
        target_config="",  # a GpuTargetConfigProto text file for another NVIDIA GPU (target 'gpu' or 'gpu-N')
        json="",  # also write the report here
        # a program that does not fit: also compile the settings that need less memory (remat full, an int8
        # base, blocks in host memory; each on top of the one before) until one fits, and name it
        suggest=True,
    ))
