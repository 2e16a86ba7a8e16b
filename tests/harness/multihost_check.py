"""One process of a 2-process training run on CPU (tests/test_multihost.py starts two): each
process has 2 simulated devices, joins through jax.distributed on localhost, reads its share of
the demo clips and trains on a (data=4) mesh spanning both processes. A sixth argument N makes
process 1 alone send itself SIGTERM (a stop that reaches one host) once it has saved step N, or
with N = 0 during set-up, once it has loaded the run's state; a stopped run exits with Stopped's
status."""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harnesses
pid, port, demo_root, run_dir, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
term_after = int(sys.argv[6]) if len(sys.argv) > 6 else None

from simulated import cpu_devices  # noqa: E402

cpu_devices(2)

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU

from mochi_jax.configs import lora as lora_config  # noqa: E402
from mochi_jax import train  # noqa: E402
from mochi_jax.lib import trainer  # noqa: E402

if term_after is not None and pid == "1":
    saved_one = trainer.save

    def save_then_term(run, step):
        saved_one(run, step)
        if step == term_after:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.save = save_then_term
    loaded_one = trainer.load_state

    def load_then_term(run):
        loaded_one(run)
        if term_after == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.load_state = load_then_term

cfg = lora_config.demo(lora_config.get_config(), demo_root)
cfg.run_dir = run_dir
cfg.steps = steps
cfg.batch_size = 4
cfg.log_every = 1
cfg.checkpoint.every = 2
cfg.validation.every = 0
cfg.distributed.enabled = True
cfg.distributed.coordinator = f"localhost:{port}"
cfg.distributed.num_processes = 2
cfg.distributed.process_id = int(pid)
try:
    train.train(cfg)
except trainer.Stopped as e:
    print(f"PROCESS {jax.process_index()}: {e}", flush=True)
    sys.exit(e.exit_status)
print(f"PROCESS {jax.process_index()} of {jax.process_count()} with {jax.device_count()} devices: done")
