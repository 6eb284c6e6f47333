"""Images of image+text datasets: what a data.image_column may hold, decoded to PIL.

A value is a Hugging Face Image struct `{bytes, path}` (as `datasets` writes it to parquet),
raw encoded bytes, or a path string. Bytes win over a path; a relative path is read from the
folder of the data file that holds the row (local or fsspec URL). Images are converted to RGB.
"""

from __future__ import annotations

import io
import posixpath
from typing import Any

import fsspec
import pyarrow as pa


class ImageError(ValueError):
    """An image value cannot be read or decoded."""


def is_image_type(t: pa.DataType) -> bool:
    """Arrow types an image column may have: struct{bytes, path}, binary, or string (null: all missing)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_struct(t):
        return {t.field(i).name for i in range(t.num_fields)} & {"bytes", "path"} != set()
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or pa.types.is_null(t))


def _read_path(path: str, data_file: str) -> bytes:
    if "://" not in path and not posixpath.isabs(path):
        folder = data_file.rsplit("/", 1)[0] if "/" in data_file else "."
        path = f"{folder}/{path}"
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except (OSError, ValueError) as e:
        raise ImageError(f"cannot read image file {path}: {e}") from None


def load_image(value: Any, data_file: str, doc_id: int) -> Any:
    """The PIL RGB image of one dataset value, or None for a missing image."""
    from PIL import Image, UnidentifiedImageError

    if value is None:
        return None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            return None
        raw = data if data is not None else _read_path(path, data_file)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
    elif isinstance(value, str):
        if not value:
            return None
        raw = _read_path(value, data_file)
    else:
        raise ImageError(f"doc {doc_id}: the image column holds {type(value).__name__}, expected an Image struct "
                         "{bytes, path}, bytes, or a path string")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ImageError(f"doc {doc_id}: its image cannot be decoded ({e}): fix or drop that row") from None
