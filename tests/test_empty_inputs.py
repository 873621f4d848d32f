"""Values that would run silently wrong or fail deep inside a library are refused where they enter, naming them:
conditionings holding no tokens (a bridge, a remote reply) and remote timeouts that are not positive seconds."""

from __future__ import annotations

import re

import pytest
import torch
from flux2_accel.optim.errors import InputError
from flux2_accel.optim.native import conditioning as native_conditioning
from flux2_accel.optim.serve.remote.client import RemoteEncoderConfig, RemoteTextEncoder


@pytest.mark.parametrize("shape", [(1, 0, 64), (0, 512, 64), (1, 512, 0), (2, 0, 15360)])
def test_empty_native_conditioning_is_refused(shape):
    with pytest.raises(InputError, match=re.escape(f"conditioning holds no embeddings (shape {tuple(shape)})")):
        native_conditioning.from_native([[torch.zeros(shape), {"pooled_output": None}]])


@pytest.mark.parametrize("shape", [(1, 0, 64), (1, 512, 0), (0, 512, 64)])
def test_empty_remote_reply_is_a_problem_naming_the_shape(shape):
    encoder = RemoteTextEncoder(RemoteEncoderConfig(url="http://127.0.0.1:9/predict"))
    problem = encoder._problem(torch.zeros(shape), 1)
    assert problem is not None and str(tuple(shape)) in problem


@pytest.mark.parametrize("field, value", [("read_timeout", -1.0), ("read_timeout", float("nan")),
                                          ("read_timeout", 0), ("read_timeout", float("inf")),
                                          ("connect_timeout", 0.0), ("read_timeout", "5")])
def test_remote_timeout_must_be_positive_seconds(field, value):
    name = "timeout" if field == "read_timeout" else "connect timeout"
    with pytest.raises(InputError, match=f"^{name} "):
        RemoteTextEncoder(RemoteEncoderConfig(url="http://127.0.0.1:9/predict", **{field: value}))


def _png_header_claiming(tmp_path, width: int, height: int):
    """A valid PNG signature and IHDR claiming width x height, with no pixel data (a decompression bomb's header)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path = tmp_path / f"claims_{width}x{height}.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    return path


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (20_000, 20_000), (8193, 8192), (1, 70_000_000)])
def test_reference_images_are_decoded_with_bounds(tmp_path, width, height):
    from flux2_accel.optim.cli.generate import open_references as _open_references

    path = _png_header_claiming(tmp_path, width, height)
    with pytest.raises(InputError, match=re.escape(f"--reference '{path}'")):
        _open_references([str(path)])


def _image_of(height: int, width: int, batch: int = 1, channels: int = 3) -> torch.Tensor:
    """An IMAGE tensor of that shape that allocates one pixel (an expanded view): shape checks must not touch pixels."""
    return torch.zeros(1, 1, 1, 1).expand(batch, height, width, channels)


@pytest.mark.parametrize("image, named", [
    (_image_of(9000, 8193), "reference image 1 is 8193x9000 pixels"),
    (_image_of(64, 1_100_000, batch=2), "reference image 1 is 1100000x64 pixels"),
    (_image_of(63, 512), "reference image 1 is 512x63"),
    (_image_of(512, 512, channels=1), "reference_images has shape (1, 512, 512, 1)"),
    (torch.zeros(512, 512, 3), "reference_images has shape (512, 512, 3)"),
    (torch.zeros(0, 512, 512, 3), "reference_images has shape (0, 512, 512, 3)"),
])
def test_reference_image_tensors_are_bounded_before_any_pixel_is_converted(image, named):
    from flux2_accel.optim.run.sampling import reference_pil_images

    with pytest.raises(InputError, match=re.escape(named)):
        reference_pil_images(image)


def test_reference_images_within_bounds_pass_through_as_pil():
    from flux2_accel.optim.run.sampling import reference_pil_images
    from PIL import Image

    images = reference_pil_images(torch.full((2, 64, 96, 3), 0.5))
    assert [im.size for im in images] == [(96, 64), (96, 64)] and images[0].getpixel((0, 0)) == (128, 128, 128)
    small = Image.new("RGB", (64, 40))
    with pytest.raises(InputError, match=re.escape("reference image 2 is 64x40")):
        reference_pil_images([Image.new("RGB", (64, 64)), small])
