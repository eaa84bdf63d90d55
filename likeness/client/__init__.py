"""The typed Python client of the Likeness API (httpx + pydantic; no torch, no server code).

::

    from likeness.client import Client, LikenessError
    from likeness.contract.requests import GenerateRequest, TrainRequest

    with Client("http://127.0.0.1:8000", "lk_...") as api:        # or LIKENESS_API_URL / LIKENESS_API_KEY
        subject = api.create_subject("Grace", external_ref="user-42")
        upload = api.upload_photos(subject.id, ["a.jpg", "b.jpg", "c.heic", "d.jpg", "e.jpg"])
        for verdict in upload.files:
            print(verdict.filename, verdict.status, verdict.reason_code or "")
        job = api.train(subject.id, TrainRequest())                # Idempotency-Key sent for you
        for job in api.wait(job.id):                               # polls with backoff
            print(job.stage, f"{job.progress:.0f}%", job.eta_s)
        gen = api.wait_for(api.generate(subject.id, GenerateRequest(style="cinematic", n=8, k=4)).id)
        for image in api.list_images(subject.id, job_id=gen.id).data:
            open(f"{image.rank}.png", "wb").write(api.download_image(image.id, "upscaled"))

``AsyncClient`` offers the same methods as coroutines. Every failure is a :class:`LikenessError`
with ``code``, ``message``, ``details`` and ``status``.
"""

from likeness.client._policy import Backoff, Retry
from likeness.client.aio import AsyncClient
from likeness.client.errors import LikenessError
from likeness.client.models import (
    FileVerdict,
    Image,
    Job,
    Page,
    Photo,
    Preview,
    SignedUrl,
    Style,
    Subject,
    UploadResult,
    Webhook,
)
from likeness.client.sync import Client
from likeness.webhooks import SIGNATURE_HEADER, verify

__all__ = [
    "SIGNATURE_HEADER",
    "AsyncClient",
    "Backoff",
    "Client",
    "FileVerdict",
    "Image",
    "Job",
    "LikenessError",
    "Page",
    "Photo",
    "Preview",
    "Retry",
    "SignedUrl",
    "Style",
    "Subject",
    "UploadResult",
    "Webhook",
    "verify",
]
