"""Decoding image files with bounds: the one decoder for every image that enters from a file (CLI references).

PIL reads only the header on open; the size is checked against MAX_IMAGE_PIXELS before any pixel is decoded, so a
small file that claims a huge canvas (a decompression bomb) is refused, naming where it came from."""

from __future__ import annotations

import warnings

from .errors import InputError

MAX_IMAGE_PIXELS = 8192 * 8192  # far above what FLUX.2 takes as a reference (they are resized to ~1 megapixel)


def open_image(path, what: str):
    """The RGB image in `path`; InputError naming `what` (e.g. "--reference 'a.png'") when it is unreadable or
    larger than MAX_IMAGE_PIXELS."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InputError(f"{what} is {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS:,} this pack "
                                 "decodes; scale it down.")
            return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{what} claims a canvas too large to decode ({e}); scale it down.") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise InputError(f"{what} is not a readable image ({e}).") from None
