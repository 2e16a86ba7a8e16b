import os
import sys

# Tests run on the CPU; keep XLA from grabbing every core of a 2-core CI machine twice over.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# reference harnesses (PyTorch reference runners, subprocess checks) live in tests/harness/
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "harness"))
