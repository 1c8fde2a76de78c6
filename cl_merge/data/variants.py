"""Deterministic image variants, for domain shifts and extra offline stages.

Each variant is a PIL-level function ``Image -> Image`` with no randomness, so a
variant of a dataset is a fixed dataset. Names are case-sensitive, lowercase.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image, ImageFilter, ImageOps

from cl_merge.errors import UnknownNameError, close_matches

_T = Image.Transpose

VARIANTS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "invert": lambda img: ImageOps.invert(img.convert("RGB")),
    "rotate90": lambda img: img.transpose(_T.ROTATE_90),  # counter-clockwise
    "rotate180": lambda img: img.transpose(_T.ROTATE_180),
    "rotate270": lambda img: img.transpose(_T.ROTATE_270),
    "hflip": lambda img: img.transpose(_T.FLIP_LEFT_RIGHT),
    "vflip": lambda img: img.transpose(_T.FLIP_TOP_BOTTOM),
    "transpose": lambda img: img.transpose(_T.TRANSPOSE),
    "edges": lambda img: img.convert("L").filter(ImageFilter.FIND_EDGES).convert("RGB"),
    "blur": lambda img: img.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(img.size) / 32))),
}


def available_variants() -> list[str]:
    return sorted(VARIANTS)


def get_variant(name: str) -> Callable[[Image.Image], Image.Image]:
    """The variant function called ``name``; UnknownNameError with close matches otherwise."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown image variant {name!r}{close_matches(name, VARIANTS)}; available: {', '.join(available_variants())}"
        ) from None


def apply_variant(image: Image.Image, name: str | None) -> Image.Image:
    return image if name is None else get_variant(name)(image)
