"""The asynchronous client: the same calls as :class:`~likeness.client.sync.Client`, awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import httpx

from likeness.client import _calls as calls
from likeness.client._calls import Call, FileLike
from likeness.client._policy import Backoff, Retry
from likeness.client.errors import WAIT_TIMEOUT, LikenessError, from_transport
from likeness.client.models import Image, Job, Page, Photo, Preview, SignedUrl, Style, Subject, UploadResult, Webhook
from likeness.client.sync import (
    DEFAULT_TIMEOUT,
    Variant,
    _destination,
    _progress_key,
    _retry_after,
    _user_agent,
    _with,
    env_key,
    env_url,
)
from likeness.contract.plan import JobKind, JobState
from likeness.contract.requests import GenerateRequest, TrainRequest


class AsyncClient:
    """``async with AsyncClient(url, key) as api: job = await api.get_job(job_id)``."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT, retry: Retry = Retry(),
                 http: httpx.AsyncClient | None = None):
        self.base_url = env_url(base_url) if http is None else (base_url or str(http.base_url)).rstrip("/")
        self._auth = {"Authorization": f"Bearer {env_key(api_key)}", "User-Agent": _user_agent()}
        self.retry = retry
        self._own_http = http is None
        self._http = http or httpx.AsyncClient(base_url=self.base_url, timeout=timeout)

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        attempts = self.retry.attempts if call.retryable else 1
        for attempt in range(1, attempts + 1):
            request = self._http.build_request(call.endpoint.method, call.path, **_with(call, self._auth))
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt == attempts:
                    raise from_transport(exc, self.base_url) from None
                await asyncio.sleep(self.retry.delay(attempt))
                continue
            if attempt < attempts and response.status_code in (408, 429, 502, 503, 504):
                retry_after = _retry_after(response)
                await response.aclose()
                await asyncio.sleep(self.retry.delay(attempt, retry_after))
                continue
            if attempt > 1 and call.endpoint.method == "DELETE" and response.status_code == 404:
                response.status_code = 204  # an earlier attempt deleted it; its answer was lost
            return response
        raise AssertionError("unreachable")

    async def _call(self, call: Call):
        return call.parse(await self._send(call))

    # ---- subjects -----------------------------------------------------------------------------------------

    async def create_subject(self, name: str, *, external_ref: str | None = None,
                             class_token_override: str | None = None) -> Subject:
        return await self._call(calls.create_subject(name, external_ref, class_token_override))

    async def list_subjects(self, *, external_ref: str | None = None, limit: int = 50,
                            offset: int = 0) -> Page[Subject]:
        return await self._call(Call("list_subjects", params={"external_ref": external_ref, "limit": limit,
                                                               "offset": offset}))

    async def get_subject(self, subject_id: str) -> Subject:
        return await self._call(Call("get_subject", {"subject_id": subject_id}))

    async def delete_subject(self, subject_id: str) -> None:
        await self._call(Call("delete_subject", {"subject_id": subject_id}))

    # ---- photos -------------------------------------------------------------------------------------------

    async def upload_photos(self, subject_id: str, files: Iterable[FileLike]) -> UploadResult:
        return await self._call(calls.upload_photos(subject_id, files))

    async def list_photos(self, subject_id: str) -> Page[Photo]:
        return await self._call(Call("list_photos", {"subject_id": subject_id}))

    # ---- jobs ---------------------------------------------------------------------------------------------

    async def train(self, subject_id: str, request: TrainRequest | None = None) -> Job:
        return await self._call(calls.train(subject_id, request))

    async def generate(self, subject_id: str, request: GenerateRequest) -> Job:
        return await self._call(calls.generate(subject_id, request))

    async def get_job(self, job_id: str) -> Job:
        return await self._call(Call("get_job", {"job_id": job_id}))

    async def list_jobs(self, *, subject_id: str | None = None, state: JobState | None = None,
                        kind: JobKind | None = None, limit: int = 50, offset: int = 0) -> Page[Job]:
        return await self._call(Call("list_jobs", params={"subject_id": subject_id, "state": state, "kind": kind,
                                                           "limit": limit, "offset": offset}))

    async def cancel_job(self, job_id: str) -> Job:
        return await self._call(Call("cancel_job", {"job_id": job_id}))

    async def wait(self, job_id: str, *, timeout_s: float | None = None, backoff: Backoff = Backoff(),
                   max_outage_s: float | None = 60.0) -> AsyncIterator[Job]:
        """Like :meth:`Client.wait <likeness.client.sync.Client.wait>`: ``async for job in api.wait(id)``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay, last, outage_since = backoff.initial_s, None, None
        while True:
            try:
                job = await self.get_job(job_id)
                outage_since = None
            except LikenessError as exc:
                if not exc.transient:
                    raise
                outage_since = outage_since or time.monotonic()
                if max_outage_s is not None and time.monotonic() - outage_since > max_outage_s:
                    raise
                job = None
            if job is not None:
                changed = last is None or _progress_key(job) != _progress_key(last)
                if changed:
                    yield job
                    last = job
                if job.done:
                    return
                delay = backoff.next(delay, changed)
            else:
                delay = backoff.next(delay, False)
            if deadline is not None and time.monotonic() + delay > deadline:
                raise LikenessError(WAIT_TIMEOUT, f"Job {job_id} did not finish within {timeout_s} s.",
                                    {"job_id": job_id, "state": last.state.value if last else None})
            await asyncio.sleep(delay)

    async def wait_for(self, job_id: str, **kwargs) -> Job:
        job = None
        async for job in self.wait(job_id, **kwargs):  # noqa: B007 - the last one is the answer
            pass
        assert job is not None
        return job

    # ---- images, adapters, styles -------------------------------------------------------------------------

    async def list_images(self, subject_id: str, *, job_id: str | None = None, limit: int = 100,
                          offset: int = 0) -> Page[Image]:
        return await self._call(Call("list_images", {"subject_id": subject_id},
                                     params={"job_id": job_id, "limit": limit, "offset": offset}))

    async def download_image(self, image_id: str, variant: Variant = "original") -> bytes:
        return await self._call(Call("download_image", {"image_id": image_id}, params={"variant": variant}))

    async def download_preview(self, preview: Preview) -> bytes:
        return await self._call(calls.download_preview(preview.url))

    async def image_url(self, image_id: str, variant: Variant = "original") -> SignedUrl:
        signed = await self._call(calls.image_url(image_id, variant))
        return signed.model_copy(update={"url": self.base_url + signed.url})

    async def download_adapter(self, subject_id: str, dest: str | Path = ".", *, format: str = "diffusers",  # noqa: A002
                               version: int | None = None, chunk_size: int = 1 << 20) -> Path:
        call = Call("download_adapter", {"subject_id": subject_id}, params={"format": format, "version": version})
        response = await self._send(call, stream=True)
        try:
            if response.status_code >= 400:
                await response.aread()
                call.parse(response)
            path = _destination(dest, calls.filename_from(response, f"adapter-{subject_id}"))
            part = path.with_name(path.name + ".part")
            with part.open("wb") as out:
                async for chunk in response.aiter_bytes(chunk_size):
                    out.write(chunk)
            part.replace(path)
            return path
        except httpx.TransportError as exc:
            raise from_transport(exc, self.base_url) from None
        finally:
            await response.aclose()

    async def list_styles(self) -> Page[Style]:
        return await self._call(Call("list_styles"))

    async def set_webhook(self, url: str | None) -> Webhook:
        return await self._call(Call("set_webhook", body=calls.WebhookIn(url=url)))
