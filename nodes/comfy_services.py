"""The one door to ComfyUI's services. Everything here degrades cleanly when ComfyUI is absent (tests, CLI).

Other node modules call these functions and never import ComfyUI themselves.
"""

from __future__ import annotations

import logging
import os

import torch

from ..optim.errors import ModelFileError

log = logging.getLogger("flux2_accel")

try:  # ComfyUI's modules exist only inside a running ComfyUI
    import folder_paths as _folder_paths  # type: ignore
except ImportError:  # pragma: no cover - exercised by the real-ComfyUI test
    _folder_paths = None

try:
    import comfy.model_management as _mm  # type: ignore
except ImportError:
    _mm = None

try:
    from comfy.cli_args import args as _comfy_args  # type: ignore
except ImportError:
    _comfy_args = None

IN_COMFYUI = _folder_paths is not None

# Fallback model roots outside ComfyUI (tests): FLUX2_ACCEL_MODELS_DIR/<folder_name>/...
_FALLBACK_ENV = "FLUX2_ACCEL_MODELS_DIR"


# A model folder walk follows symlinks (shared model stores are linked in) but never loops: each real folder is
# entered once, and depth and folder count are bounded, so a link cycle cannot freeze ComfyUI's start-up.
WALK_MAX_DEPTH = 16
WALK_MAX_FOLDERS = 10_000


def walk_model_folder(root: str):
    """(folder relative to root, file names, sub-folder names) for each real folder under `root`, once each.
    A caller may prune by editing the sub-folder list in place, as with os.walk."""
    seen: set[str] = set()
    pending = [(os.path.abspath(root), ".", 0)]
    while pending:
        path, rel, depth = pending.pop()
        real = os.path.realpath(path)
        if real in seen:
            continue
        if len(seen) >= WALK_MAX_FOLDERS:
            log.warning("flux2-accel: stopped listing '%s' after %d folders; the rest is not shown", root,
                        WALK_MAX_FOLDERS)
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            continue
        folders, files = [], []
        for entry in entries:
            try:
                (folders if entry.is_dir() else files).append(entry.name)
            except OSError:  # a dangling link or an entry that vanished
                continue
        yield rel, files, folders
        if depth + 1 > WALK_MAX_DEPTH:
            if folders:
                log.warning("flux2-accel: not listing below '%s' (more than %d folders deep)", path, WALK_MAX_DEPTH)
            continue
        for name in reversed(folders):
            pending.append((os.path.join(path, name), name if rel == "." else os.path.join(rel, name), depth + 1))


def list_models(folder_name: str) -> list[str]:
    """File names in one of ComfyUI's model folders (e.g. "diffusion_models"), sorted."""
    if _folder_paths is not None:
        try:
            return sorted(_folder_paths.get_filename_list(folder_name))
        except KeyError:
            return []
    root = os.environ.get(_FALLBACK_ENV)
    if not root or not os.path.isdir(os.path.join(root, folder_name)):
        return []
    out = []
    for rel, files, _ in walk_model_folder(os.path.join(root, folder_name)):
        out.extend(f if rel == "." else os.path.join(rel, f) for f in files)
    return sorted(out)


def list_diffusers_folders() -> list[str]:
    """Diffusers pipeline or component folders under models/diffusers (those with model_index.json or config.json)."""
    roots = (_folder_paths.get_folder_paths("diffusers") if _folder_paths is not None
             else [os.path.join(os.environ.get(_FALLBACK_ENV, ""), "diffusers")])
    found = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for rel, files, folders in walk_model_folder(root):
            if "model_index.json" in files or "config.json" in files:
                found.add(rel)
                if "model_index.json" in files:  # a pipeline: its components are not offered on their own
                    folders.clear()
    return sorted(found)


def resolve_model(folder_name: str, name: str) -> str:
    """Absolute path of `name` inside ComfyUI's `folder_name` folders. Names are never resolved elsewhere."""
    if not name:
        raise ModelFileError(f"No file chosen for {folder_name}: put a model in models/{folder_name} and pick it.")
    if _folder_paths is not None:
        if folder_name == "diffusers":
            for root in _folder_paths.get_folder_paths("diffusers"):
                candidate = _safe_join(root, name)
                if candidate and os.path.isdir(candidate):
                    return candidate
        else:
            path = _folder_paths.get_full_path(folder_name, name)
            if path:
                return path
        raise ModelFileError(f"'{name}' was not found in ComfyUI's models/{folder_name} folder(s). "
                             "Refresh the node (press R) after adding files.")
    root = os.path.join(os.environ.get(_FALLBACK_ENV, ""), folder_name)
    candidate = _safe_join(root, name)
    if candidate and os.path.exists(candidate):
        return candidate
    raise ModelFileError(f"'{name}' was not found in models/{folder_name}.")


def _safe_join(root: str, name: str) -> str | None:
    """root/name, or None if `name` could lead outside root (absolute, a drive, any '..' component).

    Containment is decided on the name as the user gives it, lexically, never on where a symlink points: a model
    folder or file that the user linked into a models folder (a shared model store) is theirs to use, while a name
    can only ever descend from root."""
    if not name or os.path.isabs(name) or os.path.splitdrive(name)[0] or name.startswith(("/", "\\")):
        return None
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return None
    root = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root, *parts))
    return path if os.path.commonpath([root, path]) == root else None


def comfy_dir(*parts) -> str | None:
    """A path inside the ComfyUI installation (e.g. its shipped tokenizers), or None outside ComfyUI."""
    if _folder_paths is None:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(_folder_paths.__file__)), *parts)


def user_directory() -> str | None:
    return _folder_paths.get_user_directory() if _folder_paths is not None else None


def user_settings_file() -> str | None:
    """ComfyUI's settings file for the default user, where the UI (or its /settings API) stores the pack's
    settings ("flux2accel.remote_token", "flux2accel.api_key", ...)."""
    user_dir = user_directory()
    return os.path.join(user_dir, "default", "comfy.settings.json") if user_dir else None


def listen_address() -> str:
    """The address(es) ComfyUI listens on (its --listen, comma-separated); loopback outside ComfyUI."""
    return str(getattr(_comfy_args, "listen", None) or "127.0.0.1")


def temp_directory() -> str | None:
    return _folder_paths.get_temp_directory() if _folder_paths is not None else None


def torch_device():
    if _mm is not None:
        return _mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def interrupt_requested() -> bool:
    """True when the user pressed Cancel in ComfyUI."""
    if _mm is None:
        return False
    return bool(_mm.processing_interrupted())


def raise_if_interrupted() -> None:
    if _mm is not None:
        _mm.throw_exception_if_processing_interrupted()


class Progress:
    """ComfyUI's progress bar with optional latent previews; a no-op outside ComfyUI."""

    def __init__(self, total: int):
        self.total = total
        self._bar = None
        self._previewer = None
        try:
            import comfy.utils  # type: ignore

            self._bar = comfy.utils.ProgressBar(total)
        except ImportError:
            return
        try:
            import comfy.latent_formats  # type: ignore
            import latent_preview  # type: ignore

            self._previewer = latent_preview.get_previewer(torch_device(), comfy.latent_formats.Flux2())
        except Exception:  # previews are a nicety; never fail a run over them
            self._previewer = None

    def update(self, step: int, latent_fn=None) -> None:
        if self._bar is None:
            return
        preview = None
        if self._previewer is not None and latent_fn is not None:
            try:
                latent = latent_fn()
                if latent.shape[1] == 128:  # the real FLUX.2 VAE; tiny test models have no preview factors
                    preview = self._previewer.decode_latent_to_preview_image("JPEG", latent[:1])
            except Exception:
                preview = None
        self._bar.update_absolute(step, self.total, preview)


_free_memory_callbacks: list = []


def on_free_memory(callback) -> None:
    """Call `callback` when ComfyUI unloads one of the pack's models (low memory, the "Free model and node cache"
    button). ComfyUI tells the pack through its own model management: the pack's models are ModelPatchers it
    tracks (nodes/native_model.py), whose unload runs `memory_released`. Nothing of ComfyUI is patched."""
    if callback not in _free_memory_callbacks:
        _free_memory_callbacks.append(callback)


def memory_released() -> None:
    for callback in list(_free_memory_callbacks):
        try:
            callback()
        except Exception:  # a failing callback must not break ComfyUI's own unloading
            log.exception("flux2-accel: releasing models failed")
