"""Compile a program ahead of time and report its memory: `measure(program, target, limit, source)`.

The figures are the compiler's (`compiled.memory_analysis()`, read by `mochi_jax.lib.program.memory`),
per device: arguments (weights, state, batch), temporaries, outputs, and aliasing (outputs written
into donated arguments, e.g. the train state). Total = arguments + outputs - aliased + temporaries +
generated code, plus what sits on the device without being an argument (prepare's VAE decoder weights
during the encode). A TPU compiler refuses a program that does not fit its HBM; its message (with the
sizes) is the answer.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

from mochi_jax.aot import targets as targets_lib
from mochi_jax.lib.program import Program, device_bytes, memory
from mochi_jax.models.remat import attention_reruns

GIB = targets_lib.GIB


CLOSE = 0.02  # a fit with less than this share of the limit to spare is called close


class BadInput(ValueError):
    """A config, target or shape that cannot be compiled; the message is one line saying why."""


@dataclasses.dataclass
class Report:
    what: str
    target: str
    hardware: str
    num_devices: int
    mesh: dict
    details: list  # lines: model, batch, ...
    inputs: dict  # name -> bytes per device
    remat: str = ""  # a training step's remat setting (a policy or a groups string; remat='auto': its choice)
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    host_bytes: int = 0  # pinned host memory of the program (weights on the host, offloaded activations)
    resident: dict = dataclasses.field(default_factory=dict)  # name -> bytes on the device the program never reads
    total_bytes: int = 0  # per device
    limit_bytes: int = 0
    limit_source: str = ""
    fits: bool = False
    lower_s: float = 0.0
    compile_s: float = 0.0
    # attention forward kernels (cuDNN, splash) in the bodies of the backward pass's layer loops (one loop
    # per remat group): each is rerun by every block of its loop (its remat keeps no 'attn'); 0 when no
    # block's backward reruns its attention; -1 when not applicable (no such kernel or loop, not compiled)
    attention_reruns: int = -1
    compiler_error: str = ""  # the first line of the compiler's out-of-memory refusal
    compiler_message: str = ""  # all of it (TPU: the largest allocations), cut at 4000 characters
    # a program that does not fit: the settings tried to make it fit, in order, each
    # {"flags": [--config.x=y, ...], "total_bytes": ..., "fits": bool} (fit.check's ladder)
    suggestions: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        g = lambda b: f"{b / GIB:8.2f} GiB" if b >= GIB // 10 or not b else f"{b / (1 << 20):8.1f} MiB"  # noqa: E731
        mb = lambda b: f"{b / GIB:.2f} GiB" if b >= GIB // 10 or not b else f"{b / (1 << 20):.1f} MiB"  # noqa: E731
        unit = "chip" if self.hardware.startswith("TPU") else "GPU"
        lines = [f"{self.what} on {self.hardware}"]
        lines += [f"  {line}" for line in self.details]
        lines.append("  mesh     " + ", ".join(f"{k} {v}" for k, v in self.mesh.items()) if self.mesh else
                     "  mesh     one device")
        if self.compiler_error:
            lines.append(f"  compiler: {self.compiler_error}")
        else:
            parts = ", ".join(f"{k} {mb(v)}" for k, v in self.inputs.items())
            lines += [f"  per {unit}:",
                      f"    arguments   {g(self.argument_bytes)}  ({parts})",
                      f"    temporaries {g(self.temp_bytes)}",
                      f"    outputs     {g(self.output_bytes)}  ({mb(self.alias_bytes)} of them written into "
                      "donated arguments)",
                      f"    code        {g(self.code_bytes)}"]
            for k, v in self.resident.items():
                lines.append(f"    resident    {g(v)}  ({k}: on the device, unused by this program)")
            if self.host_bytes:
                lines.append(f"    host memory {g(self.host_bytes)}  (pinned host: weights streamed block by block, "
                             "offloaded activations; not counted in the total)")
            lines.append(f"    total       {g(self.total_bytes)}  of {self.limit_bytes / GIB:.2f} GiB "
                         f"({self.limit_source})")
        if self.attention_reruns > 0:
            lines.append("  remat    the backward reruns the attention kernel's forward per block "
                         "(model.remat=save:attn keeps its output and softmax statistics instead)")
        lines.append(f"  compiled in {self.compile_s:.1f} s (lowered in {self.lower_s:.1f} s)")
        share = f"{self.total_bytes / GIB:.2f} GiB of {self.limit_bytes / GIB:.2f} GiB per {unit}"
        if self.fits:
            lines.append(f"FITS: {share} ({100 * self.total_bytes / self.limit_bytes:.0f} %)")
            spare = self.limit_bytes - self.total_bytes
            if spare < CLOSE * self.limit_bytes:
                lines.append(f"  a close fit: {spare / 2 ** 20:.1f} MiB to spare; allocator fragmentation or another "
                             f"jax / XLA version can tip it over (leave room: a stronger remat, fewer frames)")
        elif self.compiler_error:
            on_top = (f": {self.temp_bytes / GIB:.2f} GiB of temporaries (the compiler's figure) and "
                      f"{(self.total_bytes - self.temp_bytes) / GIB:.2f} GiB of arguments" if self.temp_bytes else "")
            lines.append(f"DOES NOT FIT: the compiler needs at least {share}{on_top}")
        else:
            lines.append(f"DOES NOT FIT: {share}, {(self.total_bytes - self.limit_bytes) / GIB:.2f} GiB over")
            if self.hardware.startswith("TPU") and self.limit_source == "the TPU compiler's HBM limit":
                lines.append("  (the TPU compiler accepted the program, but its own memory analysis is over the "
                             "limit it enforces on simpler programs: not counted as fitting until run on a chip)")
        lines += self._suggestion_lines()
        return "\n".join(lines)

    def _suggestion_lines(self) -> list[str]:
        if not self.suggestions:
            return []
        fit = next((s for s in self.suggestions if s["fits"]), None)
        lines = ["settings tried, in order (each adds to the one before):"]
        lines += [f"  {' '.join(s['flags'])}: " + (f"refused ({s['error']})" if s.get("error") else
                                                   f"{s['total_bytes'] / GIB:.2f} GiB" + (" FITS" if s["fits"] else "")
                                                   + (f" (fits in {s['fits_at']:.0%} of the card: XLA_CLIENT_MEM_FRACTION="
                                                      f"{s['fits_at']:g} when training, --config.aot.gpu_memory_fraction="
                                                      f"{s['fits_at']:g} here)" if s.get("fits_at") else ""))
                  for s in self.suggestions]
        if fit is not None:
            lines.append(f"would fit with: {' '.join(fit['flags'])}")
        else:
            lines.append("none of them fits: fewer frames, a smaller batch, or a target with more devices (FSDP and "
                         "sequence parallelism split what is left)")
        return lines


_USED = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")
_REQUIRED = re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")


def parse_out_of_memory(message: str) -> tuple[int, int, bool] | None:
    """(bytes needed, bytes available, whether `needed` counts the temporaries only) from a TPU
    compiler's out-of-memory error, if it is one. "Used X of Y hbm" is the whole program's; "the total
    memory required for HLO temporaries (X) exceeds available HBM (Y)" leaves out the arguments."""
    for pattern in (_USED, _REQUIRED):
        m = pattern.search(message)
        if m:
            a, ua, b, ub = m.groups()
            return targets_lib.parse_size(a, ua), targets_lib.parse_size(b, ub), pattern is _REQUIRED
    return None


def measure(program: Program, target: targets_lib.Target, limit: int, limit_source: str) -> Report:
    """Lower and compile `program` and read its memory; a TPU compiler's out-of-memory refusal
    becomes a report that does not fit (with the sizes from its message)."""
    inputs = {k: device_bytes(v) for k, v in program.inputs.items()}
    inputs.update({f"{k} in host memory": b for k, v in program.inputs.items() if (b := device_bytes(v, "pinned_host"))})
    report = Report(program.what, target.name, target.describe(), target.num_devices, program.layout,
                    program.details, inputs, remat=program.remat,
                    limit_bytes=limit, limit_source=limit_source,
                    resident={k: device_bytes(v) for k, v in program.resident.items()})
    t0 = time.time()
    try:
        lowered = program.lower()
    except ValueError as e:  # shapes, meshes, attention backends the model refuses
        raise BadInput(" ".join(str(e).split())) from e
    report.lower_s = time.time() - t0
    t0 = time.time()
    try:
        with targets_lib.quiet(target):
            compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - only an out-of-memory refusal is an answer; the rest is re-raised
        report.compile_s = time.time() - t0
        sizes = parse_out_of_memory(str(e))
        if sizes is None:  # the compiler cannot build this program for the target at all: one line
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise BadInput(f"the {target.platform.upper()} compiler refused the program: {first[:300]}") from e
        report.total_bytes, report.limit_bytes, temporaries_only = sizes
        if temporaries_only:  # the arguments (weights, state, batch) are on the device too
            report.temp_bytes = report.total_bytes
            report.argument_bytes = sum(v for k, v in inputs.items() if not k.endswith(" in host memory"))
            report.total_bytes += report.argument_bytes + sum(report.resident.values())
        report.limit_source = "the compiler's limit"
        report.compiler_error = str(e).strip().splitlines()[0][:400]
        report.compiler_message = str(e).strip()[:4000]
        return report
    report.compile_s = time.time() - t0
    report.attention_reruns = attention_reruns(compiled.as_text())
    m = memory(compiled, sum(report.resident.values()))
    report.argument_bytes, report.output_bytes, report.alias_bytes = m["argument"], m["output"], m["alias"]
    report.temp_bytes, report.code_bytes, report.host_bytes = m["temp"], m["code"], m["host"]
    report.total_bytes = m["total"]
    report.fits = report.total_bytes <= report.limit_bytes
    return report


def write_json(report: Report, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return path
