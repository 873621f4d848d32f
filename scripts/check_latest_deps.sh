#!/usr/bin/env bash
# Drift check (non-blocking; .ci/run does not call it): a fresh venv with the NEWEST release of every dependency
# the pack's ranges allow (no constraints file), then the suite, so a new release that breaks the pack is seen
# before users meet it; uv installs the same ranges into a second venv (scripts/check_comfyui_install.sh). CI itself
# installs with constraints/ci.txt. Exits with pytest's code.
#
# torch stays at 2.13.0 (installed first, as the README says): an unpinned torch pulls GBs of CUDA wheels.
#
# Usage: scripts/check_latest_deps.sh [pytest args...]   (KEEP_VENV=1 keeps the temp venv and prints its path)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/flux2-accel-latest-deps.XXXXXX")
[ "${KEEP_VENV:-0}" = 1 ] && echo "venv: $work/venv" || trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
. "$work/venv/bin/activate"
pip install torch==2.13.0
pip install -U -e ".[test]"
pip freeze --exclude-editable | grep -v -i '^torch==' > "$work/resolved.txt"
echo "--- resolved versions (compare with constraints/ci.txt):"
diff <(grep -v '^#' constraints/ci.txt | sort -f) <(sort -f "$work/resolved.txt") || true
echo "--- the same newest releases, installed with uv into a fresh venv:"
command -v uv >/dev/null || pip install -q uv
scripts/check_comfyui_install.sh uv
python -m pytest -q "$@"
