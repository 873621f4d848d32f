"""Start or join Ray, deploy the serve app, and wait until it answers: what `flux2-accel serve` and the tests run.

It imports Ray Serve and its HTTP stack, so only `flux2-accel serve` (once its configuration is good and
install.require_serve_installed has passed), the serve tests and scripts/bench_serve.py import it: the pack, the CLI's
`--help` and a refused configuration never load them. The deployments live in workers.py and ingress.py.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

from ray import serve
from ray.serve.config import HTTPOptions

from ...errors import ServeError
from ...parallel import group
from ..openai_api import key_digest
from .app import build_app
from .config import INGRESS_NAME, ServeConfig
from .status import is_starting, model_availability

log = logging.getLogger("flux2_accel")

APP_NAME = "flux2-accel"
READY_TIMEOUT_S = 300.0
_POLL_S = 0.25


@dataclass(frozen=True)
class Deployed:
    url: str  # http://host:port/prefix, what an OpenAI client takes as base_url (with /v1)
    app_name: str
    models: dict  # model -> None when it serves, else why not


def deploy(config: ServeConfig, *, address: str | None = None, num_cpus: int | None = None,
           app_name: str = APP_NAME, route_prefix: str = "/", timeout_s: float = READY_TIMEOUT_S,
           log_to_driver: bool = True) -> Deployed:
    """Deploy `config` on Ray (started here, or the cluster at `address` / RAY_ADDRESS) and wait until its ingress
    answers and each model either serves or has failed to load. Serve's HTTP proxy binds config.server's host and
    port on the first deployment in a cluster; later ones share it under their own route_prefix."""
    config.check_security()
    if not (address or os.environ.get("RAY_ADDRESS") or group.require_ray().is_initialized()):
        # This process starts the local Ray, so nothing of Serve's holds the port yet. (In a process that has
        # deployed before, Serve's proxy still holds it, and the new app shares it.)
        check_port_free(config.server.host, config.server.port)
    group.ray_started(num_cpus=num_cpus, address=address, log_to_driver=log_to_driver)
    key = config.server.api_key()
    try:
        serve.start(http_options=HTTPOptions(host=config.server.host, port=config.server.port))
        app = build_app(config, key_digest(key) if key else None, group.cluster_has_gpus())
        serve.run_many([serve.RunTarget(app, name=app_name, route_prefix=route_prefix)],
                       wait_for_applications_running=False)
    except Exception as e:
        raise ServeError(f"the serve app could not be deployed: {type(e).__name__}: {e}") from None
    models = wait_until_settled(config, app_name, timeout_s)
    prefix = route_prefix.rstrip("/")
    return Deployed(f"http://{config.server.host}:{config.server.port}{prefix}", app_name, models)


def check_port_free(host: str, port: int) -> None:
    """ServeError when something on this machine already listens on host:port. A local Ray's Serve proxy would
    bind it, and when it cannot, Ray retries forever and serve.start() never returns; so check before Ray starts.
    (On a cluster the proxy binds on the head node, which this process cannot probe.)"""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ServeError(f"server.host {host!r} does not resolve ({e.strerror}): give an address of this machine, "
                         "such as 127.0.0.1") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy's uvicorn binds: TIME_WAIT is free
        try:
            probe.bind(address)
        except OSError as e:
            raise ServeError(f"{host}:{port} is not free to serve on ({e.strerror}): stop what listens there, or "
                             "choose another port with --port or the config's server.port") from None


def wait_until_settled(config: ServeConfig, app_name: str, timeout_s: float) -> dict:
    """model -> None or why it does not serve, once the ingress runs and every model serves or has failed."""
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        deployments = app.deployments if app else {}
        ingress = deployments.get(INGRESS_NAME)
        if ingress is not None and ingress.status == "DEPLOY_FAILED":
            raise ServeError(f"the API ingress failed to start: {ingress.message}")
        models = model_availability(deployments, config.models)
        if ingress is not None and ingress.status == "HEALTHY" and not any(map(is_starting, models.values())):
            return models
        if time.monotonic() > deadline:
            raise ServeError(f"the serve app did not start within {timeout_s:g} s: ingress "
                             f"{ingress.status if ingress else 'not deployed'}, models {models}")
        time.sleep(_POLL_S)


def undeploy(app_name: str = APP_NAME) -> None:
    """Remove the app; each replica finishes its running requests first (graceful_shutdown_timeout_s)."""
    serve.delete(app_name)
