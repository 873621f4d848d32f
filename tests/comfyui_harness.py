"""What the real-ComfyUI tests share: starting ComfyUI (on CPU, through tests/comfyui_launcher.py, on a free loopback
port, with the pack and any test-only node folders linked into custom_nodes), stopping it, and its HTTP calls.

COMFYUI_DIR names the ComfyUI checkout (tests that need it skip without it); COMFYUI_PYTHON the interpreter that has
ComfyUI's requirements (default: the one running pytest).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
needs_comfyui = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to run the pack in a real ComfyUI")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def history_entry(url: str, prompt_id: str, timeout: float = 10) -> dict:
    """A finished prompt's /history entry. ComfyUI 0.33 may send execution_interrupted before it writes the entry,
    so a test that reads it right after that message asks again for a short while."""
    deadline = time.time() + timeout
    while True:
        entry = get_json(f"{url}/history/{prompt_id}").get(prompt_id)
        if entry or time.time() > deadline:
            assert entry, f"/history has no entry for prompt {prompt_id} after {timeout:g} s"
            return entry
        time.sleep(0.1)


def post_json(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def wait_until_serving(url: str, proc: subprocess.Popen, log_path: Path, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            get_json(url, timeout=2)
            return
        except urllib.error.HTTPError:  # it answered: serving, even if not this path
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"{what} did not start:\n{Path(log_path).read_text()[-3000:]}")
            time.sleep(1)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def comfyui_base(tmp_path_factory, name: str, node_folders: tuple[Path, ...] = ()) -> Path:
    """A ComfyUI base directory with the pack (and `node_folders`) linked into custom_nodes."""
    base = tmp_path_factory.mktemp(name)
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "flux2-accel")
    for folder in node_folders:
        os.symlink(folder, base / "custom_nodes" / folder.name)
    return base


@contextlib.contextmanager
def running_comfyui(base: Path, extra_args: tuple[str, ...] = (), env: dict | None = None):
    """ComfyUI on CPU over `base`, serving on a free loopback port: yields (url, log_path, process)."""
    port = free_port()
    log_path = base / "comfyui.log"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [python, "-u", str(ROOT / "tests" / "comfyui_launcher.py"), COMFYUI_DIR, "--cpu", "--listen",
             "127.0.0.1", "--port", str(port), "--base-directory", str(base), "--database-url",
             "sqlite:///:memory:", "--disable-api-nodes", *extra_args],
            cwd=COMFYUI_DIR, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {}), "PYTHONDONTWRITEBYTECODE": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_serving(url + "/system_stats", proc, log_path, "ComfyUI")
            yield url, log_path, proc
        finally:
            stop(proc)
