"""The OpenAI-compatible image API on ComfyUI's own server (docs/openai-api.md): the engine's routes
(optim/serve/openai_server.py) with ComfyUI's settings, its user folder and its own queue behind them.

Settings, read on every request (a changed key applies at once):
- the API key: FLUX2_ACCEL_API_KEY, else the ComfyUI setting "flux2accel.api_key" (never a widget);
- open access beyond loopback without a key: FLUX2_ACCEL_API_ALLOW_OPEN=1 or the setting "flux2accel.api_allow_open";
- limits: FLUX2_ACCEL_API_MAX_N (images per request, 10), FLUX2_ACCEL_API_MAX_QUEUE (queue depth, 16),
  FLUX2_ACCEL_API_TIMEOUT_S (one request's run, 900).
User models are API workflows in ComfyUI's user folder, user/flux2-accel/openai/NAME.json.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..optim.serve.openai_api import OpenAIError, is_loopback
from ..optim.serve.openai_executor import ComfyUIExecutor
from ..optim.serve.openai_models import load_models
from ..optim.serve.openai_server import ApiSettings, OpenAIRoutes
from ..optim.serve.remote.client import setting_from_settings_file
from . import comfy_services

log = logging.getLogger("flux2_accel")

API_KEY_ENV = "FLUX2_ACCEL_API_KEY"
ALLOW_OPEN_ENV = "FLUX2_ACCEL_API_ALLOW_OPEN"
SETTINGS_KEY_ID = "flux2accel.api_key"
SETTINGS_ALLOW_OPEN_ID = "flux2accel.api_allow_open"
LIMIT_ENVS = {"max_n": ("FLUX2_ACCEL_API_MAX_N", int), "max_queue_depth": ("FLUX2_ACCEL_API_MAX_QUEUE", int),
              "request_timeout_s": ("FLUX2_ACCEL_API_TIMEOUT_S", float)}
_TRUE = ("1", "true", "yes", "on")


def api_settings(environ=None, settings_file=None) -> ApiSettings:
    """The routes' settings from the environment and ComfyUI's settings file; a bad limit is a 500 naming it."""
    environ = os.environ if environ is None else environ
    settings_file = comfy_services.user_settings_file() if settings_file is None else settings_file
    key = environ.get(API_KEY_ENV, "").strip()
    if not key:
        stored = setting_from_settings_file(settings_file, SETTINGS_KEY_ID)
        key = stored.strip() if isinstance(stored, str) else ""
    stored_open = setting_from_settings_file(settings_file, SETTINGS_ALLOW_OPEN_ID)
    allow_open = environ.get(ALLOW_OPEN_ENV, "").strip().lower() in _TRUE or stored_open is True
    limits = {}
    for field, (name, kind) in LIMIT_ENVS.items():
        text = environ.get(name, "").strip()
        if not text:
            continue
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value >= 1 or value != value:
            raise OpenAIError(500, f"The environment variable {name} is '{text}': give a number, 1 or more.",
                              "server_error", None, "misconfigured")
        limits[field] = value
    return ApiSettings(api_key=key or None, listen_host=comfy_services.listen_address(), allow_open=allow_open,
                       **limits)


def user_models_dir() -> Path | None:
    user_dir = comfy_services.user_directory()
    return Path(user_dir, "flux2-accel", "openai") if user_dir else None


def own_base_url(request) -> str:
    """The address this request came in on: the executor queues on the very server that answers."""
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    host, port = (sockname[0], sockname[1]) if sockname else ("127.0.0.1", 8188)
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if request.secure else 'http'}://{host}:{port}"


def executor_for(request) -> ComfyUIExecutor:
    return ComfyUIExecutor(own_base_url(request))


def routes() -> OpenAIRoutes:
    return OpenAIRoutes(executor_for, lambda: load_models(user_models_dir()), api_settings)


def register(route_table) -> None:
    """Add the API's routes to ComfyUI's RouteTableDef, and warn once when it would answer only 401s."""
    routes().register(route_table)
    try:
        settings = api_settings()
    except OpenAIError as e:
        log.warning("flux2-accel OpenAI API: %s", e.message)
        return
    if not settings.api_key and not settings.allow_open and not is_loopback(settings.listen_host):
        log.warning("flux2-accel OpenAI API: ComfyUI listens on '%s', beyond loopback, and no API key is set, so "
                    "/v1/images answers 401: set %s (or the ComfyUI setting '%s'), or allow open access with %s=1.",
                    settings.listen_host, API_KEY_ENV, SETTINGS_KEY_ID, ALLOW_OPEN_ENV)
