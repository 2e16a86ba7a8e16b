"""The declared floors are the checked ones: every `name>=version` of pyproject.toml's dependencies is
pinned at exactly that version in constraints/minimum.txt, which tools/check_versions.sh installs
and runs the demo with (the floors' own check, minutes long, not part of the suite)."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints" / "minimum.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[re.sub(r"[-_.]+", "-", name.lower())] = Version(version)
    return out


def test_every_declared_floor_is_pinned_in_the_minimum_constraints():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = pins()
    for dep in deps:
        req = Requirement(dep)
        floors = [s.version for s in req.specifier if s.operator == ">="]
        assert floors, f"{dep}: no floor"
        name = re.sub(r"[-_.]+", "-", req.name.lower())
        assert name in pinned, f"{name} has a floor in pyproject.toml but no pin in constraints/minimum.txt"
        assert pinned[name] == Version(floors[0]), f"{name}: pyproject.toml says >={floors[0]}, the checked pin is {pinned[name]}"
    assert pinned["jax"] == pinned["jaxlib"] >= Version("0.7.1")  # jax.set_mesh
