"""The wire contract shared by the remote text encoder client and server.

It is the public FLUX.2 remote text encoder's (diffusers' `Flux2RemoteTextEncoderStep`): POST JSON
`{"prompt": str | [str, ...]}` with `Authorization: Bearer <token>`; the reply body is the prompt embeddings
[B, 512, D]. The public endpoint answers with a `torch.save`d tensor. Our server answers with a safetensors file
holding one tensor named `prompt_embeds` unless the client asks for the torch format in its Accept header.

Replies are decoded by their content, never trusted by their headers: safetensors, or a torch zip archive loaded with
`weights_only=True` (which refuses any pickle that would call code). Nothing else is accepted.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
from itertools import accumulate

import torch

from ...errors import Flux2AccelError
from ...options import REMOTE_REPLY_FORMATS
from .urls import PUBLIC_URL  # noqa: F401  (re-exported: the endpoint's URL, where the protocol is spoken)

PREDICT_PATH = "/predict"

SAFETENSORS_TYPE = "application/x-safetensors"
TORCH_TYPE = "application/x-pytorch"
FORMATS = dict(zip(REMOTE_REPLY_FORMATS, (SAFETENSORS_TYPE, TORCH_TYPE)))  # names shared with the CLI's flag
TENSOR_NAME = "prompt_embeds"
# What our client asks for: safetensors first; the public endpoint ignores Accept and sends torch bytes.
CLIENT_ACCEPT = f"{SAFETENSORS_TYPE}, {TORCH_TYPE};q=0.5, application/octet-stream;q=0.1"

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ZIP_MAGIC = b"PK\x03\x04"
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
# A request is {"prompt": [...]}: depth 2. The limit leaves room for extra fields and keeps json.loads far from
# Python's recursion limit, which a body nested 100,000 deep would otherwise hit.
MAX_JSON_DEPTH = 8
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


class ReplyFormatError(Flux2AccelError):
    """A reply body that is not a tensor in one of the accepted formats."""


def encode_tensor(tensor: torch.Tensor, fmt: str = "safetensors") -> tuple[bytes, str]:
    """The reply body and its Content-Type for `tensor` in `fmt` ("safetensors" or "torch")."""
    tensor = tensor.detach().to("cpu").contiguous()
    if fmt == "torch":
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        return buffer.getvalue(), TORCH_TYPE
    from safetensors.torch import save

    return save({TENSOR_NAME: tensor}), SAFETENSORS_TYPE


def _looks_like_safetensors(body: bytes) -> bool:
    if len(body) < 10:
        return False
    (header_len,) = struct.unpack("<Q", body[:8])
    return 2 <= header_len <= min(_MAX_SAFETENSORS_HEADER, len(body) - 8) and body[8:9] == b"{"


def decode_tensor(body: bytes) -> torch.Tensor:
    """The embeddings tensor in a reply body. Raises ReplyFormatError for anything else, including pickles."""
    if _looks_like_safetensors(body):
        from safetensors.torch import load

        try:
            tensors = load(body)
        except Exception as e:
            raise ReplyFormatError(f"the reply looks like safetensors but could not be read ({e}).") from e
        if TENSOR_NAME in tensors:
            return tensors[TENSOR_NAME]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        names = ", ".join(sorted(tensors)) or "none"
        raise ReplyFormatError(f"the safetensors reply must hold a tensor named '{TENSOR_NAME}'; it holds {names}.")
    if body[:4] == _ZIP_MAGIC:
        try:
            value = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # weights_only refuses any global it does not know: that is where a code-running pickle ends up.
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"it references {found.group(1)}" if found else "it holds Python objects other than tensors"
            raise ReplyFormatError(f"the torch-format reply was refused: {what}, which is not a tensor "
                                   "(unpickling it could run code on this machine).") from None
        except Exception as e:
            raise ReplyFormatError(f"the torch-format reply could not be read, it is corrupt or truncated "
                                   f"({type(e).__name__}: {str(e).strip()[:120]}).") from None
        if not torch.is_tensor(value):
            raise ReplyFormatError(f"the torch-format reply holds a {type(value).__name__}, not a tensor.")
        return value
    preview = body[:60].decode("utf-8", "replace").replace("\n", " ")
    raise ReplyFormatError(
        f"the reply ({len(body)} bytes, starting {preview!r}) is neither safetensors nor a torch-saved tensor.")


def choose_format(accept: str | None, default: str = "safetensors") -> str:
    """The reply format a client asked for in its Accept header, else `default`."""
    accept = (accept or "").lower()
    wanted = []
    for part in accept.split(","):
        media, _, params = part.strip().partition(";")
        q = 1.0
        for p in params.split(";"):
            key, _, value = p.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        for fmt, media_type in FORMATS.items():
            if media.strip() == media_type and q > 0:
                wanted.append((q, fmt == default, fmt))
    return max(wanted)[2] if wanted else default


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON `text` (brackets inside strings do not count); C-speed scans only."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def parse_prompts(payload) -> list[str]:
    """The prompt list of a request body `{"prompt": str | [str]}`; raises ValueError with a reason."""
    if isinstance(payload, bytes):
        payload = payload.decode("utf-8")
    if isinstance(payload, str):
        # Fast path first: a body with few brackets cannot nest deep (str.count runs at C speed).
        shallow = payload.count("[") + payload.count("{") <= MAX_JSON_DEPTH
        depth = 0 if shallow else json_depth(payload)
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"the JSON body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted "
                             '(a request is {"prompt": "..."} or {"prompt": ["...", ...]})')
        try:
            payload = json.loads(payload)
        except RecursionError:  # the depth check should make this unreachable; never a traceback for bad input
            raise ValueError(f"the JSON body nests more than {MAX_JSON_DEPTH} levels deep") from None
    if not isinstance(payload, dict) or "prompt" not in payload:
        raise ValueError('the body must be a JSON object {"prompt": "..."} or {"prompt": ["...", ...]}')
    prompt = payload["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError('"prompt" must be a string or a non-empty list of strings')
    return prompts
