"""Blocks shared by the command configs, defined once and nested the same way everywhere:

    model     the converted checkpoints and how they run   (lora.py `model`, sample.py, eval.py)
    mesh      how the devices are used                     (lora.py, sample.py, eval.py)
    distributed  joining the processes of several hosts    (lora.py, sample.py, eval.py)
    sampling  how a video is rendered                      (lora.py `validation.sampling`, sample.py, eval.py)
    clip      the converted CLIP that scores videos        (lora.py `validation.clip`, eval.py)
    demo      what the demo presets make on first use      (only in `:demo` presets; see mochi_jax/demo)

Config files import this module as `mochi_jax.configs.common`, so a config copied anywhere still finds it.
"""

import ml_collections

DEMO_ROOT = "runs/demo"
# the shapes of the demo's tiny random models (mochi_jax/demo writes them; the fit check's aot.model='demo')
DEMO_DIT = dict(depth=3, num_heads=2, head_dim=16, text_width=32, t5_dim=32, in_channels=12, patch_size=2,
                time_embed_dim=32)
DEMO_VAE = dict(encoder_channels=(32, 32, 64, 64), decoder_channels=(32, 64, 64, 64), layers_per_block=(1, 1, 1, 1, 1),
                encoder_attention=(False, False, False, False, True))
DEMO_T5 = dict(d_model=32, num_layers=2, num_heads=2, d_kv=16, d_ff=64, vocab_size=256)


def model(root: str = "ckpt") -> ml_collections.ConfigDict:
    """Converted checkpoints (tools/convert_weights.py) under `root`, dtypes and attention."""
    return ml_collections.ConfigDict(dict(
        dit=f"{root}/dit", vae=f"{root}/vae", t5=f"{root}/t5",
        tokenizer=f"{root}/tokenizer",  # spiece.model, or a folder holding it (the diffusers repo root works)
        # frozen DiT weights: bfloat16 | float32, or a weight-only quantized base, int8 | float8_e4m3fn (the
        # Dense kernels of the 48 blocks, ~99 % of the weights; a bf16 checkpoint is quantized as it loads)
        param_dtype="bfloat16",
        # True: the 47 stacked blocks' weights wait in pinned host memory and each block is copied to the
        # device when the scan reaches it (training: ~one block's weights on the device; costs PCIe traffic)
        weights_on_host=False,
        compute_dtype="bfloat16",  # matmuls; norms, softmax and the loss run in float32
        # 'auto': the platform's kernel (splash on TPUs, cudnn on NVIDIA GPUs with bfloat16 compute, xla on
        # CPUs and elsewhere; the fit check uses its target's), or one of xla | cudnn | splash
        attention="auto",
        splash_block=512,  # attention='splash': the kernels' q / kv tile, in tokens (a multiple of 128)
        scan_layers=True,  # False: the blocks run as an unrolled Python loop (debugging; compiles per block)
        vae_dtype="",  # VAE weights cast on load: bfloat16 | float32; '' keeps the stored dtype
        vae_compute_dtype="bfloat16",  # VAE decode convolutions; its norms and softmax run in float32
        tile_size=(256, 256),  # pixels (H, W) of the tiles of sampling.tiled_decode, multiples of 8
        tile_overlap=(64, 64),  # pixels the tiles overlap, multiples of 8, < tile_size
        t5_dtype="",  # T5 weights cast on load; '' keeps the stored dtype
        t5_compute_dtype="bfloat16",  # T5 matmuls; its norms, softmax and residual stream run in float32
    ))


def mesh(data: int = 1, fsdp: int = 1, sequence: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
    """Sizes of the device mesh's axes (mochi_jax/models/sharding.py), one of them -1 for "the devices
    left": 'data' and 'fsdp' split the batch, 'fsdp' also the weights (FSDP), 'sequence' the visual
    tokens, 'tensor' heads and MLP columns."""
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, sequence=sequence, tensor=tensor))


def distributed() -> ml_collections.ConfigDict:
    """Several hosts: jax.distributed.initialize() when `enabled`. On TPU pods, Slurm and Open MPI the
    cluster is detected; elsewhere give the coordinator ("host:port" of process 0), the process count
    and this process's id."""
    return ml_collections.ConfigDict(dict(enabled=False, coordinator="", num_processes=0, process_id=-1))


def sampling() -> ml_collections.ConfigDict:
    """The fine-tuner's validation settings: 37 frames at 480x848, 64 steps, cfg 6.0."""
    return ml_collections.ConfigDict(dict(
        num_frames=37,  # 6k + 1
        height=480, width=848,  # multiples of 16
        steps=64,
        guidance=6.0,  # classifier-free guidance scale; 1 = no unconditional branch (diffusers' default is 4.5)
        threshold_noise=0.025,  # of the linear-quadratic sigma schedule
        negative_prompt="",
        # an empty negative prompt as zero features and mask: the unconditional branch caption dropout
        # trains (and genmo's sampler's); False: T5("") as diffusers' MochiPipeline encodes it
        zero_empty_negative=True,
        tiled_decode=True,  # bounded-memory VAE decoding
        fps=30,
    ))


def clip(checkpoint: str = "ckpt/clip", tokenizer: str = "ckpt/clip_tokenizer") -> ml_collections.ConfigDict:
    """A CLIP converted with `tools/convert_weights.py clip` and its tokenizer (vocab.json + merges.txt)."""
    return ml_collections.ConfigDict(dict(checkpoint=checkpoint, tokenizer=tokenizer, batch=32))  # batch: frames per call


def demo_model(m: ml_collections.ConfigDict, root: str = DEMO_ROOT) -> ml_collections.ConfigDict:
    """Point a `model` block at the demo's tiny random models (float32)."""
    m.update(dict(dit=f"{root}/models/dit", vae=f"{root}/models/vae", t5=f"{root}/models/t5",
                  tokenizer=f"{root}/models/tokenizer", param_dtype="float32", compute_dtype="float32",
                  vae_compute_dtype="float32", t5_compute_dtype="float32"))
    return m


def demo_sampling(s: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Demo-sized videos: 13 frames at 48x80, 8 steps, untiled."""
    s.update(dict(num_frames=13, height=48, width=80, steps=8, tiled_decode=False))
    return s


def demo(root: str = DEMO_ROOT, clips: int = 0, prepare=None, clip_model: bool = False) -> ml_collections.ConfigDict:
    """What `mochi_jax.demo.ensure` makes under `root` when missing: the tiny random models, always;
    `clips` synthetic clips in root/clips; the cache `prepare` describes (a prepare config); a tiny
    random CLIP and a prompt file."""
    return ml_collections.ConfigDict(dict(
        root=root, clips=clips, clip_frames=25, clip_size=(48, 80), clip_model=clip_model,
        prepare=prepare if prepare is not None else ml_collections.ConfigDict()))
