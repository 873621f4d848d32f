"""The OpenAI image API's executor on ComfyUI: each request's workflow goes through ComfyUI's own prompt queue.

It speaks ComfyUI's public HTTP API (queue_client.Client) to the very server the request came in on, so the API's
prompts interleave with the UI's, show in its queue, and run exactly as a queued workflow does, on every ComfyUI
version that keeps that API. It never imports ComfyUI. The prompts carry no client id, so ComfyUI shows their
progress and previews in every UI, as for any API client's prompt; each run reads its own prompt's messages on a
websocket of its own.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlencode

from .openai_api import OpenAIError, execution_error, not_ready
from .queue_client import Client, QueueError, error_from_history, output_images, wait_for_prompt

log = logging.getLogger("flux2_accel")

# The preview ComfyUI makes while sampling when a stream asks for partial images (its per-prompt preview_method:
# latent2rgb needs no extra model and is what the UI shows by default).
STREAM_PREVIEW_METHOD = "latent2rgb"
HISTORY_POLL_S = 0.25  # how often a running prompt's end is looked for in ComfyUI's /history
# Each HTTP exchange with ComfyUI (not a prompt's run, which the route bounds) answers within this.
EXCHANGE_DEADLINE_S = 30.0


@dataclass(frozen=True)
class OutputImage:
    """One image a prompt saved, as ComfyUI's /view names it."""
    filename: str
    subfolder: str = ""
    type: str = "output"

    def view_path(self) -> str:
        return "/view?" + urlencode({"filename": self.filename, "subfolder": self.subfolder, "type": self.type})


class _RunView:
    """What wait_for_prompt reports while a prompt runs: previews go to the route; node and step changes are not needed
    (ComfyUI's own UI shows them)."""

    def __init__(self, on_preview: Callable[[bytes], None] | None):
        self.on_preview = on_preview

    def node(self, node_id) -> None:
        pass

    def step(self, value: int, total: int, node_id) -> None:
        pass

    def preview(self, image: bytes) -> None:
        if self.on_preview is not None:
            self.on_preview(image)


class ComfyUIExecutor:
    """Runs API-format workflows on the ComfyUI at `base` (http://host:port, the server's own address)."""

    def __init__(self, base: str, deadline: float = EXCHANGE_DEADLINE_S):
        self.base, self.deadline = base.rstrip("/"), deadline

    def _session(self):
        import aiohttp

        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    async def _call(self, action):
        """Run `action(client)`; ComfyUI unreachable or not answering is 503 (not ready)."""
        async with self._session() as session:
            try:
                return await action(Client(session, self.base, uuid.uuid4().hex, self.deadline))
            except QueueError as e:
                raise not_ready(f"ComfyUI's queue is not reachable: {e}") from None

    async def check_ready(self) -> None:
        await self._call(lambda client: client.check_server())

    async def queue_depth(self) -> int:
        return await self._call(lambda client: client.queue_depth())

    async def upload_image(self, data: bytes, filename: str) -> str:
        return await self._call(lambda client: client.upload_image(data, filename))

    async def image_bytes(self, image: OutputImage) -> bytes:
        return await self._call(lambda client: client.image(
            {"filename": image.filename, "subfolder": image.subfolder, "type": image.type}))

    async def run(self, graph: dict, outputs: tuple = (),
                  on_preview: Callable[[bytes], None] | None = None) -> list[OutputImage]:
        """Queue `graph`, wait for it, and return the images its `outputs` nodes saved (all nodes' when empty).
        Cancelling the awaiting task takes the prompt off the queue, or interrupts it if it is running."""
        async with self._session() as session:
            client = Client(session, self.base, uuid.uuid4().hex, self.deadline)
            try:
                ws = await client.connect_websocket()
            except QueueError as e:
                raise not_ready(f"ComfyUI's queue is not reachable: {e}") from None
            async with ws:
                extra = {"preview_method": STREAM_PREVIEW_METHOD} if on_preview is not None else None
                queueing = asyncio.ensure_future(client.queue(graph, extra_data=extra, broadcast=True))
                try:
                    prompt_id, rejected = await asyncio.shield(queueing)
                except asyncio.CancelledError:
                    # The POST may have reached ComfyUI already: its prompt would run for a client that has gone.
                    await asyncio.shield(self._cancel_once_queued(queueing))
                    raise
                except QueueError as e:
                    raise not_ready(f"ComfyUI's queue is not reachable: {e}") from None
                if rejected:
                    raise OpenAIError(500, f"ComfyUI refused the workflow: {rejected}", "server_error", None,
                                      "invalid_workflow")
                # The websocket carries the progress and previews; the end is the /history entry, since ComfyUI
                # sends its end-of-prompt messages only to a prompt's own client, and this one has none.
                messages = asyncio.ensure_future(wait_for_prompt(ws, prompt_id, _RunView(on_preview)))
                try:
                    entry = await self._finished(client, prompt_id, messages)
                except asyncio.CancelledError:
                    await asyncio.shield(self._cancel(prompt_id))
                    raise
                except QueueError as e:
                    raise execution_error(None, str(e)) from None
                finally:
                    messages.cancel()
                    await asyncio.gather(messages, return_exceptions=True)
        error = error_from_history(entry)
        if error:
            raise execution_error(*_node_and_message(error))
        wanted = {str(node) for node in outputs}
        return [OutputImage(image["filename"], image.get("subfolder", ""), image.get("type", "output"))
                for node_id, _, image in output_images(entry) if not wanted or str(node_id) in wanted]

    async def _finished(self, client: Client, prompt_id: str, messages) -> dict:
        """The prompt's /history entry once it has one, asked every HISTORY_POLL_S (at once if the websocket saw
        the end, which a prompt with a client id of its own would get); QueueError if the websocket closes."""
        while True:
            entry = await client.history_entry(prompt_id)
            if entry is not None:
                return entry
            if messages.done() and messages.exception() is not None:
                raise messages.exception()
            await asyncio.wait({messages}, timeout=HISTORY_POLL_S)
            if messages.done() and messages.exception() is None:
                return await client.history(prompt_id)

    async def _cancel_once_queued(self, queueing: asyncio.Future) -> None:
        """Cancel the prompt that `queueing` (a POST /prompt under way when the run was cancelled) queues, if any."""
        try:
            prompt_id, _ = await queueing
        except (QueueError, asyncio.CancelledError):  # no prompt id came back: nothing was queued to cancel
            return
        if prompt_id is not None:
            await self._cancel(prompt_id)

    async def _cancel(self, prompt_id: str) -> None:
        try:
            await self._call(lambda client: client.cancel(prompt_id))
            log.info("flux2-accel OpenAI API: the client went away; prompt %s cancelled", prompt_id)
        except OpenAIError as e:  # ComfyUI gone too: nothing left to cancel
            log.warning("flux2-accel OpenAI API: could not cancel prompt %s: %s", prompt_id, e.message)


def _node_and_message(error: str) -> tuple[str | None, str]:
    """("5 (KSampler)", "ValueError: ...") from queue_client's "node 5 (KSampler) failed: ValueError: ..."."""
    if error.startswith("node ") and " failed: " in error:
        node, _, message = error[len("node "):].partition(" failed: ")
        return node, message
    return None, error
