"""Where prepare's models run: the VAE and T5 of a prepare config on one device or several, and the
two programs prepare compiles, as `Program`s the fit check (`mochi_jax.aot`) measures.

On one device (cfg.devices=1, or a machine with one) everything lives on that device. On several:
T5's weights are FSDP-sharded over the mesh of cfg.mesh (logical names from t5.logical_axes) and
each text batch is split over the mesh axes that divide it (`batch_split_t5`); the VAE's weights
are replicated and each clip's pixels are split spatially (`spatial_split`, `spatial_mesh`), so one
long clip's encode is spread over all devices; XLA's SPMD partitioner exchanges the convolution
halos and all-reduces the GroupNorm statistics. A tiled clip is not split: every device encodes it
whole.

One function makes each jitted call and its shardings (`vae_calls`, `vae_weights_sharding`,
`text_sharding`, `t5_shardings`, `batch_split_t5`); `Models` (what prepare runs) and the builders
`vae_encode_program` / `t5_program` (what the fit check compiles) both take them from there, so the
fit check compiles exactly the program prepare runs.
"""

from __future__ import annotations

import functools
import glob
import os
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from mochi_jax.checkpoints.orbax_io import read_metadata
from mochi_jax.checkpoints.t5 import t5_settings
from mochi_jax.checkpoints.vae import load_vae, vae_settings
from mochi_jax.lib.program import Program, abstract, mesh_layout
from mochi_jax.lib.text import TextEncoder, encode_tokens
from mochi_jax.lib.video import from_unit, to_unit
from mochi_jax.models import sharding as sharding_lib
from mochi_jax.models import t5 as t5_lib
from mochi_jax.models import vae as vae_lib
from mochi_jax.stderr import dropping_stderr
from mochi_jax.models.layers import Dense, RMSNorm
from mochi_jax.models.t5 import T5Encoder

SPATIAL_AXES = ("height", "width", "copies")  # a clip's spatial mesh (`spatial_mesh`)
PIXELS = PartitionSpec(None, None, None, "height", "width")  # pixels [B, 3, T, H, W] and latents, split spatially


# ----------------------------------------------------------------------------- meshes and shardings

# what libtpu prints when it looks for TPU chips on a machine that has none (the `tpu` and `test`
# extras install it): noise that reads as an error, dropped by `start`
_TPU_PROBE = re.compile(r"TPU|libtpu|InitGoogle|Source Location Trace|^learning/|^=+ *$")
_started = False


def start(block=None) -> None:
    """Start the devices of a command, once per process, before any device is used: join the
    processes of a multi-host command first (jax.distributed.initialize) when the config's
    `distributed` block (configs/common.py) is enabled. On a machine without TPU chips, what libtpu
    (when installed) prints while it looks for them is dropped; anything else printed is kept."""
    global _started
    if _started:
        return
    if block is not None and block.enabled:
        jax.distributed.initialize(coordinator_address=block.coordinator or None,
                                   num_processes=block.num_processes or None,
                                   process_id=block.process_id if block.process_id >= 0 else None)
    _started = True
    if os.environ.get("JAX_PLATFORMS") or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return  # platforms chosen, or TPU chips here: every line may matter
    with dropping_stderr(_TPU_PROBE):
        jax.devices()



def describe_devices() -> str:
    """'devices: 8 x TPU v5 lite (tpu), 2 processes': what this command runs on."""
    d = jax.devices()
    procs = jax.process_count()
    return (f"devices: {len(d)} x {d[0].device_kind} ({d[0].platform})"
            + (f", {procs} processes" if procs > 1 else ""))


def cpu_note(width: int) -> str | None:
    """A line for a full-size model (width >= 1024; Mochi 1's is 3072) about to run on CPU cores only:
    how to install the runtime of a GPU or TPU; None otherwise."""
    if width < 1024 or jax.devices()[0].platform != "cpu":
        return None
    return ("the full-size model is running on CPU cores only, which takes hours per step; on an NVIDIA GPU "
            "install jax's CUDA runtime (pip install -e '.[cuda]'), on a TPU VM libtpu (pip install -e '.[tpu]'), "
            "then check that the devices line names the GPU or TPU")


def prepare_mesh(cfg):
    """The device mesh of a prepare run (cfg.devices of this process's devices, -1 = all, shaped by
    cfg.mesh), or None when that is one device: then everything runs as on a single-device machine."""

    devices = jax.local_devices()
    want = int(cfg.get("devices", -1))
    if want == 0 or want < -1 or want > len(devices):
        raise ValueError(f"devices={want}: choose -1 (all {len(devices)}) or 1..{len(devices)}")
    devices = devices if want == -1 else devices[:want]
    if len(devices) == 1:
        return None
    sizes = cfg.get("mesh", None)
    sizes = dict(sizes.to_dict() if hasattr(sizes, "to_dict") else sizes or {"fsdp": -1})
    return sharding_lib.make_mesh(sizes, devices)


def spatial_split(latent_h: int, latent_w: int, n: int) -> tuple[int, int]:
    """(dh, dw): how many devices split a clip's latent height and width. Each must divide its side
    (then every encoder resolution, 8, 4, 2 and 1 pixels per latent, divides too) and dh * dw must
    divide n; the most devices win, then the wider split: the width first, then the height, and
    (1, 1) (no split) when neither side divides."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    best = (1, 1)
    for dw in divisors:
        for dh in divisors:
            if (n % (dh * dw) or latent_w % dw or latent_h % dh
                    or (dh * dw, dw) <= (best[0] * best[1], best[1])):
                continue
            best = (dh, dw)
    return best


def spatial_mesh(devices, latent_h: int, latent_w: int) -> Mesh:
    """The mesh ('height', 'width', 'copies') a clip of latent size (h, w) is split over: `devices`
    in their order, dh x dw of them splitting it (`spatial_split`), copies on any left."""
    devices = np.asarray(devices).reshape(-1)
    n = devices.size
    dh, dw = spatial_split(latent_h, latent_w, n)
    return Mesh(devices.reshape(dh, dw, n // (dh * dw)), SPATIAL_AXES)


def vae_weights_sharding(devices) -> NamedSharding:
    """The VAE's weights on several devices: whole on each of `devices` (in their order, the order of
    every clip's spatial mesh, so weights and pixels share the device assignment)."""
    return NamedSharding(Mesh(np.asarray(devices).reshape(-1), ("devices",)), PartitionSpec())


@functools.lru_cache(maxsize=None)
def vae_calls(split: NamedSharding | None = None):
    """(encode, decode): the jitted VAE calls (cfg and tiled static); with `split`, a spatial
    sharding of pixels and latents (`PIXELS` on a `spatial_mesh`), their outputs pinned to it. One
    pair per sharding, shared by `Models` and `vae_encode_program`."""
    if split is None:
        return (jax.jit(vae_lib.encode, static_argnames=("cfg", "tiled")),
                jax.jit(vae_lib.decode, static_argnames=("cfg", "tiled")))
    return (jax.jit(vae_lib.encode, static_argnames=("cfg", "tiled"), out_shardings=(split, split)),
            jax.jit(vae_lib.decode, static_argnames=("cfg", "tiled"), out_shardings=split))


def text_sharding(mesh: Mesh, batch: int) -> NamedSharding:
    """Token ids and masks [batch, L]: the batch over every mesh axis that divides it (the T5
    computes data-parallel), replicated when none does."""
    batch_rule = (("batch", tuple(a for a in sharding_lib.AXES if a in mesh.shape)),)
    rows = sharding_lib.spec(("batch",), (batch,), mesh, rules=batch_rule)[0]
    return NamedSharding(mesh, PartitionSpec(rows, None))


def t5_shardings(t5_cfg, mesh: Mesh):
    """NamedShardings of the T5's weights (stacked layout) on `mesh`, from its logical axes (FSDP)."""
    return sharding_lib.param_shardings(t5_lib.logical_axes(t5_cfg), t5_lib.abstract_params(t5_cfg), mesh)


def checkpoint_t5_shardings(path, mesh: Mesh):
    """`t5_shardings` for the converted T5 at `path`, or None if `path` is no converted T5 (load_t5
    then says what is wrong)."""
    meta = read_metadata(path)
    if meta.get("model") != "t5_encoder" or "config" not in meta:
        return None
    return t5_shardings(t5_lib.T5Config.from_dict(meta["config"]), mesh)


@functools.lru_cache(maxsize=None)
def batch_split_t5(t5_cfg, text_sharding: NamedSharding):
    """The jitted T5 encoder (ids, mask [B, L] -> features, mask) for sharded weights: every Dense
    and RMSNorm sees and returns activations [B, L, features] split along the batch only, as
    `text_sharding` splits ids, and whole along the features. XLA then all-gathers each layer's
    weights as it runs (FSDP) and every device computes its own prompts exactly as one device
    would; left to itself XLA may keep the weights split and add up partial products from the
    devices, which rounds differently (in bfloat16, visibly)."""

    rows = NamedSharding(text_sharding.mesh, PartitionSpec(text_sharding.spec[0], None, None))

    def keep_rows(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, (Dense, RMSNorm)):
            return next_fun(*args, **kwargs)
        x = jax.lax.with_sharding_constraint(args[0], rows)
        return jax.lax.with_sharding_constraint(next_fun(x, *args[1:], **kwargs), rows)

    @jax.jit
    def run(params, ids, mask):
        with nn.intercept_methods(keep_rows):
            return T5Encoder(t5_cfg).apply({"params": params}, ids, mask)

    return run


# ----------------------------------------------------------------------------- the programs

def vae_encode_program(vae_cfg, devices, clip, tiled: bool) -> Program:
    """prepare's VAE encode of one clip of (frames, height, width) pixels: on one device, or with
    the weights replicated over `devices` and the pixels split spatially over them (a tiled clip:
    encoded whole on every device). `fn` is the jitted encode `Models` calls for such a clip, `args`
    what it is called with: on one device the weights on that device and the pixels without a
    sharding (prepare passes them as a NumPy array), so the program lowers to the same HLO."""
    frames, height, width = clip
    shape = (1, 3, frames, height, width)
    vae_lib.check_pixels(shape, vae_cfg)
    params = jax.eval_shape(lambda: vae_lib.init(jax.random.PRNGKey(0), vae_cfg))
    s = vae_cfg.spatial_factor
    pixels = jax.ShapeDtypeStruct(shape, jnp.float32)
    layout = {}
    if len(devices) == 1:
        params = abstract(params, SingleDeviceSharding(devices[0]))
        fn, _ = vae_calls(None)
    else:
        weights = vae_weights_sharding(devices)
        params = abstract(params, weights)
        if tiled:
            pixels, layout = abstract(pixels, weights), mesh_layout(weights.mesh)
            fn, _ = vae_calls(None)
        else:
            split = NamedSharding(spatial_mesh(devices, height // s, width // s), PIXELS)
            pixels, layout = abstract(pixels, split), mesh_layout(split.mesh)
            fn, _ = vae_calls(split)
    latent = (vae_cfg.latent_channels, vae_lib.latent_frames(frames), height // s, width // s)
    detail = (f"clip     {frames} frames {height}x{width} (float32 pixels) -> latents {list(latent)}"
              + (", tiled" if tiled else ""))
    return Program("VAE encode", fn, (params, pixels), {"encoder weights": params["encoder"], "pixels": pixels},
                   kwargs={"cfg": vae_cfg, "tiled": tiled}, layout=layout, details=[detail],
                   resident={"decoder weights": params["decoder"]})  # jit drops the unused decoder argument


def t5_program(t5_cfg, devices, batch: int, length: int, mesh_sizes) -> Program:
    """prepare's T5 call on a batch of captions: on one device (text.encode_tokens, with its drop
    argument), or the weights sharded over `sharding.make_mesh(mesh_sizes, devices)` and the batch
    split (`batch_split_t5`). `fn` is the jitted call `Models` makes; on one device the tokens have no
    sharding (NumPy arrays, as prepare passes them) and the weights sit on that device."""
    params = t5_lib.abstract_params(t5_cfg)
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_)
    detail = [f"captions {batch} x {length} tokens -> features [{batch}, {length}, {t5_cfg.d_model}]"]
    if len(devices) == 1:
        params = abstract(params, SingleDeviceSharding(devices[0]))
        drop = jax.ShapeDtypeStruct((batch,), jnp.bool_)
        return Program("T5 encode", encode_tokens, (t5_cfg, params, ids, mask, drop),
                       {"weights": params, "tokens": (ids, mask)}, details=detail)
    mesh = sharding_lib.make_mesh(mesh_sizes, devices)
    rows = text_sharding(mesh, batch)
    params = abstract(params, t5_shardings(t5_cfg, mesh))
    ids, mask = abstract(ids, rows), abstract(mask, rows)
    return Program("T5 encode", batch_split_t5(t5_cfg, rows), (params, ids, mask),
                   {"weights": params, "tokens": (ids, mask)}, layout=mesh_layout(mesh), details=detail)


# ----------------------------------------------------------------------------- the models

class Models:
    """The VAE and T5 of a prepare config, loaded once, with numpy in and out, placed as the module
    docstring says (`mesh`: None on one device)."""

    def __init__(self, cfg):

        for what, path in (("VAE", cfg.vae), ("T5", cfg.t5), ("tokenizer", cfg.tokenizer)):
            if not Path(path).exists():
                raise FileNotFoundError(f"{what} not found at {path}: convert the weights with tools/convert_weights.py "
                                        f"(docs/weights.md) or set --config.{what.lower()}=...")
        self.tiled, self.batch = bool(cfg.tiled), int(cfg.text_batch_size)
        self.mesh = prepare_mesh(cfg)
        self._splits, self._t5 = {}, None
        t5_weights = self.vae_weights = self.text_sharding = None
        if self.mesh is not None:
            t5_weights = checkpoint_t5_shardings(cfg.t5, self.mesh)
            self.vae_weights = vae_weights_sharding(self.mesh.devices)  # replicated: every leaf
            self.text_sharding = text_sharding(self.mesh, self.batch)
        self.vae_cfg, self.vae_params = load_vae(cfg.vae, shardings=self.vae_weights, **vae_settings(cfg))
        self.text = TextEncoder.load(cfg.t5, cfg.tokenizer, max_length=cfg.max_length, shardings=t5_weights,
                                     **t5_settings(cfg))
        if self.mesh is not None:
            split = self.text_sharding.spec[0]
            shape = {k: v for k, v in self.mesh.shape.items() if v > 1}
            print(f"prepare: {self.mesh.devices.size} devices, mesh {shape}: T5 weights sharded, text batches of "
                  f"{self.batch} " + (f"split over {split}" if split else "replicated (the batch does not divide)")
                  + "; VAE weights replicated, " + ("tiled clips encoded whole on every device" if self.tiled
                                                    else "each clip split spatially"))

    # ------------------------------------------------------------------ placement

    def _spatial(self, latent_hw):
        """(sharding, encode, decode) for a clip of latent size (h, w): pixels [1, 3, T, H, W] and
        latents [1, 12, t, h, w] split along the height over dh and the width over dw devices
        (`spatial_mesh`), copies on any devices left, and the jitted VAE calls with their outputs
        pinned to that sharding (`vae_calls`). On one device: (None, the plain calls); tiled on
        several: (the weights' replicated sharding, the plain calls)."""

        key = tuple(int(v) for v in latent_hw)
        if self.mesh is None:
            return (None, *vae_calls(None))
        if self.tiled:
            return (self.vae_weights, *vae_calls(None))
        if key not in self._splits:
            mesh = spatial_mesh(self.mesh.devices, *key)  # the devices in the order of the weights' mesh
            n, (dh, dw) = mesh.devices.size, (mesh.shape["height"], mesh.shape["width"])
            if dh * dw < n:
                print(f"prepare: note: a {key[0]}x{key[1]}-latent clip ({8 * key[0]}x{8 * key[1]} pixels) "
                      + (f"splits over {dh * dw} of the {n} devices ({dh} along the height x {dw} along the width; "
                         f"neither side divides further), the other devices compute copies" if dh * dw > 1 else
                         f"cannot be split over the {n} devices (neither latent side divides); every device "
                         "encodes it whole"))
            sh = NamedSharding(mesh, PIXELS)
            self._splits[key] = (sh, *vae_calls(sh))
        return self._splits[key]

    # ------------------------------------------------------------------ encoders

    def encode_call(self, pixels: np.ndarray):
        """(the jitted encode for these pixels [1, 3, T, H, W], the pixels placed for it)."""
        s = self.vae_cfg.spatial_factor
        sh, enc, _ = self._spatial((pixels.shape[-2] // s, pixels.shape[-1] // s))
        return enc, (pixels if sh is None else jax.device_put(pixels, sh))

    def encode_video(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [T, H, W, 3] -> (mean, logvar) float32 [12, t, h, w] in VAE space."""
        enc, pixels = self.encode_call(np.moveaxis(to_unit(frames), -1, 0)[None])  # [1, 3, T, H, W]
        mean, logvar = enc(self.vae_params, pixels, cfg=self.vae_cfg, tiled=self.tiled)
        return np.asarray(mean[0], np.float32), np.asarray(logvar[0], np.float32)

    def decode(self, mean: np.ndarray) -> np.ndarray:
        """VAE-space latents [12, t, h, w] -> uint8 [T, H, W, 3]."""
        sh, _, dec = self._spatial(mean.shape[-2:])
        z = mean[None] if sh is None else jax.device_put(mean[None], sh)
        pixels = dec(self.vae_params, z, cfg=self.vae_cfg, tiled=self.tiled)
        return from_unit(np.moveaxis(np.asarray(pixels[0]), 0, -1))

    def text_call(self, prompts: list[str]):
        """(the jitted T5 call for one batch of prompts, its arguments placed for it): on one device
        text.encode_tokens (nothing dropped, as TextEncoder calls it), else `batch_split_t5`."""
        ids, mask = self.text.tokenizer(prompts)
        if self.mesh is None:
            return encode_tokens, (self.text.cfg, self.text.params, ids, mask, np.zeros(len(prompts), bool))
        if self._t5 is None:
            self._t5 = batch_split_t5(self.text.cfg, self.text_sharding)
        return self._t5, (self.text.params, *(jax.device_put(a, self.text_sharding) for a in (ids, mask)))

    def encode_text(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> (feats float32 [B, L, D], mask bool [B, L]); batches padded to one size (one compile)."""
        padded = list(prompts) + [""] * (-len(prompts) % self.batch)
        batches = (self.text_call(padded[i:i + self.batch]) for i in range(0, len(padded), self.batch))
        feats, masks = zip(*(fn(*args) for fn, args in batches))
        n = len(prompts)
        return np.concatenate(feats)[:n].astype(np.float32), np.concatenate(masks)[:n].astype(bool)
