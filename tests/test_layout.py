"""The package's shape: imports run one way (models < configs < checkpoints < lib < demo < command
support (cli, fit, targets) < commands),
no import cycles, commands run from any directory, and every sharded parameter has axis names."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mochi_jax
from mochi_jax.models import dit, lora
from mochi_jax.configs import dit as dit_configs

PACKAGE = Path(mochi_jax.__file__).parent
CONFIGS = Path(dit_configs.__file__).parent  # installed as mochi_jax.configs
LAYERS = ["models", "configs", "checkpoints", "lib", "demo", "cli", "commands"]
COMMANDS = {"train", "prepare", "sample", "evaluate", "aot"}


def layer_of(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    if part in COMMANDS:
        return "commands"
    return part if part in LAYERS else "cli"  # cli.py, fit.py, targets.py (the commands' support), __init__


def imports() -> dict[str, set[str]]:
    """{module: the mochi_jax modules it imports}, from the source (every import statement, also
    inside functions). configs/ counts as the package mochi_jax.configs it is installed as."""
    sources = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        sources[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    for f in CONFIGS.glob("*.py"):
        sources["mochi_jax.configs" + ("" if f.stem == "__init__" else f".{f.stem}")] = f
    out = {}
    for name, f in sources.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mochi_jax"):
                for a in node.names:  # `from mochi_jax.lib import sampling` imports mochi_jax.lib.sampling
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in sources else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("mochi_jax")}
        out[name] = found - {name}
    return out


def test_imports_run_one_way_and_have_no_cycles():
    graph = imports()
    assert {"mochi_jax.models.dit", "mochi_jax.lib.trainer", "mochi_jax.train"} <= set(graph)
    upward = [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})" for m, deps in graph.items() for d in deps
              if LAYERS.index(layer_of(d)) > LAYERS.index(layer_of(m))
              or (layer_of(m) == layer_of(d) == "commands" and d.split(".")[1] in COMMANDS)]
    assert not upward, "\n".join(upward)
    # cycles (packages count as importing what their __init__ imports)
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The layer test can fail: a models module importing lib is caught."""
    graph = imports()
    graph["mochi_jax.models.dit"] = graph["mochi_jax.models.dit"] | {"mochi_jax.lib.training"}
    monkeypatch.setattr(sys.modules[__name__], "imports", lambda: graph)
    with pytest.raises(AssertionError, match="mochi_jax.models.dit .models. imports mochi_jax.lib.training"):
        test_imports_run_one_way_and_have_no_cycles()


def test_a_layer_without_axis_names_fails_loudly(monkeypatch):
    cfg = dit.DiTConfig.from_dict(dit_configs.get_config("tiny"))
    targets = lora.targets_from_config(lora.REFERENCE_TARGETS)
    names = dit.logical_axes(cfg, targets)
    assert names["params"]["blocks"]["mlp_x"]["w2"]["kernel"] == ("layers", "mlp", "embed")
    assert names["lora"]["last_block"]["attn"]["proj_x"]["b"] == (None, "embed")
    real = dit._Base.dense

    def forgetful(self, features, name, axes, **kw):  # a new layer whose author forgot its names
        return real(self, features, name, () if name == "w2" else axes, **kw)

    monkeypatch.setattr(dit._Base, "dense", forgetful)
    with pytest.raises(ValueError, match=r"params/blocks/mlp_x/w2/kernel .*no logical axis names"):
        dit.logical_axes(cfg, targets)


def test_commands_run_from_any_directory(tmp_path):
    """From a folder outside the repository, the demo presets of train, prepare, sample and evaluate
    run with the installed package (configs/ found through mochi_jax.configs)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("PYTHONPATH", None)

    def run(*args):
        r = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    run("mochi_jax.prepare", "--config=configs/prepare.py:demo")
    assert (tmp_path / "runs/demo/cache/manifest.json").is_file() and (tmp_path / "runs/demo/clips").is_dir()
    out = run("mochi_jax.train", "--config=configs/lora.py:demo", "--config.run_dir=runs/demo/run",
              "--config.steps=4", "--config.checkpoint.every=4", "--config.validation.every=0")
    assert "done: 4 steps" in out and (tmp_path / "runs/demo/run/lora.safetensors").is_file()
    run("mochi_jax.sample", "--config=configs/sample.py:demo", "--config.sampling.steps=2",
        "--config.loras=runs/demo/run")
    assert list((tmp_path / "runs/demo/samples").glob("*.mp4"))
    config = Path(dit_configs.__file__).with_name("eval.py")  # an absolute path works too
    run("mochi_jax.evaluate", f"--config={config}:demo", "--config.sampling.steps=2", "--config.seeds=0")
    assert (tmp_path / "runs/demo/eval/report.json").is_file()
