"""What Serve's status says of each model: None when a replica of its Generator serves, else why not. The ingress
answers /v1/models and refuses requests (503) with it; the launcher waits on it. Reads Serve's status objects
(serve.status()), imports no Ray."""

from __future__ import annotations

import re

from .config import generator_name

STARTING = "it is starting (its replicas are loading the model)"
MAX_REASON_CHARS = 600
_SERVING_STATES = ("HEALTHY", "UPSCALING", "DOWNSCALING")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def model_availability(deployments: dict, models) -> dict:
    """model -> None (serving) or the reason, from an application's deployments (name -> DeploymentStatusOverview)."""
    return {name: _reason(name, deployments.get(generator_name(name))) for name in models}


def _reason(model: str, deployment) -> str | None:
    if deployment is None:
        return STARTING
    status = _name(deployment.status)
    running = sum(count for state, count in deployment.replica_states.items() if _name(state) == "RUNNING")
    if running and status in _SERVING_STATES:
        return None
    return load_failure(model, deployment.message) or (
        STARTING if status in ("UPDATING", "UPSCALING") else f"{status.lower()}: {_short(deployment.message)}")


def is_starting(reason: str | None) -> bool:
    return reason == STARTING


def load_failure(model: str, message: str) -> str | None:
    """The Generator's own reason (RuntimeError "model 'x' cannot load: ...") from Serve's deployment message, which
    wraps it in a traceback with terminal colours; None when the message holds none."""
    text = _ANSI.sub("", message or "")
    start = text.rfind(f"model '{model}' cannot load: ")
    return _short(text[start:]) if start >= 0 else None


def _name(enum_value) -> str:
    return str(getattr(enum_value, "value", enum_value)).split(".")[-1].upper()


def _short(text: str) -> str:
    text = " ".join(_ANSI.sub("", text or "").split())
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."
