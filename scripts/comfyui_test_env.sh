#!/usr/bin/env bash
# comfyui_test_env.sh COMFYUI_DIR VENV: a Python environment in which the real-ComfyUI tests run that ComfyUI checkout
# on CPU. It installs torch==2.13.0 (CPU), ComfyUI's requirements without the packages that have no CPU build beside
# it here (torchvision, torchaudio; tests/comfyui_launcher.py stands in for them) or that only optional nodes use
# (kornia, spandrel, PyOpenGL, comfy-angle), then the pack's own requirements and test tools (constraints/ci.txt).
# Then:  COMFYUI_DIR=... COMFYUI_PYTHON=VENV/bin/python python -m pytest tests/test_comfyui_*.py tests/test_browser.py
# (the browser test also needs Debian's chromium: apt-get install chromium).
set -euo pipefail
comfy=$(realpath "$1"); venv=$2
pack=$(realpath "$(dirname "$0")/..")
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -U pip
"$venv/bin/pip" install -q torch==2.13.0
grep -v -E '^\s*(#|$)' "$comfy/requirements.txt" \
  | grep -v -i -E '^(torch|torchvision|torchaudio|kornia|spandrel|pyopengl|comfy-angle)\b' > "$venv/comfyui-requirements.txt"
"$venv/bin/pip" install -q -r "$venv/comfyui-requirements.txt"
# The pack's pins, less what ComfyUI pins itself (its frontend, templates, docs): the checkout's own frontend is tested.
"$venv/bin/python" - "$pack/constraints/ci.txt" "$venv/comfyui-requirements.txt" > "$venv/pack-constraints.txt" <<'PY'
import re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
comfy = {norm(l.split("==")[0]) for l in open(sys.argv[2]) if "==" in l}
print("".join(l for l in open(sys.argv[1]) if not (l.strip() and not l.startswith("#") and norm(re.split("[=<>]", l)[0].strip()) in comfy)))
PY
"$venv/bin/pip" install -q -c "$venv/pack-constraints.txt" -c "$venv/comfyui-requirements.txt" -r "$pack/requirements.txt" pytest playwright "ray>=2.50"
"$venv/bin/pip" list 2>/dev/null | grep -i -E '^comfyui[-_]frontend' 
echo "ready: COMFYUI_DIR=$comfy COMFYUI_PYTHON=$venv/bin/python"
