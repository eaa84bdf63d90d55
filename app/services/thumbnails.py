"""Small previews of stored pictures for the dashboard's pages (the originals are up to ~1.3 MB each).

A thumbnail is a WebP at most :data:`THUMB_PX` on its longer side, made from the blob on first request and
kept in this process's memory (least recently used first out, :data:`CACHE_BYTES` in all). Blob keys are
made of ids and never rewritten, so a thumbnail never goes stale and a browser may keep it.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image, ImageOps

from core.storage import BlobStore

THUMB_PX = 320
QUALITY = 80
CACHE_BYTES = 32 * 1024 * 1024
MEDIA_TYPE = "image/webp"

_cache: OrderedDict[str, bytes] = OrderedDict()
_cached_bytes = 0
_lock = threading.Lock()


def thumbnail(store: BlobStore, key: str) -> bytes:
    """The WebP thumbnail of the blob ``key`` (raises the store's ``BlobNotFound``)."""
    global _cached_bytes
    with _lock:
        if (found := _cache.get(key)) is not None:
            _cache.move_to_end(key)
            return found
    data = _make(store.get(key))
    with _lock:
        if key not in _cache:
            _cache[key] = data
            _cached_bytes += len(data)
        while _cached_bytes > CACHE_BYTES and _cache:
            _, dropped = _cache.popitem(last=False)
            _cached_bytes -= len(dropped)
    return data


def _make(original: bytes) -> bytes:
    with Image.open(io.BytesIO(original)) as image:
        image = ImageOps.exif_transpose(image)
        image.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        out = io.BytesIO()
        image.save(out, "WEBP", quality=QUALITY, method=4)
    return out.getvalue()
