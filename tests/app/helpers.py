"""Small builders shared by the API tests."""

from __future__ import annotations

import contextlib
import io
import struct
import zlib

from PIL import Image

from tests.conftest import encode, noise_image


def jpeg(size: int = 320, seed: int = 0, **save_kw) -> bytes:  # noqa: ANN003
    return encode(noise_image(size, seed), "JPEG", quality=90, **save_kw)


def png_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header declares ``width x height`` pixels (never decodable safely)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_with_gps(size: int = 320) -> bytes:
    image = noise_image(size, 7)
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (48.0, 51.0, 24.0)
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def create_subject(client, name: str = "Grace") -> str:  # noqa: ANN001
    response = client.post("/v1/subjects", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def upload(client, subject_id: str, files: list[tuple[str, bytes]], **kw):  # noqa: ANN001, ANN003, ANN201
    return client.post(f"/v1/subjects/{subject_id}/photos",
                       files=[("files", (name, data, "image/jpeg")) for name, data in files], **kw)


def subject_with_photo(client) -> str:  # noqa: ANN001
    subject_id = create_subject(client)
    response = upload(client, subject_id, [("a.jpg", jpeg())])
    assert response.status_code == 201 and response.json()["stored"] == 1, response.text
    return subject_id


def add_adapter(subject_id: str, version: int = 1, preset: str | None = None) -> None:
    """What a finished training leaves behind (as the worker writes it); ``preset``: the one it was trained
    on, as the adapter's manifest records it (None: an adapter from before manifests recorded it)."""
    from core.db.models import Adapter
    from core.storage import adapter_prefix
    from tests.app.fixtures import session_scope

    manifest = {"base": "tiny"} if preset is None else {"base": "tiny", "preset": preset}
    with session_scope() as session:
        session.add(Adapter(subject_id=subject_id, version=version, mode="lora",
                            blob_prefix=adapter_prefix(subject_id, version), manifest=manifest))


@contextlib.contextmanager
def served(app, **uvicorn_options):  # noqa: ANN001, ANN003, ANN201
    """``app`` behind a real uvicorn server on a free 127.0.0.1 port (its lifespan off: the test app's is run
    by the ``http`` fixture); yields the base URL. What uvicorn itself does (proxy headers) is then real."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                                           **uvicorn_options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)
