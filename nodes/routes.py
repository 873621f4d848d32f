"""HTTP routes the pack's frontend calls (web/flux2_accel.js), registered on ComfyUI's server when it runs, with the
OpenAI image API's (nodes/openai_routes.py).

GET /flux2accel/estimate?kind=diffusion_model|text_encoder&name=<model choice>&precision=<precision>
  200 {"bytes": 17812345678, "text": "≈17.8 GB at nf4"}  weight memory once loaded, read from the file's header
  400 {"error": "..."}                                   a name outside the model folders, a bad kind or precision,
                                                         a file that is not that model (the loader's message)
Nothing is loaded: the engine reads safetensors headers only (optim/models/estimate.py).
"""

from __future__ import annotations

import asyncio
import logging
import os

from ..optim.errors import Flux2AccelError
from ..optim.models import layouts
from ..optim.models.estimate import estimate_weight_bytes, format_bytes
from . import loaders, openai_routes

log = logging.getLogger("flux2_accel")

ESTIMATE_PATH = "/flux2accel/estimate"
# kind (the loader node's concern) -> (ComfyUI model folder, engine component)
KINDS = {"diffusion_model": ("diffusion_models", layouts.TRANSFORMER),
         "text_encoder": ("text_encoders", layouts.TEXT_ENCODER)}
_cache: dict = {}  # (path, size, mtime, precision) -> bytes; headers do not change while a file keeps its stamp


def estimate_reply(kind: str, name: str, precision: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) for one estimate request."""
    if kind not in KINDS:
        return 400, {"error": f"kind '{kind}' is not one of {', '.join(KINDS)}"}
    folder, component = KINDS[kind]
    if name not in loaders.model_choices(folder):  # only names the loader offers: nothing outside the model folders
        return 400, {"error": f"'{name}' is not a model in models/{folder}; refresh the node (press R) after adding "
                              "files"}
    try:
        path = loaders.resolve_choice(folder, name)
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns, precision)
        if key not in _cache:
            _cache[key] = estimate_weight_bytes(path, precision, component)
    except Flux2AccelError as e:
        return 400, {"error": str(e)}
    except OSError as e:
        return 400, {"error": f"'{name}' could not be read: {e.strerror or e}"}
    n = _cache[key]
    return 200, {"bytes": n, "text": f"≈{format_bytes(n)} at {precision}"}


async def estimate_handler(request):
    from aiohttp import web

    q = request.query
    try:
        status, body = await asyncio.to_thread(estimate_reply, q.get("kind", ""), q.get("name", ""),
                                               q.get("precision", ""))
    except Exception:  # a bug must not surface as a traceback in the UI or take the server down
        log.exception("flux2-accel: estimating weight memory failed")
        status, body = 500, {"error": "the estimate failed; see ComfyUI's log"}
    return web.json_response(body, status=status)


def register(routes) -> None:
    """Add the pack's routes to an aiohttp RouteTableDef (ComfyUI's PromptServer.instance.routes)."""
    routes.get(ESTIMATE_PATH)(estimate_handler)


def register_with_comfyui() -> bool:
    """Register on ComfyUI's running server; False (and nothing done) outside ComfyUI."""
    try:
        from server import PromptServer  # type: ignore
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    register(instance.routes)
    openai_routes.register(instance.routes)
    return True
