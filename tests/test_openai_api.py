"""The OpenAI image API's schema module (optim/serve/openai_api.py): every field rule and refusal with its status,
the field it names and its message; the key rule; the reply and stream shapes, parsed back by the openai SDK."""

from __future__ import annotations

import base64
import hmac
import io
import json
import struct
import zlib

import pytest
from PIL import Image

from flux2_accel.optim.errors import InputError
from flux2_accel.optim.images import MAX_IMAGE_PIXELS, open_image, open_image_bytes
from flux2_accel.optim.options import MAX_GUIDANCE, MAX_RESOLUTION, MAX_SEED, MAX_STEPS
from flux2_accel.optim.serve import openai_api as api

BASE = {"model": "flux2-dev", "prompt": "a red fox in the snow"}


def png_bytes(width=64, height=80, color=(200, 30, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid PNG header claiming a huge canvas, with a tiny compressed payload: decoding it would need ~30 GB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def refused(call, *args, **kwargs) -> api.OpenAIError:
    with pytest.raises(api.OpenAIError) as info:
        call(*args, **kwargs)
    return info.value


# --- generations: accepted values ------------------------------------------------------------------------------

def test_defaults_of_a_minimal_request():
    request = api.parse_generation_request(dict(BASE))
    assert (request.model, request.prompt, request.n, request.size, request.response_format) == (
        "flux2-dev", "a red fox in the snow", 1, None, "b64_json")
    assert (request.output_format, request.output_compression, request.quality, request.steps) == ("png", None,
                                                                                                    "auto", None)
    assert (request.stream, request.partial_images, request.seed, request.guidance, request.images) == (
        False, 0, None, None, ())
    assert request.size_name == "auto"


def test_every_field_accepted_at_once():
    request = api.parse_generation_request({**BASE, "n": 10, "size": "1024x768", "response_format": "url",
                                            "output_format": "webp", "output_compression": 0, "user": "u-1",
                                            "stream": True, "partial_images": 3, "seed": MAX_SEED,
                                            "steps": MAX_STEPS, "negative_prompt": "blurry", "guidance": 3.5})
    assert (request.n, request.size, request.size_name, request.response_format) == (10, (1024, 768), "1024x768",
                                                                                     "url")
    assert (request.output_format, request.output_compression, request.user) == ("webp", 0, "u-1")
    assert (request.stream, request.partial_images, request.seed, request.steps) == (True, 3, MAX_SEED, MAX_STEPS)
    assert (request.negative_prompt, request.guidance) == ("blurry", 3.5)


@pytest.mark.parametrize("quality,steps,name", [("low", 12, "low"), ("medium", 28, "medium"), ("high", 50, "high"),
                                                ("auto", None, "auto"), ("standard", 28, "medium"),
                                                ("hd", 50, "high")])
def test_quality_presets(quality, steps, name):
    request = api.parse_generation_request({**BASE, "quality": quality})
    assert api.QUALITY_STEPS[quality] == steps
    assert request.steps is None  # the model maps the quality to its own steps
    assert (request.quality, request.quality_name) == (quality, name)


def test_jpeg_and_webp_default_to_full_quality_and_png_carries_no_compression():
    assert api.parse_generation_request({**BASE, "output_format": "jpeg"}).output_compression == 100
    assert api.parse_generation_request({**BASE, "output_format": "png"}).output_compression is None


def test_max_n_is_configurable_and_refuses_beyond_it():
    assert api.parse_generation_request({**BASE, "n": 20}, max_n=20).n == 20
    error = refused(api.parse_generation_request, {**BASE, "n": 3}, max_n=2)
    assert (error.status, error.param) == (400, "n")
    assert "between 1 and 2" in error.message and "not capped" in error.message


@pytest.mark.parametrize("size,expected", [("16x16", (16, 16)), (f"{MAX_RESOLUTION}x16", (MAX_RESOLUTION, 16)),
                                           ("1024x1024", (1024, 1024)), ("auto", None)])
def test_sizes_accepted(size, expected):
    assert api.parse_generation_request({**BASE, "size": size}).size == expected


# --- generations: refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,param,words", [
    ({"model": None}, "model", "model is required"),
    ({"model": "  "}, "model", "must not be empty"),
    ({"model": 3}, "model", "model must be a string, not a number"),
    ({"prompt": None}, "prompt", "prompt is required"),
    ({"prompt": ""}, "prompt", "prompt must not be empty"),
    ({"prompt": " \n "}, "prompt", "prompt must not be empty"),
    ({"prompt": "x" * (api.MAX_PROMPT_CHARS + 1)}, "prompt", "more than the 32,000"),
    ({"prompt": ["a"]}, "prompt", "prompt must be a string, not an array"),
    ({"n": 0}, "n", "n is 0: it must be between 1 and 10"),
    ({"n": 11}, "n", "n is 11: it must be between 1 and 10"),
    ({"n": -1}, "n", "n is -1"),
    ({"n": 2.0}, "n", "n must be an integer, not a number"),
    ({"n": "2"}, "n", "n must be an integer, not a string"),
    ({"n": True}, "n", "n must be an integer, not a boolean"),
    ({"size": "1024"}, "size", "'WIDTHxHEIGHT'"),
    ({"size": "1024X1024"}, "size", "'WIDTHxHEIGHT'"),
    ({"size": "-16x16"}, "size", "'WIDTHxHEIGHT'"),
    ({"size": "1000x1024"}, "size", "the width 1000 must be a multiple of 16"),
    ({"size": "1024x8"}, "size", "the height 8 must be a multiple of 16 between 16"),
    ({"size": f"{MAX_RESOLUTION + 16}x1024"}, "size", f"between 16 and {MAX_RESOLUTION}"),
    ({"size": [1024, 1024]}, "size", "size must be a string, not an array"),
    ({"response_format": "png"}, "response_format", "it must be one of b64_json, url"),
    ({"output_format": "gif"}, "output_format", "it must be one of png, jpeg, webp"),
    ({"output_compression": 50}, "output_compression", "jpeg and webp only"),
    ({"output_format": "png", "output_compression": 50}, "output_compression", "png is lossless"),
    ({"output_format": "jpeg", "output_compression": 101}, "output_compression", "between 0 and 100"),
    ({"output_format": "webp", "output_compression": -1}, "output_compression", "between 0 and 100"),
    ({"output_format": "jpeg", "output_compression": "90"}, "output_compression", "must be an integer"),
    ({"user": 7}, "user", "user must be a string"),
    ({"quality": "ultra"}, "quality", "one of low, medium, high, auto, standard, hd"),
    ({"stream": "yes"}, "stream", "stream must be true or false, not a string"),
    ({"stream": 1}, "stream", "stream must be true or false, not a number"),
    ({"partial_images": 2}, "partial_images", "needs stream: true"),
    ({"stream": False, "partial_images": 1}, "partial_images", "needs stream: true"),
    ({"stream": True, "partial_images": 4}, "partial_images", "between 0 and 3"),
    ({"stream": True, "partial_images": -1}, "partial_images", "between 0 and 3"),
    ({"seed": -1}, "seed", f"between 0 and {MAX_SEED}"),
    ({"seed": MAX_SEED + 1}, "seed", f"between 0 and {MAX_SEED}"),
    ({"seed": 1.5}, "seed", "seed must be an integer"),
    ({"steps": 0}, "steps", f"between 1 and {MAX_STEPS}"),
    ({"steps": MAX_STEPS + 1}, "steps", f"between 1 and {MAX_STEPS}"),
    ({"steps": 20, "quality": "high"}, "steps", "both set the step count"),
    ({"negative_prompt": 5}, "negative_prompt", "negative_prompt must be a string"),
    ({"negative_prompt": "x" * (api.MAX_PROMPT_CHARS + 1)}, "negative_prompt", "more than the 32,000"),
    ({"guidance": float("nan")}, "guidance", "finite number between 0 and"),
    ({"guidance": float("inf")}, "guidance", "finite number"),
    ({"guidance": -0.5}, "guidance", "between 0 and"),
    ({"guidance": MAX_GUIDANCE + 1}, "guidance", f"between 0 and {MAX_GUIDANCE:g}"),
    ({"guidance": "4"}, "guidance", "guidance must be a number, not a string"),
    ({"style": "vivid"}, "style", "Unknown field 'style'"),
    ({"background": "transparent"}, "background", "Unknown field 'background'"),
])
def test_generation_refusals(change, param, words):
    body = {**BASE, **change}
    body = {k: v for k, v in body.items() if not (k in ("model", "prompt") and v is None)}
    error = refused(api.parse_generation_request, body)
    assert error.status == 400
    assert error.param == param
    assert words in error.message
    assert error.body() == {"error": {"message": error.message, "type": "invalid_request_error", "param": param,
                                      "code": error.code}}


@pytest.mark.parametrize("body,kind", [([], "an array"), ("x", "a string"), (None, "null")])
def test_a_body_that_is_not_an_object(body, kind):
    error = refused(api.parse_generation_request, body)
    assert (error.status, error.param) == (400, None)
    assert f"must be a JSON object, not {kind}" in error.message


def test_allowed_guidance_and_seed_bounds():
    request = api.parse_generation_request({**BASE, "guidance": 0, "seed": 0, "steps": 1})
    assert (request.guidance, request.seed, request.steps) == (0.0, 0, 1)


# --- edits -----------------------------------------------------------------------------------------------------

def test_edit_with_two_images_parses_form_strings():
    fields = {"model": "flux2-edit", "prompt": "make it blue", "n": "2", "size": "512x512", "stream": "true",
              "partial_images": "1", "seed": "42", "guidance": "2.5", "output_format": "jpeg",
              "output_compression": "80"}
    request = api.parse_edit_request(fields, [("a.png", png_bytes(96, 64)), ("b.png", png_bytes(64, 72))])
    assert (request.n, request.size, request.stream, request.partial_images) == (2, (512, 512), True, 1)
    assert (request.seed, request.guidance, request.output_format, request.output_compression) == (42, 2.5, "jpeg",
                                                                                                  80)
    assert [image.size for image in request.images] == [(96, 64), (64, 72)]
    assert all(image.mode == "RGB" for image in request.images)
    assert request.images[0].getpixel((0, 0)) == (200, 30, 10)


@pytest.mark.parametrize("fields,images,param,words", [
    ({"mask": b"\x89PNG"}, None, "mask", "inpainting is not implemented"),
    ({"mask": "x"}, None, "mask", "mask is not supported"),
    ({}, [], "image", "image is required"),
    ({}, [("x.png", png_bytes())] * (api.MAX_REFERENCE_IMAGES + 1), "image", "at most 10"),
    ({}, [("notes.txt", b"hello")], "image", "image 0 ('notes.txt') is not a readable image"),
    ({}, [("a.png", png_bytes()), ("bomb.png", bomb_png())], "image", "image 1 ('bomb.png')"),
    ({}, [("a.png", png_bytes()), ("small.png", png_bytes(63, 200))], "image",
     "image 1 ('small.png') is 63x200: reference images must be at least 64 pixels"),
    ({"n": "two"}, None, "n", "n must be an integer, not 'two'"),
    ({"n": "1.5"}, None, "n", "n must be an integer"),
    ({"n": "11"}, None, "n", "between 1 and 10"),
    ({"stream": "maybe"}, None, "stream", "stream must be true or false, not 'maybe'"),
    ({"guidance": "lots"}, None, "guidance", "guidance must be a number, not 'lots'"),
    ({"guidance": "nan"}, None, "guidance", "finite number"),
    ({"seed": "-3"}, None, "seed", "between 0 and"),
    ({"size": "17x16"}, None, "size", "multiple of 16"),
    ({"partial_images": "2"}, None, "partial_images", "needs stream: true"),
    ({"input_fidelity": "high"}, None, "input_fidelity", "Unknown field 'input_fidelity'"),
    ({"extra_file": b"data"}, None, "extra_file", "Unknown field"),
    ({"user": b"bytes"}, None, "user", "user must be a text field, not a file"),
])
def test_edit_refusals(fields, images, param, words):
    form = {"model": "flux2-edit", "prompt": "make it blue", **fields}
    error = refused(api.parse_edit_request, form, [("a.png", png_bytes())] if images is None else images)
    assert (error.status, error.param) == (400, param)
    assert words in error.message


def test_edit_images_over_the_body_bound_are_413(monkeypatch):
    monkeypatch.setattr(api, "MAX_BODY_BYTES", 1000)
    error = refused(api.parse_edit_request, dict(BASE), [("a.png", png_bytes()), ("b.png", b"x" * 1000)])
    assert (error.status, error.code) == (413, "request_too_large")
    assert "more than the 1,000" in error.message


@pytest.mark.parametrize("text,value", [("true", True), ("1", True), ("False", False), ("off", False)])
def test_edit_stream_words(text, value):
    request = api.parse_edit_request({**BASE, "stream": text}, [("a.png", png_bytes())])
    assert request.stream is value


# --- the bounded bytes decoder ---------------------------------------------------------------------------------

def test_bytes_decoder_refuses_a_decompression_bomb_header():
    data = bomb_png()
    assert len(data) < 200
    with pytest.raises(InputError, match=r"upload 'b\.png'.*(100000x100000|too large)"):
        open_image_bytes(data, "upload 'b.png'")


def test_bytes_decoder_refuses_over_the_pack_bound_below_pils_own(monkeypatch):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 16  # over the pack's bound, under PIL's bomb threshold times two
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(InputError, match=rf"ref is {side}x{side} pixels, more than the {MAX_IMAGE_PIXELS:,}"):
        open_image_bytes(bomb_png(side, side), "ref")


def test_bytes_and_path_decoders_agree(tmp_path):
    data = png_bytes(20, 12, (1, 2, 3))
    (tmp_path / "a.png").write_bytes(data)
    from_bytes, from_path = open_image_bytes(data, "a"), open_image(tmp_path / "a.png", "a")
    assert from_bytes.size == from_path.size == (20, 12)
    assert from_bytes.tobytes() == from_path.tobytes()
    with pytest.raises(InputError, match="x is not image data"):
        open_image_bytes("text", "x")
    with pytest.raises(InputError, match="y is not a readable image"):
        open_image_bytes(b"", "y")


# --- errors ----------------------------------------------------------------------------------------------------

def test_error_helpers_statuses_and_bodies():
    cases = [
        (api.bad_field("size", "bad size"), 400, "invalid_request_error", "size"),
        (api.bad_key("no key"), 401, "invalid_request_error", None),
        (api.unknown_model("sdxl", ["flux2-dev", "flux2-klein-4b"]), 404, "invalid_request_error", "model"),
        (api.body_too_large(10, 5), 413, "invalid_request_error", None),
        (api.queue_full(8), 429, "rate_limit_error", None),
        (api.execution_error("12 (KSampler)", "out of memory"), 500, "server_error", None),
        (api.not_ready(), 503, "server_error", None),
    ]
    for error, status, kind, param in cases:
        assert (error.status, error.type, error.param) == (status, kind, param)
        body = json.loads(json.dumps(error.body()))
        assert body == {"error": {"message": error.message, "type": kind, "param": param, "code": error.code}}
    assert "Available models: flux2-dev, flux2-klein-4b." in cases[2][0].message
    assert "'sdxl' does not exist" in cases[2][0].message
    assert "none" in api.unknown_model("x", []).message
    assert "node 12 (KSampler): out of memory" in cases[5][0].message
    assert "10 bytes, more than the 5" in cases[3][0].message
    api.check_body_size(5, 5)
    assert refused(api.check_body_size, 6, 5).status == 413


# --- keys ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("header,words", [(None, "No API key"), ("", "No API key"), ("sk-secret", "Bearer <key>"),
                                          ("Basic sk-secret", "Bearer <key>"), ("Bearer ", "Bearer <key>"),
                                          ("Bearer sk-secreT", "Incorrect API key"),
                                          ("Bearer sk-secret-and-more", "Incorrect API key")])
def test_wrong_or_missing_keys_are_401(header, words):
    error = refused(api.check_api_key, header, "sk-secret")
    assert (error.status, error.code) == (401, "invalid_api_key")
    assert words in error.message
    assert "sk-secret" not in error.message


@pytest.mark.parametrize("header", ["Bearer sk-secret", "bearer sk-secret", "  Bearer   sk-secret  "])
def test_the_right_key_passes(header):
    assert api.check_api_key(header, "sk-secret") is None


def test_keys_are_compared_in_constant_time(monkeypatch):
    calls, real = [], hmac.compare_digest
    monkeypatch.setattr(api.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    api.check_api_key("Bearer sk-secret", "sk-secret")
    assert calls == [(b"sk-secret", b"sk-secret")]


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True), ("[::1]", True),
                                           ("localhost", True), ("127.0.0.1,::1", True), ("0.0.0.0", False),
                                           ("::", False), ("192.168.1.4", False), ("127.0.0.1,0.0.0.0", False),
                                           ("myhost.lan", False), ("", False)])
def test_loopback_rule(host, loopback):
    assert api.is_loopback(host) is loopback


def test_key_required_rule():
    assert api.key_required("127.0.0.1", None, False) is False
    assert api.key_required("127.0.0.1", "k", False) is True
    assert api.key_required("0.0.0.0", "k", False) is True
    assert api.key_required("0.0.0.0", None, True) is False
    error = refused(api.key_required, "0.0.0.0", "", False)
    assert error.status == 401
    assert "beyond loopback" in error.message and "FLUX2_ACCEL_API_KEY" in error.message


def test_authorize_combines_the_rule_and_the_key():
    api.authorize(None, "127.0.0.1", None, False)
    api.authorize("Bearer k", "0.0.0.0", "k", False)
    assert refused(api.authorize, "Bearer x", "0.0.0.0", "k", False).message == "Incorrect API key."
    assert refused(api.authorize, "Bearer x", "0.0.0.0", None, False).status == 401


# --- replies and stream events ---------------------------------------------------------------------------------

@pytest.mark.parametrize("output_format,compression", [("png", None), ("jpeg", 90), ("jpeg", 10), ("webp", 80)])
def test_encode_image_round_trips(output_format, compression):
    image = Image.new("RGB", (48, 32), (10, 200, 40))
    encoded = api.encode_image(image, output_format, compression)
    decoded = Image.open(io.BytesIO(encoded))
    assert decoded.format == output_format.upper()
    assert decoded.size == (48, 32)
    if output_format == "png":
        assert decoded.convert("RGB").tobytes() == image.tobytes()


def test_jpeg_compression_changes_the_size():
    image = Image.effect_noise((64, 64), 60).convert("RGB")
    assert len(api.encode_image(image, "jpeg", 5)) < len(api.encode_image(image, "jpeg", 95))


def test_b64_response_is_bare_base64_the_sdk_parses():
    from openai.types import ImagesResponse

    request = api.parse_generation_request({**BASE, "size": "32x16", "quality": "hd"})
    encoded = [png_bytes(32, 16), png_bytes(32, 16, (0, 0, 255))]
    reply = json.loads(json.dumps(api.images_response(1700000000, encoded, "b64_json", request=request)))
    assert reply["created"] == 1700000000
    assert [base64.b64decode(item["b64_json"], validate=True) for item in reply["data"]] == encoded
    assert not reply["data"][0]["b64_json"].startswith("data:")
    parsed = ImagesResponse.model_validate(reply)
    assert (parsed.size, parsed.quality, parsed.output_format, parsed.usage) == ("32x16", "high", "png", None)
    assert Image.open(io.BytesIO(base64.b64decode(parsed.data[1].b64_json))).getpixel((0, 0)) == (0, 0, 255)


def test_url_response_and_usage():
    from openai.types import ImagesResponse

    usage = {"input_tokens": 3, "input_tokens_details": {"image_tokens": 0, "text_tokens": 3}, "output_tokens": 0,
             "total_tokens": 3}
    reply = api.images_response(5, [b"a", b"b"], "url", urls=["http://127.0.0.1/view?a", "http://127.0.0.1/view?b"],
                                usage=usage)
    assert reply == {"created": 5, "data": [{"url": "http://127.0.0.1/view?a"}, {"url": "http://127.0.0.1/view?b"}],
                     "usage": usage}
    parsed = ImagesResponse.model_validate(reply)
    assert [item.url for item in parsed.data] == ["http://127.0.0.1/view?a", "http://127.0.0.1/view?b"]
    assert parsed.usage.total_tokens == 3
    with pytest.raises(ValueError, match="one URL per image"):
        api.images_response(5, [b"a", b"b"], "url", urls=["x"])


def parse_sse(stream: bytes) -> list[tuple[str, dict]]:
    events = []
    for block in stream.decode("utf-8").split("\n\n"):
        if not block:
            continue
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((lines["event"], json.loads(lines["data"])))
    return events


@pytest.mark.parametrize("edit", [False, True])
def test_stream_events_parse_back_and_with_the_sdk(edit):
    from openai.types import (ImageEditCompletedEvent, ImageEditPartialImageEvent, ImageGenCompletedEvent,
                              ImageGenPartialImageEvent)

    partial_type, completed_type = ((ImageEditPartialImageEvent, ImageEditCompletedEvent) if edit else
                                    (ImageGenPartialImageEvent, ImageGenCompletedEvent))
    request = api.parse_generation_request({**BASE, "size": "32x16", "stream": True, "partial_images": 2,
                                            "output_format": "webp", "quality": "standard"})
    previews = [png_bytes(8, 4, (i, i, i)) for i in range(2)]
    final = png_bytes(32, 16)
    stream = b"".join([*(api.sse_event(p["type"], p) for p in (api.partial_image_event(request, 9, i, data, edit)
                                                               for i, data in enumerate(previews))),
                       api.sse_event(*(lambda p: (p["type"], p))(api.completed_event(request, 9, final, edit=edit)))])
    events = parse_sse(stream)
    prefix = "image_edit" if edit else "image_generation"
    assert [name for name, _ in events] == [f"{prefix}.partial_image"] * 2 + [f"{prefix}.completed"]
    assert [payload["type"] for _, payload in events] == [name for name, _ in events]
    partials = [partial_type.model_validate(payload) for _, payload in events[:2]]
    assert [p.partial_image_index for p in partials] == [0, 1]
    assert [base64.b64decode(p.b64_json) for p in partials] == previews
    assert {(p.size, p.quality, p.output_format, p.created_at) for p in partials} == {("32x16", "medium", "webp", 9)}
    completed = completed_type.model_validate(events[2][1])
    assert base64.b64decode(completed.b64_json) == final
    assert completed.usage.total_tokens == 0


def test_sse_event_framing():
    assert api.sse_event("image_generation.completed", {"a": 1}) == (
        b'event: image_generation.completed\ndata: {"a":1}\n\n')
    with pytest.raises(ValueError):
        api.sse_event("x\ndata: injected", {})
