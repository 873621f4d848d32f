"""The OpenAI image API's schema (POST /v1/images/generations and /v1/images/edits), with no web framework: request
parsing and checks, the size and quality rules, the API-key rule, the error body, and the reply and SSE shapes.

The routes (ComfyUI's aiohttp server now, a standalone server later) read the body, hand the parsed JSON or the
multipart fields here, and send back what this module builds; every refusal is an OpenAIError carrying its HTTP
status and OpenAI's error schema, naming the field (`param`) at fault. docs/openai-api.md documents the rules."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import ipaddress
import json
import math
import re
from dataclasses import dataclass, replace

from ..errors import InputError
from ..images import open_image_bytes
from ..options import MAX_GUIDANCE, MAX_RESOLUTION, MAX_SEED, MAX_STEPS, MIN_REFERENCE_SIDE, SIZE_MULTIPLE

DEFAULT_MAX_N = 10  # images per request; a deployment may lower or raise it (parse_*(max_n=...)); more is refused
MAX_PROMPT_CHARS = 32_000  # OpenAI's own bound for its GPT image models; far beyond what the text encoders read
MAX_REFERENCE_IMAGES = 10  # FLUX.2 takes up to 10 reference images
MAX_BODY_BYTES = 64 * 1024 * 1024  # a whole request body: JSON, or multipart with its reference images
MAX_PARTIAL_IMAGES = 3
RESPONSE_FORMATS = ("b64_json", "url")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
DEFAULT_OUTPUT_COMPRESSION = 100  # OpenAI's default; for jpeg and webp, the encoder's quality

# quality -> sampling steps for a model that does not set its own presets (a distilled one does). "auto" keeps the
# workflow's own steps (None). OpenAI's DALL-E names map onto these:
# "standard" is "medium", "hd" is "high". The `steps` extension sets the count directly (with quality auto only).
QUALITY_STEPS = {
    "low": 12,
    "medium": 28,
    "high": 50,
    "auto": None,
    "standard": 28,
    "hd": 50,
}
# The name each quality carries in replies and stream events (OpenAI's event types know low/medium/high/auto).
QUALITY_NAMES = {"standard": "medium", "hd": "high"}

COMMON_FIELDS = ("model", "prompt", "n", "size", "response_format", "output_format", "output_compression", "user",
                 "quality", "stream", "partial_images", "seed", "steps", "negative_prompt", "guidance")
EDIT_IMAGE_FIELDS = ("image", "image[]")

_SIZE = re.compile(r"^([0-9]{1,6})x([0-9]{1,6})$")
_FALSE_WORDS = ("false", "0", "no", "off")
_TRUE_WORDS = ("true", "1", "yes", "on")


class OpenAIError(Exception):
    """A refusal in OpenAI's error schema: the HTTP status, a message, the error type, the field at fault (param) and
    a short machine code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error reply: {"error": {"message", "type", "param", "code"}} (param and code may be null)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_field(param: str | None, message: str, code: str = "invalid_value") -> OpenAIError:
    """400: a request field is missing, of the wrong type, or out of range."""
    return OpenAIError(400, message, "invalid_request_error", param, code)


def bad_key(message: str) -> OpenAIError:
    """401: no key, a wrong key, or a server open beyond loopback with no key set."""
    return OpenAIError(401, message, "invalid_request_error", None, "invalid_api_key")


def unknown_model(model: str, available) -> OpenAIError:
    """404: `model` is not one of the served workflows, which the message lists."""
    names = ", ".join(sorted(available)) or "none (no workflow is served)"
    return OpenAIError(404, f"The model '{model}' does not exist. Available models: {names}.",
                       "invalid_request_error", "model", "model_not_found")


def body_too_large(size: int, limit: int = MAX_BODY_BYTES) -> OpenAIError:
    """413: the request body is larger than the server reads."""
    return OpenAIError(413, f"The request body is {size:,} bytes, more than the {limit:,} this server accepts.",
                       "invalid_request_error", None, "request_too_large")


def queue_full(depth: int) -> OpenAIError:
    """429: the prompt queue already holds as many requests as it is allowed to."""
    return OpenAIError(429, f"The queue is full ({depth} requests waiting); retry later.", "rate_limit_error", None,
                       "queue_full")


def execution_error(node: str | None, message: str) -> OpenAIError:
    """500: the workflow failed while running; names the node and the executor's message."""
    where = f"node {node}" if node else "the workflow"
    return OpenAIError(500, f"Execution failed in {where}: {message}", "server_error", None, "execution_error")


def not_ready(message: str = "The server is not ready yet; retry shortly.") -> OpenAIError:
    """503: the executor is not ready (starting, or its models are not loaded)."""
    return OpenAIError(503, message, "server_error", None, "not_ready")


def check_body_size(size: int, limit: int = MAX_BODY_BYTES) -> None:
    """Raise 413 when a body of `size` bytes (Content-Length, or what was read) is over `limit`."""
    if size > limit:
        raise body_too_large(size, limit)


# --- API key ---------------------------------------------------------------------------------------------------

def check_api_key(header_value: str | None, configured_key: str) -> None:
    """Raise 401 unless the Authorization header is "Bearer <configured_key>"; compared in constant time."""
    token = _bearer_token(header_value)
    if not hmac.compare_digest(token.encode("utf-8"), configured_key.encode("utf-8")):
        raise bad_key("Incorrect API key.")


def key_digest(key: str) -> str:
    """The SHA-256 of a key: what a server that must not hold the key itself (a Serve replica) compares against."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_api_key_digest(header_value: str | None, digest: str) -> None:
    """check_api_key against the key's digest (key_digest), in constant time."""
    token = _bearer_token(header_value)
    if not hmac.compare_digest(key_digest(token).encode("ascii"), digest.encode("ascii")):
        raise bad_key("Incorrect API key.")


def _bearer_token(header_value: str | None) -> str:
    if not header_value:
        raise bad_key("No API key: send the header 'Authorization: Bearer <key>'.")
    scheme, _, token = header_value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise bad_key("The Authorization header must be 'Bearer <key>'.")
    return token


def is_loopback(listen_host: str) -> bool:
    """True when every address the server listens on (ComfyUI's --listen, comma-separated) is a loopback one;
    a host name other than localhost counts as beyond loopback (it is not resolved)."""
    hosts = [h.strip().strip("[]") for h in (listen_host or "").split(",") if h.strip()]
    if not hosts:
        return False
    for host in hosts:
        if host.lower() == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return False
        except ValueError:
            return False
    return True


def key_required(listen_host: str, configured_key: str | None, allow_open: bool) -> bool:
    """Whether requests must carry `configured_key`. With no key set, a server on loopback is open; one listening
    beyond loopback answers every request 401 (this raises it) unless `allow_open` was set explicitly."""
    if configured_key:
        return True
    if is_loopback(listen_host) or allow_open:
        return False
    raise bad_key(f"The server listens on '{listen_host}', beyond loopback, and no API key is set: set "
                  "FLUX2_ACCEL_API_KEY (or the ComfyUI setting), or allow open access explicitly.")


def authorize(header_value: str | None, listen_host: str, configured_key: str | None, allow_open: bool) -> None:
    """The check every route runs first: the key rule, then the key itself when one is required."""
    if key_required(listen_host, configured_key, allow_open):
        check_api_key(header_value, configured_key)


# --- requests --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRequest:
    """A checked request. size None is "auto" (the workflow's own); steps is the `steps` extension, None when the
    request did not set it (the model then maps `quality` to its own steps: a distilled model takes fewer); seed
    None lets the server pick; images are the decoded RGB reference images (edits only)."""
    model: str
    prompt: str
    n: int = 1
    size: tuple[int, int] | None = None
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int | None = None
    user: str | None = None
    quality: str = "auto"
    steps: int | None = None
    stream: bool = False
    partial_images: int = 0
    seed: int | None = None
    negative_prompt: str | None = None
    guidance: float | None = None
    images: tuple = ()

    @property
    def size_name(self) -> str:
        return f"{self.size[0]}x{self.size[1]}" if self.size else "auto"

    @property
    def quality_name(self) -> str:
        return QUALITY_NAMES.get(self.quality, self.quality)


def parse_generation_request(body, *, max_n: int = DEFAULT_MAX_N) -> ImageRequest:
    """The checked request of POST /v1/images/generations from its parsed JSON body."""
    if not isinstance(body, dict):
        raise bad_field(None, f"The request body must be a JSON object, not {_json_type(body)}.", "invalid_type")
    _refuse_unknown(body, COMMON_FIELDS)
    return _parse_fields(body, _JsonReader(body), max_n)


def parse_edit_request(fields: dict, images, *, max_n: int = DEFAULT_MAX_N) -> ImageRequest:
    """The checked request of POST /v1/images/edits from its multipart form: `fields` maps each non-image part's
    name to its text (a file part other than `image`/`image[]` may come as bytes: it is refused by name), `images`
    is the list of (filename, bytes) of the `image` / `image[]` parts, in order."""
    if "mask" in fields:
        raise bad_field("mask", "mask is not supported: inpainting is not implemented; send the reference images "
                        "without a mask.", "unsupported_parameter")
    _refuse_unknown(fields, COMMON_FIELDS)
    for name, value in fields.items():
        if not isinstance(value, str):
            raise bad_field(name, f"{name} must be a text field, not a file.", "invalid_type")
    request = _parse_fields(fields, _FormReader(fields), max_n)
    return replace(request, images=tuple(_decode_images(images)))


def _decode_images(images):
    images = list(images or ())
    if not images:
        raise bad_field("image", "image is required: send one or more reference images as 'image' or 'image[]'.",
                        "missing_required_parameter")
    if len(images) > MAX_REFERENCE_IMAGES:
        raise bad_field("image", f"{len(images)} reference images: at most {MAX_REFERENCE_IMAGES} are accepted.")
    total = sum(len(data) for _, data in images if isinstance(data, (bytes, bytearray)))
    check_body_size(total, MAX_BODY_BYTES)
    for index, (filename, data) in enumerate(images):
        what = f"image {index} ('{filename}')" if filename else f"image {index}"
        try:
            image = open_image_bytes(data, what)
        except InputError as e:
            raise bad_field("image", str(e), "invalid_image") from None
        if min(image.size) < MIN_REFERENCE_SIDE:
            raise bad_field("image", f"{what} is {image.size[0]}x{image.size[1]}: reference images must be at least "
                            f"{MIN_REFERENCE_SIDE} pixels on each side.", "image_too_small")
        yield image


def _refuse_unknown(fields: dict, known) -> None:
    for name in fields:
        if name not in known:
            raise bad_field(name, f"Unknown field '{name}'. Accepted fields: {', '.join(known)}.", "unknown_parameter")


class _JsonReader:
    """Typed reads of a JSON body: the types must already be right (a bool is not an int)."""

    def __init__(self, body: dict):
        self.body = body

    def present(self, name: str) -> bool:
        return self.body.get(name) is not None

    def get(self, name: str):
        return self.body[name]

    def string(self, name: str) -> str:
        value = self.body[name]
        if not isinstance(value, str):
            raise _wrong_type(name, "a string", value)
        return value

    def integer(self, name: str) -> int:
        value = self.body[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(name, "an integer", value)
        return value

    def number(self, name: str) -> float:
        value = self.body[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(name, "a number", value)
        return float(value)

    def boolean(self, name: str) -> bool:
        value = self.body[name]
        if not isinstance(value, bool):
            raise _wrong_type(name, "true or false", value)
        return value


class _FormReader(_JsonReader):
    """Typed reads of multipart text fields, where every value is a string: numbers and booleans are parsed."""

    def present(self, name: str) -> bool:
        return name in self.body

    def integer(self, name: str) -> int:
        text = self.body[name].strip()
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise bad_field(name, f"{name} must be an integer, not '{_short(text)}'.", "invalid_type")
        return int(text)

    def number(self, name: str) -> float:
        text = self.body[name].strip()
        try:
            return float(text)
        except ValueError:
            raise bad_field(name, f"{name} must be a number, not '{_short(text)}'.", "invalid_type") from None

    def boolean(self, name: str) -> bool:
        text = self.body[name].strip().lower()
        if text in _TRUE_WORDS:
            return True
        if text in _FALSE_WORDS:
            return False
        raise bad_field(name, f"{name} must be true or false, not '{_short(text)}'.", "invalid_type")


def _parse_fields(fields: dict, read: _JsonReader, max_n: int) -> ImageRequest:
    if not read.present("model"):
        raise bad_field("model", "model is required.", "missing_required_parameter")
    model = read.string("model").strip()
    if not model:
        raise bad_field("model", "model must not be empty.")
    if not read.present("prompt"):
        raise bad_field("prompt", "prompt is required.", "missing_required_parameter")
    prompt = read.string("prompt")
    if not prompt.strip():
        raise bad_field("prompt", "prompt must not be empty.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad_field("prompt", f"prompt is {len(prompt):,} characters, more than the {MAX_PROMPT_CHARS:,} "
                        "accepted.", "string_above_max_length")
    values = {"model": model, "prompt": prompt}

    if read.present("n"):
        n = read.integer("n")
        if not 1 <= n <= max_n:
            raise bad_field("n", f"n is {n}: it must be between 1 and {max_n} (more is refused, not capped).")
        values["n"] = n
    if read.present("size"):
        values["size"] = parse_size(read.string("size"))
    if read.present("response_format"):
        values["response_format"] = _choice(read, "response_format", RESPONSE_FORMATS)
    if read.present("output_format"):
        values["output_format"] = _choice(read, "output_format", OUTPUT_FORMATS)
    if read.present("output_compression"):
        compression = read.integer("output_compression")
        if values.get("output_format", "png") == "png":
            raise bad_field("output_compression", "output_compression applies to jpeg and webp only; png is "
                            "lossless (set output_format to jpeg or webp, or leave output_compression out).")
        if not 0 <= compression <= 100:
            raise bad_field("output_compression", f"output_compression is {compression}: it must be between 0 "
                            "and 100.")
        values["output_compression"] = compression
    elif values.get("output_format", "png") != "png":
        values["output_compression"] = DEFAULT_OUTPUT_COMPRESSION
    if read.present("user"):
        values["user"] = read.string("user")
    if read.present("quality"):
        values["quality"] = _choice(read, "quality", tuple(QUALITY_STEPS))
    if read.present("steps"):
        steps = read.integer("steps")
        if not 1 <= steps <= MAX_STEPS:
            raise bad_field("steps", f"steps is {steps}: it must be between 1 and {MAX_STEPS}.")
        if values.get("quality", "auto") != "auto":
            raise bad_field("steps", f"steps and quality '{values['quality']}' both set the step count: send one "
                            "of them (quality auto keeps steps).")
        values["steps"] = steps
    if read.present("stream"):
        values["stream"] = read.boolean("stream")
    if read.present("partial_images"):
        partial = read.integer("partial_images")
        if not 0 <= partial <= MAX_PARTIAL_IMAGES:
            raise bad_field("partial_images", f"partial_images is {partial}: it must be between 0 and "
                            f"{MAX_PARTIAL_IMAGES}.")
        if partial and not values.get("stream", False):
            raise bad_field("partial_images", "partial_images needs stream: true (partial images are sent as "
                            "stream events).")
        values["partial_images"] = partial
    if read.present("seed"):
        seed = read.integer("seed")
        if not 0 <= seed <= MAX_SEED:
            raise bad_field("seed", f"seed is {seed}: it must be between 0 and {MAX_SEED}.")
        values["seed"] = seed
    if read.present("negative_prompt"):
        negative = read.string("negative_prompt")
        if len(negative) > MAX_PROMPT_CHARS:
            raise bad_field("negative_prompt", f"negative_prompt is {len(negative):,} characters, more than the "
                            f"{MAX_PROMPT_CHARS:,} accepted.", "string_above_max_length")
        values["negative_prompt"] = negative
    if read.present("guidance"):
        guidance = read.number("guidance")
        if not math.isfinite(guidance) or not 0.0 <= guidance <= MAX_GUIDANCE:
            raise bad_field("guidance", f"guidance is {guidance}: it must be a finite number between 0 and "
                            f"{MAX_GUIDANCE:g}.")
        values["guidance"] = guidance
    return ImageRequest(**values)


def parse_size(text: str) -> tuple[int, int] | None:
    """"WIDTHxHEIGHT" -> (width, height), each a multiple of SIZE_MULTIPLE within the sampler's limits; "auto" ->
    None (the workflow's own size)."""
    if text == "auto":
        return None
    match = _SIZE.match(text)
    if not match:
        raise bad_field("size", f"size is '{_short(text)}': it must be 'WIDTHxHEIGHT' (e.g. '1024x1024') or 'auto'.")
    width, height = int(match.group(1)), int(match.group(2))
    for name, value in (("width", width), ("height", height)):
        if value < SIZE_MULTIPLE or value > MAX_RESOLUTION or value % SIZE_MULTIPLE:
            raise bad_field("size", f"size is '{text}': the {name} {value} must be a multiple of {SIZE_MULTIPLE} "
                            f"between {SIZE_MULTIPLE} and {MAX_RESOLUTION}.")
    return width, height


def _choice(read: _JsonReader, name: str, choices) -> str:
    value = read.string(name)
    if value not in choices:
        raise bad_field(name, f"{name} is '{_short(value)}': it must be one of {', '.join(choices)}.")
    return value


def _wrong_type(name: str, expected: str, value) -> OpenAIError:
    return bad_field(name, f"{name} must be {expected}, not {_json_type(value)}.", "invalid_type")


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# --- replies ---------------------------------------------------------------------------------------------------

def encode_image(image, output_format: str = "png", output_compression: int | None = None) -> bytes:
    """A PIL image encoded as png, jpeg or webp; output_compression (0..100, jpeg/webp) is the encoder's quality."""
    if output_format not in OUTPUT_FORMATS:
        raise bad_field("output_format", f"output_format is '{output_format}': it must be one of "
                        f"{', '.join(OUTPUT_FORMATS)}.")
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        quality = DEFAULT_OUTPUT_COMPRESSION if output_compression is None else output_compression
        rgb = image.convert("RGB") if output_format == "jpeg" else image
        rgb.save(buffer, format=output_format.upper(), quality=quality)
    return buffer.getvalue()


def images_response(created: int, images, response_format: str = "b64_json", urls=None, usage=None,
                    request: ImageRequest | None = None) -> dict:
    """OpenAI's ImagesResponse: {"created", "data": [{"b64_json": bare base64} | {"url"}], ...}; with `request`,
    also its size, quality and output_format; `usage` is included only when given."""
    if response_format == "url":
        if urls is None or len(urls) != len(images):
            raise ValueError("response_format 'url' needs one URL per image")
        data = [{"url": url} for url in urls]
    else:
        data = [{"b64_json": base64.b64encode(encoded).decode("ascii")} for encoded in images]
    reply = {"created": int(created), "data": data}
    if request is not None:
        reply.update(size=request.size_name, output_format=request.output_format)
        if request.quality != "auto":
            reply["quality"] = request.quality_name
    if usage is not None:
        reply["usage"] = usage
    return reply


ZERO_USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
              "total_tokens": 0}  # FLUX.2 bills no tokens; OpenAI's completed event requires the field


def partial_image_event(request: ImageRequest, created_at: int, index: int, encoded: bytes, edit: bool = False) -> dict:
    """The payload of an image_generation.partial_image (image_edit.partial_image for edits) stream event."""
    return {"type": f"{'image_edit' if edit else 'image_generation'}.partial_image", "partial_image_index": index,
            **_event_fields(request, created_at, encoded)}


def completed_event(request: ImageRequest, created_at: int, encoded: bytes, usage=None, edit: bool = False) -> dict:
    """The payload of the final image_generation.completed (image_edit.completed) stream event."""
    return {"type": f"{'image_edit' if edit else 'image_generation'}.completed",
            **_event_fields(request, created_at, encoded), "usage": usage or ZERO_USAGE}


def _event_fields(request: ImageRequest, created_at: int, encoded: bytes) -> dict:
    return {"b64_json": base64.b64encode(encoded).decode("ascii"), "created_at": int(created_at),
            "size": request.size_name, "quality": request.quality_name, "background": "opaque",
            "output_format": request.output_format}


def sse_event(type: str, payload: dict) -> bytes:
    """One server-sent event as OpenAI streams them: "event: <type>", then the payload as one JSON data line."""
    if "\n" in type or "\r" in type:
        raise ValueError("an SSE event type is one line")
    return f"event: {type}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode("utf-8")
