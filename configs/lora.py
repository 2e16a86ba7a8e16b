"""LoRA fine-tuning: `python -m mochi_jax.train --config=configs/lora.py[:preset]`.

Presets:
  default  the official fine-tuner's settings (lora.yaml) for the full model: rank 16 / alpha 16
           on qkv_x, qkv_y, proj_x, proj_y; AdamW lr 2e-4, weight decay 0.01; 200 warmup steps then
           cosine to zero at step 2000; batch 1; caption dropout 0.1; checkpoint and sample every
           200 steps; sampling 64 steps, cfg 6.0, seed 12345, 37 frames at 480x848.
  demo     a tiny random model and synthetic clips made on the fly (no download): a few minutes
           on 2 CPU cores, leaving a checkpoint, metrics, a LoRA file and a sample video.
  sweep_demo  the demo as a search: three LoRAs (ranks 2 and 4, two learning rates) trained together.
  search   the usual search for a Mochi LoRA in one run: ranks 4 and 8 (alpha = rank) x lr 1e-4, 3e-5,
           1e-5, six LoRAs on the one frozen base; otherwise `default`.
Any field is overridable: --config.optim.lr=5e-5 --config.steps=500 --config.run_dir=runs/mine.
"""

import ml_collections

from mochi_jax.configs import aot as aot_config
from mochi_jax.configs import common
from mochi_jax.configs import prepare as prepare_config
from mochi_jax.models.lora import REFERENCE_TARGETS


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    if arg not in ("default", "demo", "sweep_demo", "search"):
        raise ValueError(f"unknown preset {arg!r}; choose 'default', 'demo', 'sweep_demo' or 'search'")
    c = ml_collections.ConfigDict()
    c.run_dir = "runs/lora"
    c.cache = "cache"  # made by `python -m mochi_jax.prepare`
    # Several caches trained together ({} = `cache` alone, as before): {name: {"cache": path, "repeats": n,
    # "holdout": k}}. Each clip of a dataset is drawn `repeats` times per epoch (default 1), so the datasets
    # are drawn in proportion to clips x repeats; the last `holdout` clips of each (default
    # validation.holdout) are held out for validation. In a config file: c.datasets = {"clips": {"cache":
    # "cache"}, "style": {"cache": "style_cache", "repeats": 3}}; on the command line the whole dict as a
    # Python literal: --config.datasets='{"clips": {"cache": "cache"}, "style": {"cache": "s", "repeats": 3}}'
    c.datasets = ml_collections.FieldReference({}, field_type=object)
    c.seed = 12345
    c.steps = 2000
    c.batch_size = 1  # per step, over all devices and processes
    c.resume = True  # continue from the latest checkpoint in run_dir/checkpoints
    c.log_every = 10
    # Device mesh (see mochi_jax/models/sharding.py): sizes of the data / fsdp / sequence / tensor axes, one
    # of them -1 for "the rest". The batch is split over data x fsdp; frozen weights, LoRA factors
    # and optimizer state over fsdp; visual tokens over sequence; heads and MLP columns over tensor.
    c.mesh = common.mesh(data=-1)
    c.distributed = common.distributed()  # several hosts: one process each (configs/common.py)

    # The converted checkpoints (configs/common.py; the VAE, T5 and tokenizer serve validation) and
    # activation checkpointing of the DiT's blocks.
    c.model = common.model()
    # none | full | dots | dots_no_batch | offload_dots | save:<names> | offload:<names> | auto (the least
    # recomputation whose compiled memory fits memory_budget_gb; mochi_jax/models/remat.py). Long clips on small
    # cards: offload:residual keeps the blocks' inputs for the backward pass in pinned host memory (as 'full'
    # otherwise), offload:residual_bf16 there rounded to bfloat16
    c.model.remat = "full"
    c.model.memory_budget_gb = 0.0  # remat='auto': GiB (2**30 bytes) per device; 0 = what the device reports it can hold
    c.model.remat_groups = ""  # a policy per consecutive block group, e.g. "dots:16,full:31"; '' = `remat` everywhere
    # LoRA targets: {name: {pattern (regex on module paths), rank, alpha, dropout}}; rank 0 disables one.
    c.lora = ml_collections.ConfigDict({k: dict(v) for k, v in REFERENCE_TARGETS.items()})
    # Start from a LoRA instead of fresh factors (musubi-tuner's --network_weights): a LoRA .safetensors file
    # (genmo / ComfyUI, kohya or diffusers layout) or a training run directory (its newest checkpoint, or
    # <run>/checkpoints/<step>). Its layers and ranks must be those of `lora`. Read by a fresh run only: a
    # resumed one continues from its checkpoint. The optimizer state starts fresh. '' = fresh factors.
    c.init_lora = ""

    c.loss = ml_collections.ConfigDict(dict(
        # 'normalized': z is normalised to the DiT's latent space before noising (consistent with
        # sampling). 'reference': the official script's exact formula (noise the raw VAE latents,
        # normalise only the target). See docs/training.md, "The step and the objective".
        formulation="normalized",
        caption_dropout=0.1,  # probability of zeroing a caption's T5 features and mask
        # the noise levels trained: 'uniform' (the official fine-tuner's), 'logit_normal' (sigmoid of a
        # normal: logit_mean, logit_std) or 'shifted' (uniform, then shift u / (1 + (shift - 1) u))
        sigma_sampling="uniform",
        logit_mean=0.0,  # sigma_sampling='logit_normal'
        logit_std=1.0,  # sigma_sampling='logit_normal'
        sigma_shift=3.0,  # sigma_sampling='shifted': > 1 trains more at high noise
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=2e-4, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
        warmup_steps=200,  # linear from 0
        schedule="cosine",  # 'cosine' (to zero at `decay_steps`) or 'constant' after warmup
        decay_steps=2000,  # cosine horizon, counted from step 0 (warmup included)
        grad_clip=0.0,  # global-norm clipping; 0 = none (the reference does not clip)
        grad_accum=1,  # micro-batches per optimizer update
    ))
    # every `every` steps: a checkpoint (the last `keep` kept) and its LoRA file pair in run_dir/loras/
    # (the last `keep_loras` kept; 0 = all)
    c.checkpoint = ml_collections.ConfigDict(dict(every=200, keep=3, keep_loras=0))
    c.max_bad_steps = 10  # consecutive non-finite losses before the run stops

    c.validation = ml_collections.ConfigDict(dict(
        every=200,  # steps between validation videos (and at the end); 0 = never
        # each a prompt, or a dict setting any of num_frames, height, width and seed for that video alone
        # (the rest from `sampling` and `seed`), e.g. {"prompt": "a dog", "num_frames": 61, "height": 848,
        # "width": 480}; videos of one shape are rendered together (each shape compiles its own sampler)
        prompts=["A close-up video of a cat playing a piano, cinematic lighting."],
        seed=12345,  # the noise of video i: seed + i (unless its entry sets `seed`)
        sampling=common.sampling(),
        # held-out clips (the last ones of the cache, by name; whole sources, so frame windows of one video
        # never fall on both sides) and the sigmas of the validation loss
        holdout=0,
        loss_sigmas=[0.1, 0.3, 0.5, 0.7, 0.9],
        # CLIP-T and temporal consistency of the validation videos (see mochi_jax/lib/metrics.py) when
        # clip.checkpoint is set
        clip=common.clip(checkpoint="", tokenizer=""),
    ))
    # Weights & Biases (pip install -e '.[wandb]'): the scalars of metrics.jsonl at their step, the validation
    # videos and this config sent to a wandb run too (process 0; metrics.jsonl and tensorboard/ are written
    # either way). The run's wandb id is kept in run_dir/wandb_id: a resumed run continues the same wandb run.
    c.wandb = ml_collections.ConfigDict(dict(
        enabled=False,  # True: log to wandb as well
        project="mochi_jax",  # the wandb project
        entity="",  # the wandb team or user; '' = your default entity
        name="",  # the wandb run's display name; '' = the run directory's name
        mode="",  # online | offline (no network; `wandb sync` uploads it later) | disabled; '' = WANDB_MODE or online
        tags=[],  # the wandb run's tags, e.g. ["rank8", "style"]
        dir="",  # where wandb keeps its files (a wandb/ folder inside); '' = WANDB_DIR when set, else run_dir
    ))
    # Several LoRAs trained together on the one frozen base (docs/search.md); each
    # variant is this config with its own `lora`, `optim` and `seed` (mochi_jax/checkpoints/runs.py
    # `sweep_variants`). Either a grid,
    # every combination of the non-empty lists:
    #   rank  "4,8": every LoRA target of rank > 0 at each rank, alpha scaled with it (alpha / rank kept)
    #   lr    "1e-4,3e-5,1e-5": optim.lr
    # or explicit variants in a config file, {name: nested overrides}, e.g.
    #   c.sweep.variants = {"qkv8": {"lora": {"out": {"rank": 0}, "qkv": {"rank": 8, "alpha": 8.0}},
    #                                "optim": {"lr": 1e-4}, "seed": 7}}
    # Empty: one LoRA, as without this block.
    c.sweep = ml_collections.ConfigDict(dict(rank="", lr="", variants={}))
    c.aot = aot_config.section()  # python -m mochi_jax.aot: the fit check (configs/aot.py)
    if arg == "search":  # alpha / rank is kept by the grid: alpha 16 at rank 16 becomes alpha = rank
        c.sweep.rank, c.sweep.lr = "4,8", "1e-4,3e-5,1e-5"
        c.run_dir = "runs/search"
    if arg == "sweep_demo":
        c = demo(c)
        c.run_dir = f"{common.DEMO_ROOT}/sweep"
        c.sweep.variants = {"r2": {"lora": {"qkv": {"rank": 2, "alpha": 2.0}, "out": {"rank": 2, "alpha": 2.0}}},
                            "r4": {}, "r4_lr1e-3": {"optim": {"lr": 1e-3}}}
        return c
    return demo(c) if arg == "demo" else c


def demo(c: ml_collections.ConfigDict, root: str = common.DEMO_ROOT) -> ml_collections.ConfigDict:
    """The demo preset, everything under `root`: tiny random models and synthetic clips, prepared
    on first use (c.demo), then a short training run with validation videos."""
    prepare = prepare_config.get_config("demo")
    del prepare.demo
    prepare.update(dict(input_dir=f"{root}/clips", output_dir=f"{root}/cache", vae=f"{root}/models/vae",
                        t5=f"{root}/models/t5", tokenizer=f"{root}/models/tokenizer"))
    c.demo = common.demo(root, clips=4, prepare=prepare)
    c.run_dir = f"{root}/run"
    c.cache = prepare.output_dir
    common.demo_model(c.model, root)
    c.model.remat = "none"
    c.steps = 120
    c.log_every = 10
    c.lora.qkv.rank = c.lora.out.rank = 4
    c.lora.qkv.alpha = c.lora.out.alpha = 4.0
    c.loss.caption_dropout = 0.0
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.decay_steps = 120
    c.checkpoint.every = 40
    c.validation.every = 120
    c.validation.prompts = ["a red ball bounces across a white floor"]
    common.demo_sampling(c.validation.sampling)
    c.validation.holdout = 1
    return c
