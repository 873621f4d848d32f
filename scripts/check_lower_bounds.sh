#!/usr/bin/env bash
# Lower-bound check (non-blocking; .ci/run does not call it): install EXACTLY the lowest version that
# pyproject.toml allows for every runtime and test dependency into a fresh venv, and run the suite.
# A pass proves the declared lower bounds are true; raise a bound in pyproject.toml AND requirements.txt when it
# fails. Exits with pytest's code.
#
# torch stays at 2.13.0, the version the pack is tested with: other torch releases are multi-GB CUDA downloads
# here, so "torch>=2.4" is the one bound this script does not exercise.
#
# Usage: scripts/check_lower_bounds.sh [pytest args...]   (KEEP_VENV=1 keeps the temp venv and prints its path)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/flux2-accel-lower-bounds.XXXXXX")
[ "${KEEP_VENV:-0}" = 1 ] && echo "venv: $work/venv" || trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
. "$work/venv/bin/activate"
pip install torch==2.13.0
# "pkg>=X" -> "pkg==X" for [project].dependencies and the "test" extra; a name without a bound stays as is.
# A tiny line parser, so the script needs no tomllib (Python 3.10) and no tomli.
mapfile -t pins < <(python - <<'PY'
import re
text = open("pyproject.toml").read()
def section(name):
    m = re.search(r"^" + re.escape(name) + r"\s*=\s*\[(.*?)\]", text, re.M | re.S)
    return re.findall(r'"([^"]+)"', m.group(1)) if m else []
for req in section("dependencies") + section("test"):
    name = re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0]
    if name.lower() == "torch":
        continue
    low = re.search(r">=\s*([^,;\s]+)", req)
    print(f"{name}=={low.group(1)}" if low else req)
PY
)
echo "lower bounds: ${pins[*]}"
pip install -e ".[test]" "${pins[@]}"
python -m pytest -q "$@"
