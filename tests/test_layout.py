"""The package's shape: imports run one way (stderr < models < configs < checkpoints < lib < demo < cli <
commands; the fit check's package mochi_jax.aot is a command), no import cycles, imports of the
project at the top of a module (the commands' entry points excepted), no private names across
modules, configs that are settings, one way from a command's `model` block to the DiT's config,
commands that run from any directory, and every sharded parameter with axis names."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mochi_jax
from docs_commands import documented_commands
from mochi_jax.models import dit, lora
from mochi_jax.configs import dit as dit_configs

PACKAGE = Path(mochi_jax.__file__).parent
CONFIGS = Path(dit_configs.__file__).parent  # installed as mochi_jax.configs
LAYERS = ["stderr", "models", "configs", "checkpoints", "lib", "demo", "cli", "commands"]  # stderr.py: stdlib only
COMMANDS = {"train", "prepare", "sample", "evaluate", "aot"}


def layer_of(module: str) -> str:
    part = module.split(".")[1] if "." in module else ""
    if part in COMMANDS:
        return "commands"
    return part if part in LAYERS else "cli"  # cli.py (the commands' support), __init__


def sources() -> dict[str, Path]:
    """{module name: its file}; configs/ counts as the package mochi_jax.configs it is installed as."""
    out = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    for f in CONFIGS.glob("*.py"):
        out["mochi_jax.configs" + ("" if f.stem == "__init__" else f".{f.stem}")] = f
    return out


def imports() -> dict[str, set[str]]:
    """{module: the mochi_jax modules it imports}, from the source (every import statement, also
    inside functions)."""
    files = sources()
    out = {}
    for name, f in files.items():
        found = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mochi_jax"):
                for a in node.names:  # `from mochi_jax.lib import sampling` imports mochi_jax.lib.sampling
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in files else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("mochi_jax")}
        out[name] = found - {name}
    return out


def test_imports_run_one_way_and_have_no_cycles():
    graph = imports()
    assert {"mochi_jax.models.dit", "mochi_jax.lib.trainer", "mochi_jax.train"} <= set(graph)
    upward = [f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})" for m, deps in graph.items() for d in deps
              if LAYERS.index(layer_of(d)) > LAYERS.index(layer_of(m))
              or (layer_of(m) == layer_of(d) == "commands" and d.split(".")[1] in COMMANDS
                  and d.split(".")[1] != m.split(".")[1])]  # a command's own package (aot) excepted
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


ENTRY_POINTS = {"mochi_jax.aot.__main__"}  # may import after setting the environment jax reads at import


def project_imports(node) -> list:
    """The import statements of the project's own modules directly in `node`'s body and below it."""
    return [n for n in ast.walk(node) if (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("mochi_jax"))
            or (isinstance(n, ast.Import) and any(a.name.startswith("mochi_jax") for a in n.names))]


def test_project_imports_are_at_the_top_and_public():
    """No module imports the project inside a function (the commands' entry points excepted: they
    set the environment jax reads first), and none imports another module's private (_name) names."""
    local, private = [], []
    for name, f in sources().items():
        tree = ast.parse(f.read_text())
        if name not in ENTRY_POINTS:
            for fn in ast.walk(tree):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    local += [f"{name}:{n.lineno} (in {fn.name})" for n in project_imports(fn)]
        for n in project_imports(tree):
            if isinstance(n, ast.ImportFrom):
                private += [f"{name}:{n.lineno} imports {n.module}.{a.name}" for a in n.names
                            if a.name.startswith("_")]
    assert not sorted(set(local)), "function-local imports of the project:\n" + "\n".join(sorted(set(local)))
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_configs_are_settings():
    """configs/ imports nothing of the project above configs/ (its own files and constants of the
    models below it), so the library never needs a config file's code."""
    graph = imports()
    bad = [f"{m} imports {d}" for m, deps in graph.items() if m.startswith("mochi_jax.configs") for d in deps
           if not (d.startswith("mochi_jax.configs") or d.startswith("mochi_jax.models"))]
    assert not bad, "\n".join(bad)
    above = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
             if d.startswith("mochi_jax.configs") and layer_of(m) in ("models",)]
    assert not above, "\n".join(above)


def test_the_checkers_see_a_local_and_a_private_import(tmp_path, monkeypatch):
    """The import-style test can fail: a function-local project import and a private name are caught."""
    f = tmp_path / "bad.py"
    f.write_text("def f():\n    from mochi_jax.lib import sampling\n\nfrom mochi_jax.aot.fit import _arch\n")
    monkeypatch.setattr(sys.modules[__name__], "sources", lambda: {"mochi_jax.lib.bad": f})
    with pytest.raises(AssertionError, match=r"mochi_jax.lib.bad:2 \(in f\)"):
        test_project_imports_are_at_the_top_and_public()
    f.write_text("from mochi_jax.aot.fit import _arch\n")
    with pytest.raises(AssertionError, match=r"imports mochi_jax.aot.fit._arch"):
        test_project_imports_are_at_the_top_and_public()


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


# What keeps the documented demo commands short here: (command, flags appended)
SHORTER = {"mochi_jax.prepare": (), "mochi_jax.train": ("--config.steps=4", "--config.checkpoint.every=4",
                                                        "--config.validation.every=0"),
           "mochi_jax.sample": ("--config.sampling.steps=2",),
           "mochi_jax.evaluate": ("--config.sampling.steps=2", "--config.seeds=0")}


def demo_commands() -> dict[str, list[str]]:
    """{command: argv} of the demo's documented commands (README.md, docs/): the first of each command
    whose config is a ':demo' preset."""
    out = {}
    for _, _, argv in documented_commands():
        if argv[0] in SHORTER and any(a.startswith("--config=") and a.endswith(":demo") for a in argv):
            out.setdefault(argv[0], argv)
    return out


@pytest.mark.slow
def test_the_documented_demo_commands_run_from_any_directory(tmp_path):
    """The demo's prepare, train, sample and evaluate, as README.md and docs/ give them (made shorter by
    SHORTER's flags), run from a folder outside the repository with the installed package (configs/
    found through mochi_jax.configs), one after the other on the same demo folder."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("PYTHONPATH", None)
    commands = demo_commands()
    assert set(commands) == set(SHORTER), commands  # each command of the demo is documented

    def run(command):
        argv = [*commands[command], *SHORTER[command]]
        r = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, " ".join(argv) + "\n" + r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    run("mochi_jax.prepare")
    assert (tmp_path / "runs/demo/cache/manifest.json").is_file() and (tmp_path / "runs/demo/clips").is_dir()
    out = run("mochi_jax.train")
    assert "done: 4 steps" in out and (tmp_path / "runs/demo/run/lora.safetensors").is_file()
    assert out.startswith("mochi_jax.train: devices: 1 x cpu (cpu)\n"), out[:300]  # what the run runs on
    run("mochi_jax.sample")
    assert list((tmp_path / "runs/demo/samples").glob("*.mp4"))
    run("mochi_jax.evaluate")
    assert (tmp_path / "runs/demo/eval/report.json").is_file() and (tmp_path / "runs/demo/eval/report.html").is_file()
