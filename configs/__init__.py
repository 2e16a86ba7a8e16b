"""The commands' configuration files (installed as `mochi_jax.configs`). Shared blocks: common.py."""
