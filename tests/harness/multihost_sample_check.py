"""One process of a 2-process `sample` or `evaluate` run on CPU (tests/test_multihost_sample.py starts
two, or one alone for the reference): each process has 2 simulated devices and joins through
jax.distributed on localhost; the command's mesh spans every process's devices.

    multihost_sample_check.py <sample|evaluate> <process id> <processes> <port> <models> <out dir> [<eval root>]

With TERM_AT=N in the environment, process 1 sends itself SIGTERM as its N-th denoising call starts
(a stop that reaches one host); a stopped command exits with Stopped's status.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harnesses
command, pid, nproc, port, models, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], \
    sys.argv[6]

from simulated import cpu_devices  # noqa: E402

cpu_devices(2)

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU

from mochi_jax import evaluate, sample  # noqa: E402
from mochi_jax.lib import sampling  # noqa: E402
from mochi_jax.lib.stopping import Stopped  # noqa: E402

if os.environ.get("TERM_AT") and pid == 1:
    term_at, calls, denoise_one = int(os.environ["TERM_AT"]), [], sampling.denoise

    def denoise_term(*args, **kwargs):
        calls.append(1)
        if len(calls) == term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return denoise_one(*args, **kwargs)

    sampling.denoise = denoise_term

models = Path(models)
if command == "sample":
    from mochi_jax.configs import sample as sample_config

    cfg = sample_config.get_config("demo")
    del cfg.demo  # the test makes the models
    cfg.model.update({k: str(models / k) for k in ("dit", "vae", "t5", "tokenizer")})
    cfg.sampling.update(dict(num_frames=7, height=32, width=48, steps=2, tiled_decode=False))
    cfg.prompt, cfg.num_videos, cfg.batch_size = "a red ball", 2, 2
else:
    import eval_ref

    root = Path(sys.argv[7])
    cfg = eval_ref.eval_config(root, models, [root / "a.safetensors"], out="unused")
    cfg.sampling.tiled_decode = False
cfg.out_dir = out
cfg.mesh.update(dict(data=1, fsdp=-1))
if nproc > 1:
    cfg.distributed.update(dict(enabled=True, coordinator=f"localhost:{port}", num_processes=nproc, process_id=pid))
try:
    (sample.run if command == "sample" else evaluate.run)(cfg)
except Stopped as e:
    print(f"PROCESS {jax.process_index()}: {e}", flush=True)
    sys.exit(e.exit_status)
print(f"PROCESS {jax.process_index()} of {jax.process_count()} with {jax.device_count()} devices: done", flush=True)
