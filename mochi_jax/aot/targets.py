"""Hardware the ahead-of-time fit check (`mochi_jax.aot`) compiles for, as facts, and the
compile-only devices that stand for it on a CPU host.

    target = parse_target("v5e-16")          # a TPU slice: 16 chips (libtpu's compiler)
    target = parse_target("h100-8")          # 8 H100 80 GB in one host (the CUDA plugin's compiler)
    devices = compile_devices(target)        # jax Devices to build a Mesh from; nothing runs on them
    limit = memory_limit(target, devices)    # bytes per device the program may use

TPU names are Cloud TPU accelerator types (`v4-8`, `v5p-8`, `v5litepod-16` / `v5e-16`, `v6e-8`: the
number counts TensorCores on v4 / v5p, whose two cores per chip act as one device, and chips on
v5e / v6e) or topologies (`v5p:2x2x1`, `v5e:4x4`). GPU names are the keys of GPUS with an optional
`-N` for N GPUs (N > gpus_per_host spreads them over hosts). A GPU's compiler needs a
GpuTargetConfigProto in text form; `gpu_target_config` writes one from the facts below (XLA
compiles for what the proto says, so a wrong number here is a wrong compile, not a crash).

Environment: JAX must run on the CPU (`JAX_PLATFORMS=cpu`) with GPU autotuning off
(`--xla_gpu_autotune_level=0`: there is no GPU to time kernels on), and libtpu must not take its
one-process lock; `compile_only_environment()` sets all three and must run before jax is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re

from mochi_jax.stderr import dropping_stderr

GIB = 1 << 30

# ----------------------------------------------------------------------------- TPU facts

# generation -> (topology prefix libtpu knows, dimensions of the torus, chip config, nominal HBM GiB
# per device, chips per host of a multi-host slice). v4 and v5p chips hold two TensorCores that
# 'megacore' joins into one device; HBM is per chip. The usable HBM the compiler allows is read
# from the compiler itself (`memory_limit`), the nominal figure is only a fallback.
TPU = {
    "v4": ("v4", 3, "megacore", 32, 4),
    "v5p": ("v5p", 3, "megacore", 95, 4),
    "v5e": ("v5e", 2, "default", 16, 4),
    "v6e": ("v6e", 2, "default", 32, 4),
}
TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p"}

# ----------------------------------------------------------------------------- GPU facts


@dataclasses.dataclass(frozen=True)
class GpuFacts:
    """What XLA's GPU compiler needs to know about a card (CUDA's device properties)."""

    description: str  # cudaDeviceProp.name
    compute_capability: tuple[int, int]
    sm_count: int
    memory_bytes: int  # cudaDeviceProp.totalGlobalMem
    memory_bandwidth: int  # bytes / s
    l2_cache_bytes: int
    clock_ghz: float
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    fp32_units_per_sm: int


GPUS = {
    "h100": GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 132, 84_942_979_072, 3_352_320_000_000, 50 << 20, 1.98,
                     228 << 10, 227 << 10, 128),
    "h200": GpuFacts("NVIDIA H200", (9, 0), 132, 151_397_597_184, 4_800_000_000_000, 50 << 20, 1.98,
                     228 << 10, 227 << 10, 128),
    "a100-80gb": GpuFacts("NVIDIA A100-SXM4-80GB", (8, 0), 108, 85_100_068_864, 2_039_040_000_000, 40 << 20, 1.41,
                          164 << 10, 163 << 10, 64),
    "rtx4090": GpuFacts("NVIDIA GeForce RTX 4090", (8, 9), 128, 25_393_692_672, 1_008_000_000_000, 72 << 20, 2.52,
                        100 << 10, 99 << 10, 128),
}
GPU_ALIASES = {"h100-80gb": "h100", "h100-sxm": "h100", "h200-141gb": "h200", "a100": "a100-80gb",
               "a100-sxm-80gb": "a100-80gb", "4090": "rtx4090", "rtx-4090": "rtx4090"}
# JAX reserves this share of a GPU's memory for its allocator unless XLA_CLIENT_MEM_FRACTION says otherwise
JAX_GPU_MEM_FRACTION = 0.75
CUDNN_VERSION = (9, 8, 0)  # the cuDNN the compiled program may use (jax-cuda12-plugin 0.10 needs >= 9.8)


def gpu_target_config(facts: GpuFacts) -> str:
    """A stream_executor.GpuTargetConfigProto in text form for one card. Only fields this jaxlib's
    proto knows (a newer XLA's `collective_memory_granularity` is refused by it)."""
    major, minor = facts.compute_capability
    info = {
        "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 48 << 10,
        "shared_memory_per_core": facts.shared_memory_per_sm, "threads_per_core_limit": 2048 if major >= 9 or
        (major, minor) == (8, 0) else 1536, "core_count": facts.sm_count, "fpus_per_core": facts.fp32_units_per_sm,
        "block_dim_limit_x": 2**31 - 1, "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
        "memory_bandwidth": facts.memory_bandwidth, "l2_cache_size": facts.l2_cache_bytes,
        "clock_rate_ghz": facts.clock_ghz, "device_memory_size": facts.memory_bytes,
        "shared_memory_per_block_optin": facts.shared_memory_per_block_optin,
    }
    lines = ["gpu_device_info {"]
    lines += [f"  {k}: {v}" for k, v in info.items()]
    lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
              "  registers_per_core_limit: 65536", "  registers_per_block_limit: 65536", "}",
              'platform_name: "CUDA"',
              "dnn_version_info {{ major: {} minor: {} patch: {} }}".format(*CUDNN_VERSION),
              f'device_description_str: "{facts.description}"']
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- targets


class TargetError(ValueError):
    """An unknown or malformed target name (the message says what is accepted)."""


class MissingCompiler(RuntimeError):
    """The compiler for the target's platform (libtpu, the CUDA plugin) is not installed."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given
    platform: str  # 'tpu' | 'cuda'
    kind: str  # 'v5e', 'h100', ...
    num_devices: int
    topology: str  # libtpu topology ('v5e:4x4') or the GPU plugin's 'slices x hosts x gpus per host'
    options: tuple = ()  # extra get_topology_desc keyword arguments, as (key, value) pairs
    nominal_bytes: int = 0  # device memory per device from the facts tables
    gpu: GpuFacts | None = None
    target_config: str = ""  # GPU only: the GpuTargetConfigProto text

    @property
    def num_hosts(self) -> int:
        per_host = dict(self.options).get("chips_per_host_bounds")
        if per_host is not None:
            return max(1, self.num_devices // math.prod(per_host))
        return int(self.topology.split("x")[1]) if self.platform == "cuda" else 1

    @property
    def accelerator_type(self) -> str:
        """The Cloud TPU accelerator type of a TPU target (v5p-8, v5litepod-16, v6e-8, ...)."""
        cores = 2 if dict(self.options).get("chip_config_name") == "megacore" else 1
        return f"{'v5litepod' if self.kind == 'v5e' else self.kind}-{self.num_devices * cores}"

    def describe(self) -> str:
        if self.topology == "local":
            return f"{self.num_devices} x {self.kind} (the devices at hand)"
        if self.platform == "tpu":
            return f"TPU {self.kind} slice {self.topology} ({self.num_devices} chips, {self.num_hosts} host(s))"
        return f"{self.num_devices} x {self.gpu.description} ({self.num_hosts} host(s))"


def _torus(chips: int, dims: int) -> list[int]:
    """The usual slice shape of `chips` chips (a power of two times 4, or 1): start from 2x2(x1) and
    double the last of the shortest sides until it holds them all (2x2x1, 2x2x2, 2x2x4, 2x4x4, ...)."""
    if chips == 1:
        return [1] * dims
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        low = min(shape)
        shape[max(i for i, s in enumerate(shape) if s == low)] *= 2
    if math.prod(shape) != chips:
        raise TargetError(f"{chips} chips is not a TPU slice size (1, 4, 8, 16, ...); give a topology such as "
                          "v5p:2x2x4")
    return shape


def _tpu_target(name: str) -> Target:
    m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+)+))", name)
    if not m:
        raise TargetError(f"bad TPU target {name!r}: write an accelerator type (v5p-8, v5e-16, v6e-8, v4-8) or a "
                          f"topology (v5p:2x2x1, v5e:4x4)")
    gen = TPU_ALIASES.get(m.group(1), m.group(1))
    if gen not in TPU:
        raise TargetError(f"unknown TPU generation {m.group(1)!r} in {name!r}; known: {', '.join(TPU)}")
    prefix, dims, chip_config, hbm_gib, host_chips = TPU[gen]
    if m.group(2):
        n = int(m.group(2))
        chips = n // 2 if chip_config == "megacore" else n  # v4-8 / v5p-8 count TensorCores: 4 chips
        if chips < 1 or (chip_config == "megacore" and n % 2):
            raise TargetError(f"{name!r}: {gen} accelerator types count TensorCores, two per chip (v5p-8 = 4 chips)")
        shape = _torus(chips, dims)
    else:
        shape = [int(s) for s in m.group(3).split("x")]
        if len(shape) != dims or min(shape) < 1:
            raise TargetError(f"{name!r}: a {gen} topology has {dims} sides, e.g. {prefix}:{'x'.join(['2'] * dims)}")
        chips = math.prod(shape)
    # hosts hold 4 chips (2x2x1); single-host slices of 8 (v5e-8, v6e-8) hold them all
    bounds = (2, 4, 1) if chips == 8 and dims == 2 else tuple(min(s, b) for s, b in zip(shape + [1] * (3 - dims),
                                                                                      (2, 2, 1)))
    options = (("chip_config_name", chip_config), ("chips_per_host_bounds", bounds),
               ("wrap", (False, False, False)))
    return Target(name, "tpu", gen, chips, f"{prefix}:{'x'.join(map(str, shape))}", options, hbm_gib * GIB)


def _gpu_target(name: str, gpus_per_host: int) -> Target | None:
    m = re.fullmatch(r"(.+?)(?:-(\d+))?", name)
    key, count = m.group(1), int(m.group(2) or 1)
    if name in GPUS or name in GPU_ALIASES:  # a name that ends in a number itself
        key, count = name, 1
    key = GPU_ALIASES.get(key, key)
    if key not in GPUS:
        return None
    if count < 1 or gpus_per_host < 1 or (count > gpus_per_host and count % gpus_per_host):
        raise TargetError(f"{name!r}: {count} GPUs do not fill hosts of {gpus_per_host}")
    hosts, per_host = (count // gpus_per_host, gpus_per_host) if count > gpus_per_host else (1, count)
    facts = GPUS[key]
    return Target(name, "cuda", key, count, f"1x{hosts}x{per_host}", (), facts.memory_bytes, facts,
                  gpu_target_config(facts))


def parse_target(name: str, gpus_per_host: int = 8, target_config: str = "") -> Target:
    """A Target from a name (see the module doc). `target_config`: a GpuTargetConfigProto text file
    for a GPU not in GPUS; then `name` is 'gpu' or 'gpu-N'."""
    name = (name or "").strip().lower()
    if not name:
        raise TargetError("no target: set --config.aot.target (a TPU slice such as v5e-16 or v5p-8, or a GPU "
                          f"such as {', '.join(GPUS)}, with -N for N GPUs)")
    if target_config:
        m = re.fullmatch(r"gpu(?:-(\d+))?", name)
        if not m:
            raise TargetError(f"with a target_config file the target is 'gpu' or 'gpu-N', got {name!r}")
        try:
            text = open(target_config).read()
        except OSError as e:
            raise TargetError(f"cannot read target_config {target_config}: {e}") from e
        size = re.search(r"device_memory_size:\s*(\d+)", text)
        desc = re.search(r'device_description_str:\s*"([^"]*)"', text)
        if not size:
            raise TargetError(f"{target_config}: no device_memory_size in gpu_device_info (a GpuTargetConfigProto "
                              "text file is expected)")
        count = int(m.group(1) or 1)
        facts = GpuFacts(desc.group(1) if desc else target_config, (0, 0), 0, int(size.group(1)), 0, 0, 0.0, 0, 0, 0)
        hosts, per_host = (count // gpus_per_host, gpus_per_host) if count > gpus_per_host else (1, count)
        return Target(name, "cuda", "gpu", count, f"1x{hosts}x{per_host}", (), facts.memory_bytes, facts, text)
    gpu = _gpu_target(name, gpus_per_host)
    if gpu is not None:
        return gpu
    if re.match(r"v\d", name):
        return _tpu_target(name)
    raise TargetError(f"unknown target {name!r}: a TPU slice (v4-8, v5p-8, v5e-16, v6e-8, or a topology such as "
                      f"v5p:2x2x1) or a GPU ({', '.join(GPUS)}, with -N for N GPUs, e.g. h100-8)")


# ----------------------------------------------------------------------------- compile-only devices

INSTALL = {
    "tpu": "the TPU compiler (libtpu) is not installed: pip install -e '.[tpu]' (about 210 MB; no TPU needed)",
    "cuda": "the CUDA compiler plugin is not installed: pip install -e '.[cuda]' (several GB of CUDA libraries; "
            "no GPU needed)",
}


def compile_only_environment() -> None:
    """Environment for compiling on a CPU host; call before jax is imported (it is read once)."""
    if "jax" in __import__("sys").modules:
        import jax

        if jax._src.xla_bridge.backends_are_initialized():  # noqa: SLF001 - only to give a clear error
            raise RuntimeError("compile_only_environment() must run before JAX initialises its backends")
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_autotune_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_autotune_level=0").strip()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # the compiler needs no exclusive TPU access
    # no TPU VM metadata to ask for this host's place in a slice: say there is none
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def have_compiler(platform: str) -> bool:
    import importlib.util

    def installed(name: str) -> bool:  # find_spec of a submodule raises when its package is absent
        try:
            return importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            return False

    if platform == "tpu":
        return installed("libtpu")
    return installed("jax_plugins.xla_cuda12") or installed("jax_cuda12_plugin")


# What the CUDA plugin and XLA's GPU compiler log on a host without a GPU, none of it about the answer:
# the missing driver (`cudart_stub.cc ... Could not find cuda drivers`, with absl's note on logging before
# its start), the scheduler's own memory estimate disagreeing with the buffer assignment's
# (`gpu_hlo_schedule.cc ... This indicates an error in the calculation!`), and rematerialisation that
# could not shrink a program (its memory is the report's). Dropped from a GPU compile's stderr.
GPU_COMPILER_NOISE = re.compile(r"gpu_hlo_schedule\.cc|cudart_stub\.cc|absl::InitializeLog|hlo_rematerialization\.cc")


def quiet(target: Target):
    """A context that drops GPU_COMPILER_NOISE from stderr for a GPU target (nothing for a TPU's)."""
    return dropping_stderr(GPU_COMPILER_NOISE) if target.platform == "cuda" else contextlib.nullcontext()


def compile_devices(target: Target) -> list:
    """Compile-only jax Devices of the target (their order is the topology's, as on the real slice)."""
    from jax.experimental import topologies

    if not have_compiler(target.platform):
        raise MissingCompiler(INSTALL[target.platform])
    if target.platform == "tpu":
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type)  # read once, by libtpu's start
        topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **dict(target.options))
    else:
        topo = topologies.get_topology_desc(platform="cuda", target_config=target.target_config,
                                            topology=target.topology)
    devices = list(topo.devices)
    if len(devices) != target.num_devices:
        raise TargetError(f"{target.name}: the compiler made {len(devices)} devices, expected {target.num_devices}")
    return devices


_TPU_LIMIT = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(number: str, unit: str) -> int:
    return int(float(number) * _UNITS[unit])


def memory_limit(target: Target, devices, gpu_fraction: float = JAX_GPU_MEM_FRACTION) -> tuple[int, str]:
    """(bytes a program may use per device, where the figure comes from).

    TPU: the compiler's own limit, read from its answer to a program that cannot fit (a little under
    the chip's HBM). GPU: the card's memory times the share JAX's allocator takes (0.75 unless
    XLA_CLIENT_MEM_FRACTION is set when training)."""
    if target.platform == "cuda":
        return int(target.nominal_bytes * gpu_fraction), (
            f"{target.nominal_bytes / GIB:.1f} GiB x {gpu_fraction:g} (JAX's GPU memory fraction)")
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    one = SingleDeviceSharding(devices[0])
    probe = jax.jit(lambda x: jnp.zeros((1 << 40,), jnp.int8) + x, out_shardings=one)
    try:
        probe.lower(jax.ShapeDtypeStruct((), jnp.int8, sharding=one)).compile()
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is the answer
        m = _TPU_LIMIT.search(str(e))
        if m:
            return parse_size(*m.groups()), "the TPU compiler's HBM limit"
    return target.nominal_bytes, f"{target.kind} nominal HBM"


def local_target(devices) -> Target:
    """The devices at hand (a real TPU, GPU or the CPU) as a Target, for compiling where one runs."""
    d = devices[0]
    return Target("local", d.platform, str(getattr(d, "device_kind", d.platform)), len(devices), "local")
