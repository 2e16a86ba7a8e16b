"""Random weights drawn on the host, for the multi-device harnesses."""

import numpy as np
from flax import traverse_util


def random_like(shapes, seed):
    """mochi_jax.demo.random_like's weights drawn with NumPy, as numpy: normal / sqrt(fan_in) for
    matrices and kernels, ones for norm weights, zeros for biases (jax.random would compile a program
    per leaf shape, or one slow one for the tree: seconds before any check starts)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, s in sorted(traverse_util.flatten_dict(shapes).items()):
        if len(s.shape) >= 2:
            fan_in = max(1, int(np.prod(s.shape[:-1])) // (s.shape[0] if path[0] == "blocks" else 1))
            out[path] = (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(s.dtype)
        else:
            out[path] = (np.ones if path[-1] in ("scale", "weight") else np.zeros)(s.shape, s.dtype)
    return traverse_util.unflatten_dict(out)
