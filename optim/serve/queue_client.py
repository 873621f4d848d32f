"""`flux2-accel queue`: run any API-format workflow on a running ComfyUI over its HTTP API, from a terminal.

The client speaks ComfyUI's public API only (it is an HTTP client; it never imports ComfyUI):
  GET  /system_stats                    is the server there (checked before anything is queued)
  WS   /ws?clientId=ID                  progress of this client's prompts (`executing`, `progress`, `executed`,
                                        `execution_error`, `execution_success`); binary frames are previews
  POST /prompt {"prompt", "client_id"}  queue; HTTP 400 with `node_errors` when the graph does not validate
  GET  /history/{prompt_id}             outputs and final status of a finished prompt
  GET  /view?filename=&subfolder=&type= the bytes of one output image
The OpenAI image API's executor (openai_executor.py) also uses, through the same Client:
  GET  /queue                           the running and pending prompts (the queue's depth)
  POST /upload/image                    a reference image into ComfyUI's input folder, for LoadImage
  POST /queue {"delete": [id]}          take a pending prompt off the queue
  POST /interrupt {"prompt_id": id}     stop that prompt if it is the one running (nothing else)

Prompts run one after another (each waits for the previous one), so the time printed per prompt is its own.
Exit codes: 0 all prompts succeeded; 1 a prompt failed validation or execution (node, class type and ComfyUI's
message are printed); 2 a usage problem found before anything was queued (file, --set, server), via the CLI.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import Flux2AccelError, InputError
from .deadline import deadline

DEFAULT_SERVER = "http://127.0.0.1:8188"
# The deadline of each HTTP exchange (connect, send, headers, whole body) when --timeout is 0 (a prompt may run as
# long as it needs, but a request that is answered at all is answered in seconds).
DEFAULT_REQUEST_DEADLINE_S = 60.0
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_SET_SYNTAX = "NODE_ID.input=value"


class QueueError(Flux2AccelError):
    """ComfyUI could not be reached, or answered something that is not ComfyUI's API."""


def add_arguments(p) -> None:
    p.add_argument("workflow", help="API-format workflow JSON (ComfyUI: Workflow > Export (API))")
    p.add_argument("--server", default=DEFAULT_SERVER, help=f"ComfyUI's address (default {DEFAULT_SERVER})")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar=_SET_SYNTAX,
                   help="change one input before queueing, e.g. --set 5.seed=42 --set 5.steps=20 (repeatable). "
                        "Values are read as JSON when they parse (numbers, true/false, lists), else as text")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="queue the same graph N times, one after another (seeds are not changed: use --set)")
    p.add_argument("--output", "-o", default=".", metavar="OUTDIR",
                   help="folder for the output images, saved as <prompt id>_<node id>_<n>.<ext> (default: .)")
    p.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                   help="give up on a prompt after this long; each HTTP request to ComfyUI (its whole exchange: "
                        "connect, headers, body) also gets this deadline (default 0: wait as long as a prompt "
                        f"runs, {DEFAULT_REQUEST_DEADLINE_S:g} s per request)")


# ---------------------------------------------------------------- the graph and --set


def load_workflow(path: str) -> dict:
    """The API-format graph in `path`: {node_id: {"class_type": ..., "inputs": {...}}}."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"workflow '{path}' is a folder: give the API-format workflow JSON file (e.g. one of the "
                         "pack's workflows/*_api.json)")
    if not p.is_file():
        raise InputError(f"workflow file '{path}' does not exist")
    try:
        graph = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"workflow file '{path}' is not readable JSON: {e}") from None
    except RecursionError:
        raise InputError(f"workflow file '{path}' nests its JSON too deeply to be a workflow") from None
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise InputError(f"'{path}' is a UI-format workflow (it has 'nodes' and 'links'); the API needs the API "
                         "format: in ComfyUI use Workflow > Export (API), or take the pack's workflows/*_api.json")
    if not isinstance(graph, dict) or not graph or not all(
            isinstance(node, dict) and "class_type" in node and isinstance(node.get("inputs", {}), dict)
            for node in graph.values()):
        raise InputError(f"'{path}' is not an API-format workflow: expected an object of node ids, each with "
                         "'class_type' and 'inputs'")
    return graph


def parse_value(text: str):
    """JSON when it parses (42, 1.5, true, [1, 2], "quoted"), else the text itself."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return text


def apply_sets(graph: dict, sets: list[str]) -> dict:
    """A copy of `graph` with each NODE_ID.input=value applied; the node and the input must exist."""
    out = json.loads(json.dumps(graph))
    for item in sets:
        target, eq, value = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not eq or not dot or not node_id or not name:
            raise InputError(f"--set '{item}' is not {_SET_SYNTAX} (e.g. --set 5.seed=42)")
        if node_id not in out:
            raise InputError(f"--set '{item}': the workflow has no node '{node_id}' "
                             f"(its nodes: {', '.join(sorted(out, key=_node_order))})")
        inputs = out[node_id].setdefault("inputs", {})
        if name not in inputs:
            raise InputError(f"--set '{item}': node {node_id} ({out[node_id]['class_type']}) has no input "
                             f"'{name}' (its inputs: {', '.join(inputs) or 'none'})")
        inputs[name] = parse_value(value)
    return out


def _node_order(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


# ---------------------------------------------------------------- talking to ComfyUI


@dataclass
class PromptResult:
    prompt_id: str
    seconds: float
    images: list[Path] = field(default_factory=list)
    error: str | None = None  # set when the prompt failed; names node, class type and ComfyUI's message


def _base_url(server: str) -> str:
    url = server if "://" in server else "http://" + server
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"--server '{server}' is not an http(s) address such as {DEFAULT_SERVER}")
    return url.rstrip("/")


def _ws_url(base: str, client_id: str) -> str:
    return ("wss" if base.startswith("https") else "ws") + base[base.index("://"):] + f"/ws?clientId={client_id}"


def format_node_errors(reply: dict, graph: dict) -> str:
    """ComfyUI's 400 reply to POST /prompt as lines: node id, class type, each reason."""
    lines = []
    error = reply.get("error")
    if isinstance(error, dict):
        lines.append(f"ComfyUI rejected the prompt: {error.get('message', '')}".rstrip(": "))
    elif error:
        lines.append(f"ComfyUI rejected the prompt: {error}")
    for node_id, info in (reply.get("node_errors") or {}).items():
        class_type = info.get("class_type") or graph.get(node_id, {}).get("class_type", "?")
        for reason in info.get("errors") or [{}]:
            message = reason.get("message", "invalid")
            details = reason.get("details")
            lines.append(f"  node {node_id} ({class_type}): {message}" + (f": {details}" if details else ""))
    if len(lines) == 1 and isinstance(error, dict) and error.get("details"):
        lines.append(f"  {error['details']}")
    return "\n".join(lines) or f"ComfyUI rejected the prompt: {json.dumps(reply)[:500]}"


def format_execution_error(message: dict) -> str:
    node = message.get("node_id", "?")
    kind = message.get("exception_type", "error")
    return (f"node {node} ({message.get('node_type', '?')}) failed: {kind}: "
            f"{str(message.get('exception_message', '')).strip()}")


def error_from_history(entry: dict) -> str | None:
    status = entry.get("status") or {}
    if status.get("status_str") != "error":
        return None
    for event, data in status.get("messages") or []:
        if event == "execution_error":
            return format_execution_error(data)
        if event == "execution_interrupted":
            return f"node {data.get('node_id', '?')} ({data.get('node_type', '?')}): interrupted"
    return "the prompt failed (ComfyUI's history gives no message)"


def output_images(entry: dict):
    """(node_id, index, {filename, subfolder, type}) for every image of every output node."""
    for node_id, output in (entry.get("outputs") or {}).items():
        for index, image in enumerate(output.get("images") or []):
            if isinstance(image, dict) and image.get("filename"):
                yield node_id, index, image


class Client:
    """ComfyUI's HTTP API. Every exchange (connect, send, headers and the whole body) has one deadline,
    `deadline` seconds, so a server that stalls at any step, or drips its reply, cannot hold the client."""

    def __init__(self, session, base: str, client_id: str, deadline: float = DEFAULT_REQUEST_DEADLINE_S):
        self.session, self.base, self.client_id, self.deadline = session, base, client_id, deadline

    async def within_deadline(self, step: str, exchange):
        """Await `exchange` (a coroutine doing one whole request); QueueError naming the server and `step` if it
        takes longer than the deadline, or if the connection fails."""
        import aiohttp

        try:
            async with deadline(self.deadline):
                return await exchange
        except asyncio.TimeoutError:
            raise QueueError(f"ComfyUI at {self.base} did not answer {step} within {self.deadline:g} s "
                             "(--timeout): is the server stuck or overloaded?") from None
        except aiohttp.ClientError as e:
            raise QueueError(f"ComfyUI at {self.base} is not reachable ({step}: {e}): start it, or pass "
                             "--server") from None

    async def _json(self, method: str, path: str, **kwargs):
        import aiohttp

        async def exchange():
            async with self.session.request(method, self.base + path, **kwargs) as reply:
                try:
                    body = await reply.json(content_type=None)
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, aiohttp.ContentTypeError):
                    raise QueueError(f"{self.base}{path} answered HTTP {reply.status} with something that is not "
                                     "JSON: is this ComfyUI?") from None
                return reply.status, body

        return await self.within_deadline(f"{method} {path}", exchange())

    async def check_server(self) -> None:
        status, body = await self._json("GET", "/system_stats")
        if status != 200 or not isinstance(body, dict) or "system" not in body:
            raise QueueError(f"{self.base} does not look like ComfyUI (GET /system_stats answered HTTP {status})")

    async def connect_websocket(self):
        import aiohttp

        url = _ws_url(self.base, self.client_id)
        try:
            # ws_close: leaving (after an error, too) waits at most this long for the server's close frame
            return await self.within_deadline("the websocket /ws handshake", self.session.ws_connect(
                url, heartbeat=30, max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=min(self.deadline, 5))))
        except aiohttp.WSServerHandshakeError as e:
            raise QueueError(f"ComfyUI at {self.base} refused its websocket /ws ({e})") from None

    async def queue(self, graph: dict, extra_data: dict | None = None,
                    broadcast: bool = False) -> tuple[str | None, str | None]:
        """(prompt_id, None) once queued, or (None, lines naming each invalid node) on HTTP 400. `extra_data` goes
        with the prompt (ComfyUI reads `preview_method` from it, per prompt). A `broadcast` prompt carries no client
        id, so ComfyUI sends its progress and previews to every connected client (the UI's too), as for a prompt
        queued by any API client; this client's websocket still receives them."""
        payload = {"prompt": graph, **({} if broadcast else {"client_id": self.client_id}),
                   **({"extra_data": extra_data} if extra_data else {})}
        status, body = await self._json("POST", "/prompt", json=payload)
        if status == 400 and isinstance(body, dict):
            return None, format_node_errors(body, graph)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("prompt_id"), str):
            raise QueueError(f"POST {self.base}/prompt answered HTTP {status}: {json.dumps(body)[:500]}")
        if body.get("node_errors"):  # some outputs are invalid but others run; say so, like ComfyUI's own UI
            print(format_node_errors({"node_errors": body["node_errors"]}, graph), file=sys.stderr)
        return body["prompt_id"], None

    async def queue_depth(self) -> int:
        """How many prompts are running or waiting in ComfyUI's queue."""
        status, body = await self._json("GET", "/queue")
        if status != 200 or not isinstance(body, dict):
            raise QueueError(f"GET {self.base}/queue answered HTTP {status}")
        return sum(len(body.get(key) or []) for key in ("queue_running", "queue_pending"))

    async def upload_image(self, data: bytes, filename: str) -> str:
        """Put `data` into ComfyUI's input folder; the name LoadImage takes for it."""
        import aiohttp

        form = aiohttp.FormData()
        form.add_field("image", data, filename=filename, content_type="image/png")
        form.add_field("type", "input")
        status, body = await self._json("POST", "/upload/image", data=form)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise QueueError(f"POST {self.base}/upload/image answered HTTP {status}: {json.dumps(body)[:300]}")
        return f"{body['subfolder']}/{body['name']}" if body.get("subfolder") else body["name"]

    async def cancel(self, prompt_id: str) -> None:
        """Take `prompt_id` off the queue if it waits, and stop it if it runs; other prompts are left alone."""
        await self._exchange("POST", "/queue", json={"delete": [prompt_id]})
        await self._exchange("POST", "/interrupt", json={"prompt_id": prompt_id})

    async def _exchange(self, method: str, path: str, **kwargs) -> int:
        """One request whose reply body does not matter (ComfyUI answers these with an empty 200); its status."""
        async def exchange():
            async with self.session.request(method, self.base + path, **kwargs) as reply:
                await reply.read()
                return reply.status

        return await self.within_deadline(f"{method} {path}", exchange())

    async def history(self, prompt_id: str, attempts: int = 20) -> dict:
        """The finished prompt's /history entry (asked again briefly if it is not written yet)."""
        for _ in range(attempts):
            entry = await self.history_entry(prompt_id)
            if entry:
                return entry
            await asyncio.sleep(0.25)
        raise QueueError(f"prompt {prompt_id} finished but ComfyUI's /history has no entry for it")

    async def history_entry(self, prompt_id: str) -> dict | None:
        """The prompt's /history entry, or None while it waits or runs (ComfyUI writes it when the prompt ends)."""
        status, body = await self._json("GET", f"/history/{prompt_id}")
        if status != 200 or not isinstance(body, dict):
            raise QueueError(f"GET {self.base}/history/{prompt_id} answered HTTP {status}")
        entry = body.get(prompt_id)
        return entry if isinstance(entry, dict) and entry else None

    async def image(self, image: dict) -> bytes:
        params = {"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                  "type": image.get("type", "output")}

        async def exchange():
            async with self.session.get(self.base + "/view", params=params) as reply:
                if reply.status != 200:
                    raise QueueError(f"GET {self.base}/view for '{image['filename']}' answered HTTP {reply.status}")
                return await reply.read()

        return await self.within_deadline(f"GET /view for '{image['filename']}'", exchange())


class ProgressView:
    """One tqdm bar per prompt: the running node (id and class type) and its step count."""

    def __init__(self, graph: dict, label: str):
        from tqdm import tqdm

        self.graph = graph
        self.bar = tqdm(total=0, desc=label, unit="step", file=sys.stderr, leave=True, dynamic_ncols=True)
        self.label = label
        self.current = None

    def node(self, node_id: str | None) -> None:
        if node_id is None or node_id == self.current:
            return
        self.current = node_id
        class_type = self.graph.get(str(node_id), {}).get("class_type", "?")
        self.bar.set_description(f"{self.label} node {node_id} {class_type}")
        self.bar.reset(total=0)

    def step(self, value: int, total: int, node_id: str | None) -> None:
        self.node(node_id)
        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.n = value
        self.bar.refresh()

    def close(self, outcome: str) -> None:
        self.bar.set_description(f"{self.label} {outcome}")
        self.bar.close()

    def preview(self, image: bytes) -> None:
        """A latent preview (encoded image bytes); a terminal has nowhere to show it."""


# ComfyUI's binary websocket frames (protocol.BinaryEventTypes): a 4-byte big-endian event type first.
PREVIEW_IMAGE = 1  # then a 4-byte image type (1 JPEG, 2 PNG), then the encoded image
PREVIEW_IMAGE_WITH_METADATA = 4  # then a 4-byte length, that many bytes of JSON metadata, then the encoded image


def preview_image(frame: bytes) -> tuple[bytes, dict] | None:
    """(encoded image, metadata) of a preview frame, or None for a frame that is not a preview or is cut short."""
    if len(frame) < 8:
        return None
    event = int.from_bytes(frame[:4], "big")
    if event == PREVIEW_IMAGE:
        return bytes(frame[8:]), {}
    if event == PREVIEW_IMAGE_WITH_METADATA:
        length = int.from_bytes(frame[4:8], "big")
        if len(frame) < 8 + length:
            return None
        try:
            metadata = json.loads(bytes(frame[8:8 + length]))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            return None
        return bytes(frame[8 + length:]), metadata if isinstance(metadata, dict) else {}
    return None


async def wait_for_prompt(ws, prompt_id: str, view: ProgressView) -> str | None:
    """Read this client's websocket until `prompt_id` ends; an error message, or None on success.

    The end is `executing` with node None: ComfyUI sends it after the prompt is in /history (`execution_success`
    and `execution_error` come just before that)."""
    import aiohttp

    error, running = None, False
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:  # latent previews
            preview = preview_image(msg.data)
            # A preview carrying its prompt (ComfyUI 0.3x) must be this prompt's. Older ones carry none: ComfyUI runs
            # one prompt at a time, so a preview that comes while this prompt runs is its own (a broadcast prompt's
            # previews reach every client, other prompts' included).
            if preview and preview[0] and running and preview[1].get("prompt_id", prompt_id) == prompt_id:
                view.preview(preview[0])
            continue
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise QueueError("ComfyUI closed the websocket before the prompt finished")
        try:
            message = json.loads(msg.data)
            kind, data = message["type"], message.get("data") or {}
        except (json.JSONDecodeError, RecursionError, KeyError, TypeError):
            continue  # not ours to judge: other extensions send their own messages
        if not isinstance(data, dict) or data.get("prompt_id", prompt_id) != prompt_id:
            continue
        if kind in ("execution_start", "executing", "progress") and "prompt_id" in data:
            running = True
        if kind == "executing":
            if data.get("node") is None and "prompt_id" in data:
                return error
            view.node(data.get("node"))
        elif kind == "progress":
            try:
                view.step(int(data["value"]), int(data["max"]), data.get("node"))
            except (KeyError, TypeError, ValueError):
                pass
        elif kind == "execution_error":
            error = format_execution_error(data)
        elif kind == "execution_interrupted":
            error = f"node {data.get('node_id', '?')} ({data.get('node_type', '?')}): interrupted"
    raise QueueError("ComfyUI closed the websocket before the prompt finished")


async def _run_one(client: Client, ws, graph: dict, out_dir: Path, label: str, timeout: float) -> PromptResult:
    start = time.perf_counter()
    prompt_id, rejected = await client.queue(graph)
    if rejected:
        return PromptResult(prompt_id="", seconds=time.perf_counter() - start, error=rejected)
    view = ProgressView(graph, label)
    error = "stopped"
    try:
        waiting = wait_for_prompt(ws, prompt_id, view)
        error = await (asyncio.wait_for(waiting, timeout) if timeout > 0 else waiting)
    except asyncio.TimeoutError:
        raise QueueError(f"prompt {prompt_id} did not finish within --timeout {timeout:g} s (it is still queued "
                         "in ComfyUI)") from None
    finally:
        view.close("failed" if error else "done")
    seconds = time.perf_counter() - start
    entry = await client.history(prompt_id)
    error = error or error_from_history(entry)
    result = PromptResult(prompt_id=prompt_id, seconds=seconds, error=error)
    if error:
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    for node_id, index, image in output_images(entry):
        suffix = _SAFE_NAME.sub("", Path(image["filename"]).suffix) or ".png"
        path = out_dir / f"{_SAFE_NAME.sub('_', prompt_id)}_{_SAFE_NAME.sub('_', str(node_id))}_{index}{suffix}"
        path.write_bytes(await client.image(image))
        result.images.append(path)
    return result


async def queue_workflow(base: str, graph: dict, repeat: int, out_dir: Path, timeout: float = 0,
                         report=print) -> list[PromptResult]:
    """Queue `graph` `repeat` times, one after another; stops at the first failed prompt."""
    import aiohttp

    client_id = uuid.uuid4().hex
    results = []
    deadline = timeout if timeout > 0 else DEFAULT_REQUEST_DEADLINE_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        client = Client(session, base, client_id, deadline)
        await client.check_server()
        ws = await client.connect_websocket()
        async with ws:
            for n in range(repeat):
                label = f"[{n + 1}/{repeat}]" if repeat > 1 else "prompt"
                result = await _run_one(client, ws, graph, out_dir, label, timeout)
                results.append(result)
                if result.error:
                    break
                images = ", ".join(str(p) for p in result.images) or "no images"
                report(f"{label} {result.prompt_id}: {result.seconds:.2f} s -> {images}")
    return results


def run(args) -> int:
    if args.repeat < 1:
        raise InputError(f"--repeat {args.repeat}: give 1 or more")
    if not math.isfinite(args.timeout) or args.timeout < 0:
        raise InputError(f"--timeout {args.timeout}: give seconds, 0 or more (0: no limit on a prompt's run)")
    base = _base_url(args.server)
    graph = apply_sets(load_workflow(args.workflow), args.sets)
    results = asyncio.run(queue_workflow(base, graph, args.repeat, Path(args.output), args.timeout))
    failed = [r for r in results if r.error]
    if failed:
        where = f"prompt {failed[0].prompt_id} failed" if failed[0].prompt_id else "prompt not queued"
        print(f"{where}:\n{failed[0].error}", file=sys.stderr)
        return 1
    return 0
