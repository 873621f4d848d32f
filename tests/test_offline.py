"""Importing every module of the pack and running `generate --demo` makes no network request outside loopback.

A fresh interpreter installs a socket guard first (connect, connect_ex, create_connection, getaddrinfo: any target
outside 127.0.0.0/8, ::1 and localhost is recorded and refused), then imports every module under flux2_accel (the
engine, the nodes without ComfyUI, the root entry) and runs the CLI's demo. A control in the same interpreter
shows the guard does catch a foreign host, and lets loopback through."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

GUARD = '''
import ipaddress, json, socket

ATTEMPTS = []


def _loopback(host) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _check(what, address):
    if isinstance(address, (tuple, list)) and address:
        host = str(address[0])
    elif isinstance(address, (str, bytes)):  # a unix socket path: local by nature
        return
    else:
        host = repr(address)
    if not _loopback(host):
        ATTEMPTS.append([what, host])
        raise OSError(f"network guard: {what} to {host} refused")


_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex
_getaddrinfo, _create_connection = socket.getaddrinfo, socket.create_connection


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check("connect", address)
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        _check("connect_ex", address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host is not None:
        _check("getaddrinfo", (host.decode() if isinstance(host, bytes) else host,))
    return _getaddrinfo(host, *args, **kwargs)


def create_connection(address, *args, **kwargs):
    _check("create_connection", address)
    return _create_connection(address, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.getaddrinfo, socket.create_connection = getaddrinfo, create_connection
'''

RUN = '''
import importlib, pkgutil, sys
import flux2_accel
from flux2_accel.optim.cli import main as cli

imported = []
for info in pkgutil.walk_packages(flux2_accel.__path__, "flux2_accel."):
    if ".tests" in info.name or info.name.startswith("flux2_accel.tests") or ".scripts" in info.name:
        continue
    importlib.import_module(info.name)
    imported.append(info.name)
code = cli.main(["generate", "--demo", "-o", OUTPUT])
during_pack = list(ATTEMPTS)

# the control: a foreign host is caught, loopback passes
try:
    socket.create_connection(("huggingface.co", 443), timeout=1)
except OSError:
    pass
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
socket.create_connection(listener.getsockname(), timeout=1).close()
print(json.dumps({"imported": imported, "generate": code, "during_pack": during_pack, "control": ATTEMPTS[len(during_pack):]}))
'''


def test_importing_every_module_and_the_demo_make_no_network_request(tmp_path):
    output = tmp_path / "demo.png"
    code = GUARD + f"OUTPUT = {str(output)!r}\n" + textwrap.dedent(RUN)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["during_pack"] == [], seen["during_pack"]
    assert seen["generate"] == 0 and output.stat().st_size > 0
    modules = set(seen["imported"])
    assert {"flux2_accel.optim.run.engine", "flux2_accel.optim.serve.remote.client", "flux2_accel.optim.serve.queue_client",
            "flux2_accel.nodes.sampler", "flux2_accel.nodes.remote"} <= modules, sorted(modules)
    assert seen["control"] == [["create_connection", "huggingface.co"]]  # the guard can fail the test
