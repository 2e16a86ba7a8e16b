"""The commands the documentation gives: each `python -m mochi_jax.<command> ...` (or `python tools/<tool>.py
...`) in the code of README.md and docs/*.md, as argv. tests/test_docs.py parses them all;
tests/test_layout.py runs the demo's."""

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def documented_commands(pattern: str = r"python -m (mochi_jax\.\w+)(.*)") -> list[tuple[str, int, list[str]]]:
    """(file, line, argv) of every `python -m mochi_jax.<command> ...` (or what `pattern` matches: the
    command, then its arguments) in the docs' code, with continuation lines joined and shell comments,
    `&&` suffixes and ssh quoting taken off."""
    out = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            start, text = i, lines[i]
            while text.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            m = re.search(pattern, text)
            if not m or re.search(r"`python (-m|tools)", text) and "--config" not in text:
                continue  # a name in prose, not a command
            rest = m.group(2).split("  #")[0].split(" # ")[0].split(" && ")[0].strip().rstrip("'\"`").strip()
            try:
                argv = shlex.split(rest)
            except ValueError:
                argv = shlex.split(rest.replace("'", ""))
            out.append((doc.name, start + 1, [m.group(1), *argv]))
    return out
