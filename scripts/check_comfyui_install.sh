#!/usr/bin/env bash
# check_comfyui_install.sh pip|uv: install the pack's requirements the way the README tells ComfyUI users to, into a
# fresh venv standing in for ComfyUI's Python (torch==2.13.0 first, then `pip install -r requirements.txt` with the
# newest pip, or `uv pip install -r requirements.txt`; torch must stay the one installed), then load the pack from its folder as ComfyUI does (a module
# named after the custom_nodes path) and list its nodes. .ci/run runs it for both installers, so a pip or uv
# release that cannot install the pack fails CI before users meet it.
set -euo pipefail
installer=${1:?usage: check_comfyui_install.sh pip|uv}
pack=$(realpath "$(dirname "$0")/..")
work=$(mktemp -d "${TMPDIR:-/tmp}/flux2-accel-install-$installer.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
case "$installer" in
  pip)
    "$py" -m pip install -q -U pip
    "$py" -m pip --version
    "$py" -m pip install -q torch==2.13.0
    "$py" -m pip install -q -r "$pack/requirements.txt" ;;
  uv)
    # torch as the README installs it (pip reads this machine's index settings for the CPU build; uv reads none of
    # them and would fetch the CUDA build): what is tested is uv installing the pack beside an installed torch
    "$py" -m pip install -q torch==2.13.0
    uv --version
    uv pip install -q --python "$py" -r "$pack/requirements.txt" ;;
  *) echo "unknown installer '$installer' (pip or uv)" >&2; exit 2 ;;
esac
cd "$work"  # not the pack's folder: the pack must load from its path alone, as ComfyUI loads it
"$py" - "$pack" <<'PY'
import importlib.util, sys
pack = sys.argv[1]
name = "flux2-accel"  # ComfyUI names a custom node module after its folder
spec = importlib.util.spec_from_file_location(name, f"{pack}/__init__.py", submodule_search_locations=[pack])
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
spec.loader.exec_module(module)
nodes = module.NODE_CLASS_MAPPINGS
assert "Flux2AccelSampler" in nodes, sorted(nodes)
import torch
assert torch.__version__ == "2.13.0+cpu", f"the installer replaced torch with {torch.__version__}"
import diffusers, transformers, bitsandbytes, peft, torch
print(f"loaded {len(nodes)} nodes with torch {torch.__version__}, diffusers {diffusers.__version__}, "
      f"transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, peft {peft.__version__}")
PY
