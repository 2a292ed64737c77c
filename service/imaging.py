"""Image decoding and preprocessing, as a model's manifest says."""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from .errors import ApiError

FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP"}


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image from encoded bytes; EXIF orientation applied, alpha composited on white,
    GIFs' first frame. Raises ApiError 400 (undecodable), 413 (too many pixels), 415."""
    if not data:
        raise ApiError(400, "empty image", "bad_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in FORMATS:
                raise ApiError(415, f"unsupported image format {image.format}; "
                               f"send one of {sorted(FORMATS)}", "unsupported_media")
            width, height = image.size
            if width * height > max_pixels:
                raise ApiError(413, f"image is {width}x{height} = {width * height} pixels; "
                               f"the limit is {max_pixels}", "too_many_pixels")
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, f"image too large: {e}", "too_many_pixels") from None
    except UnidentifiedImageError:
        raise ApiError(400, f"could not decode image: not an image in any of {sorted(FORMATS)}",
                       "bad_image") from None
    except Exception as e:  # Pillow raises many types for corrupt data
        raise ApiError(400, f"could not decode image: {e}", "bad_image") from None
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


@functools.lru_cache(maxsize=64)
def _normalizer(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with pixel * scale - shift == (pixel / 255 - mean) / std, built once."""
    scale = torch.tensor([1 / (255 * s) for s in std], dtype=torch.float32)[:, None, None]
    shift = torch.tensor([m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float32)
    return scale, shift[:, None, None]


def to_tensor(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    """(3, size, size) normalized tensor: shorter side resized to `size`, then center crop."""
    width, height = image.size
    scale = size / min(width, height)
    if (width, height) != (size, size):
        resized = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(resized, Image.Resampling.BILINEAR)
        left = (image.width - size) // 2
        top = (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    factor, shift = _normalizer(tuple(mean), tuple(std))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return pixels * factor - shift


# Payloads up to this size decode on the event loop (tens of microseconds); larger ones go to
# a worker thread, so a big image never stalls other requests.
INLINE_DECODE_BYTES = 16 * 1024


async def preprocess_async(images: list[bytes], manifest: dict, max_pixels: int) -> torch.Tensor:
    """preprocess(), inline for small payloads, else in a worker thread."""
    if sum(len(data) for data in images) <= INLINE_DECODE_BYTES:
        return preprocess(images, manifest, max_pixels)
    return await run_in_threadpool(preprocess, images, manifest, max_pixels)


def preprocess(images: list[bytes], manifest: dict, max_pixels: int) -> torch.Tensor:
    """Encoded images -> the model's normalized input batch (N, 3, size, size)."""
    spec = manifest["input"]
    return torch.stack([to_tensor(decode(data, max_pixels), spec["size"], spec["mean"],
                                  spec["std"]) for data in images])
