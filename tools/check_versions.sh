#!/usr/bin/env bash
# usage: bash tools/check_versions.sh [--head] [--keep]
#
# Checks that mochi_jax runs with the oldest versions of its dependencies, pinned in
# constraints/minimum.txt (pyproject.toml's floors): makes a fresh venv in a temp
# dir, installs a copy of this checkout with `pip install -c constraints/minimum.txt -e .`, prints
# the installed versions of the core stack, then runs the demo commands there:
#   (a) train   python -m mochi_jax.train --config=configs/lora.py:demo   (120 steps)
#   (b) resume  the same command again (finds the finished run, resumes at its last step)
#   (c) extend  the same with --config.steps=130 (restores the train state and data position, trains on)
#   (d) sample  python -m mochi_jax.sample --config=configs/sample.py:demo --config.loras=RUN
#   (e) eval    python -m mochi_jax.evaluate --config=configs/eval.py:demo --config.loras=RUN
# Exits non-zero at the first failure, printing the end of that command's log.
#
#   --head   check the last commit (git archive HEAD) instead of the working tree
#   --keep   keep the temp dir (venv, logs, run) and print where it is
# Environment: PYTHON (default python3.11, else python3; 3.11 or newer). Needs PyPI (or a mirror pip
# is set up for); about 5 minutes on 2 CPU cores, most of it the install of jaxlib and the demo.
# The checkout itself is left untouched: the editable install and the demo's runs/ go to the copy.
set -euo pipefail

HEAD_ONLY=0
KEEP=0
for arg in "$@"; do
  case "$arg" in
    --head) HEAD_ONLY=1 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (usage: bash tools/check_versions.sh [--head] [--keep])" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "$PYTHON is $("$PYTHON" -V 2>&1); mochi_jax needs Python >= 3.11 (set PYTHON=...)" >&2; exit 2; }

TMP="$(mktemp -d "${TMPDIR:-/tmp}/mochi_versions.XXXXXX")"
cleanup() {
  if [ "$KEEP" = 1 ]; then echo "kept: $TMP (venv/, src/, work/, logs/)"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
SRC="$TMP/src"; WORK="$TMP/work"; LOGS="$TMP/logs"; RUN="$WORK/run"
mkdir -p "$SRC" "$WORK" "$LOGS"
START=$SECONDS

# 1. a copy of the checkout: the working tree (tracked and untracked, not ignored) or HEAD
if [ "$HEAD_ONLY" = 1 ]; then
  git -C "$REPO" archive HEAD | tar -x -C "$SRC"
  echo "checking HEAD $(git -C "$REPO" rev-parse --short HEAD) of $REPO"
elif git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  (cd "$REPO" && git ls-files -z -c -o --exclude-standard \
     | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
     | tar --null -T - -cf -) | tar -x -C "$SRC"
  echo "checking the working tree of $REPO (HEAD $(git -C "$REPO" rev-parse --short HEAD) plus uncommitted changes)"
else
  tar -C "$REPO" --exclude=./.venv --exclude=./runs --exclude=./build --exclude='*.egg-info' -cf - . | tar -x -C "$SRC"
  echo "checking $REPO (not a git checkout: copied whole)"
fi
CONSTRAINTS="$SRC/constraints/minimum.txt"
if [ ! -f "$CONSTRAINTS" ] && [ -f "$REPO/constraints/minimum.txt" ]; then  # --head before it was committed
  mkdir -p "$SRC/constraints" && cp "$REPO/constraints/minimum.txt" "$CONSTRAINTS"
  echo "(HEAD has no constraints/minimum.txt: using the working tree's)"
fi
[ -f "$CONSTRAINTS" ] || { echo "no constraints/minimum.txt in the checked tree" >&2; exit 1; }

# 2. a fresh venv with the pinned minimums
echo "== venv ($("$PYTHON" -V 2>&1)) and pip install -c constraints/minimum.txt -e . (log: install.log)"
"$PYTHON" -m venv "$TMP/venv"
PY="$TMP/venv/bin/python"
unset PYTHONPATH PIP_CONSTRAINT PIP_REQUIREMENT || true
if ! { "$PY" -m pip install -q --upgrade pip && "$PY" -m pip install -c "$CONSTRAINTS" -e "$SRC"; } \
     > "$LOGS/install.log" 2>&1; then
  echo "FAILED: install" >&2; tail -n 40 "$LOGS/install.log" >&2; exit 1
fi
echo "   $((SECONDS - START))s"

# 3. the installed versions against the pins (a pin of a package nothing requires is only reported)
echo "== installed versions (pinned in constraints/minimum.txt)"
"$PY" - "$CONSTRAINTS" <<'EOF'
import re, sys
from importlib import metadata
bad = []
pins = [re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", l.strip()) for l in open(sys.argv[1]) if l.strip() and not l.lstrip().startswith("#")]
for name, want in [(m[1], m[2]) for m in pins if m] + [("protobuf", None), ("chex", None), ("tensorstore", None)]:
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    note = "" if want is None else ("" if have == want else (" (not required by this tree)" if have is None else f"  != pin {want}"))
    if want is not None and have is not None and have != want:
        bad.append(name)
    print(f"   {name:18s} {have or '-'}{note}")
try:
    metadata.version("torch"); print("   note: torch is installed (nothing here needs it)")
except metadata.PackageNotFoundError:
    pass
sys.exit(f"installed versions differ from the pins: {bad}" if bad else 0)
EOF

# 4. the demo commands, in the copy's work dir (the demo writes runs/demo/ under the current dir)
cd "$WORK"
step() {  # step NAME COMMAND...: run it, log to logs/NAME.log, stop the check on a failure
  local name="$1"; shift
  local t=$SECONDS
  local rc=0
  echo "== ($name) python ${*:2}"
  "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  if [ "$rc" != 0 ]; then
    echo "FAILED: ($name), exit status $rc after $((SECONDS - t))s; the end of its log:" >&2
    tail -n 40 "$LOGS/$name.log" >&2
    exit 1
  fi
  echo "   ok, $((SECONDS - t))s"
}
need() {  # need WHAT PATH-GLOB...: fail unless one of the paths exists
  local what="$1"; shift
  compgen -G "$1" > /dev/null || { echo "FAILED: $what: nothing at $1" >&2; exit 1; }
}

TRAIN=("$PY" -m mochi_jax.train --config=configs/lora.py:demo --config.run_dir="$RUN")
step a-train "${TRAIN[@]}"
need "train: LoRA file" "$RUN/lora.safetensors"
need "train: checkpoint" "$RUN/checkpoints/*/_CHECKPOINT_METADATA"
need "train: validation video" "$RUN/samples/*.mp4"
step b-resume "${TRAIN[@]}"
grep -q "resumed from" "$LOGS/b-resume.log" || { echo "FAILED: (b-resume) did not resume:" >&2; tail -n 20 "$LOGS/b-resume.log" >&2; exit 1; }
step c-extend "${TRAIN[@]}" --config.steps=130
grep -q "done: 130 steps" "$LOGS/c-extend.log" || { echo "FAILED: (c-extend) did not reach step 130:" >&2; tail -n 20 "$LOGS/c-extend.log" >&2; exit 1; }
step d-sample "$PY" -m mochi_jax.sample --config=configs/sample.py:demo --config.loras="$RUN"
need "sample: video" "runs/demo/samples/*.mp4"
step e-evaluate "$PY" -m mochi_jax.evaluate --config=configs/eval.py:demo --config.loras="$RUN"
need "evaluate: report" "runs/demo/eval/report.json"

echo "PASSED: the minimum versions run the demo end to end ($((SECONDS - START))s in all)"
