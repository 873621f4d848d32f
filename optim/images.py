"""Decoding images with bounds: the one decoder for every image that enters from a file (CLI references) or from
bytes (reference images uploaded to the OpenAI-compatible API).

PIL reads only the header on open; the size is checked against MAX_IMAGE_PIXELS before any pixel is decoded, so a
small file that claims a huge canvas (a decompression bomb) is refused, naming where it came from."""

from __future__ import annotations

import io
import warnings

from .errors import InputError

MAX_IMAGE_PIXELS = 8192 * 8192  # far above what FLUX.2 takes as a reference (they are resized to ~1 megapixel)


def open_image(path, what: str):
    """The RGB image in `path`; InputError naming `what` (e.g. "--reference 'a.png'") when it is unreadable or
    larger than MAX_IMAGE_PIXELS."""
    return _decode(path, what)


def open_image_bytes(data: bytes, what: str):
    """The RGB image encoded in `data` (an uploaded file's bytes), with the same bounds and errors as open_image."""
    if not isinstance(data, (bytes, bytearray)):
        raise InputError(f"{what} is not image data (got {type(data).__name__}).")
    return _decode(io.BytesIO(bytes(data)), what)


def _decode(source, what: str):
    """Header first, size check, then the pixels: `source` is a path or a binary file object."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(f"{what} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} this pack "
                                 "decodes; scale it down.")
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{what} claims a canvas too large to decode ({e}); scale it down.") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise InputError(f"{what} is not a readable image ({e}).") from None
