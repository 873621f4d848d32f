"""Text shown on a node while or after the prompt runs, for nodes whose work happens later (a MODEL patch acts
during the sampler's run, when the patch node itself has long returned). Uses ComfyUI's progress-text message
(PromptServer.send_progress_text), which the frontend draws on the node; a no-op outside ComfyUI."""

from __future__ import annotations

import logging

log = logging.getLogger("flux2_accel")


def show_on_node(unique_id, lines: list[str]) -> bool:
    """Send `lines` to node `unique_id` of the running prompt's client. True when a message was sent."""
    if unique_id is None:
        return False
    try:
        from server import PromptServer  # type: ignore
    except ImportError:
        return False
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return False
    try:
        server.send_progress_text("\n".join(lines), str(unique_id), getattr(server, "client_id", None))
        return True
    except Exception:  # statistics are a nicety: never fail a finished run over them
        log.debug("flux2-accel: could not show statistics on node %s", unique_id, exc_info=True)
        return False
