"""`flux2-accel serve`: the OpenAI-compatible image API on Ray Serve, from a TOML file or `--demo`.

The configuration was read and checked (args.check_serve) before this module, which starts Ray, is imported. It
deploys, prints where the API answers and which models serve, then waits; Ctrl-C removes the app, each replica
finishing its running requests first.
"""

from __future__ import annotations

import signal
import threading

from ..serve.ray_serve import launcher


def run(args) -> int:
    config = args.serve_config
    deployed = launcher.deploy(config, address=args.address, num_cpus=args.num_cpus)
    print(f"flux2-accel serve: the OpenAI image API answers on {deployed.url}/v1 "
          f"(key {'required: $' + config.server.api_key_env if config.server.api_key() else 'not required'})")
    for name, reason in deployed.models.items():
        print(f"  model {name}: {'ready' if reason is None else 'UNAVAILABLE: ' + reason}")
    if args.demo:
        print("note: --demo serves tiny RANDOM weights, so its images are noise; it shows the whole path working.")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    print("flux2-accel serve: stopping (running requests finish first)")
    launcher.undeploy(deployed.app_name)
    return 0
