"""Decoding untrusted image bytes: a bad or oversized image is a counted skip, never a crash or a memory blow-up."""

from __future__ import annotations

import io
import struct
import warnings

from PIL import Image

from dress_lightning.data.skips import SkipRecord

MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
"""Largest image decoded (PIL's own decompression-bomb threshold, ~89 megapixels); larger ones are skipped."""

UNREADABLE_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
"""What PIL raises on damaged or non-image bytes (UnidentifiedImageError is an OSError; a broken PNG a SyntaxError)."""


def decode_image(data: bytes, where: str = "") -> Image.Image:
    """Decode ``data`` fully into a PIL image; raise ``SkipRecord`` for an unreadable or too large one.

    PIL only warns between one and two times its pixel limit; here both are refused before any
    pixel is decoded, so a crafted header cannot make a worker allocate gigabytes.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise SkipRecord("image too large", f"{where}: {error}".lstrip(": ")) from None
        except UNREADABLE_IMAGE_ERRORS as error:
            raise SkipRecord("unreadable image", f"{where}: {type(error).__name__}: {error}".lstrip(": ")) from None
    return image
