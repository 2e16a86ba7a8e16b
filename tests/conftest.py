import os
import sys

# Tests run on the CPU; keep XLA from grabbing every core of a 2-core CI machine twice over.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # configs/
