"""The synchronous client."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import httpx

import likeness
from likeness.client import _calls as calls
from likeness.client._calls import Call, FileLike
from likeness.client._policy import Backoff, Retry
from likeness.client.errors import WAIT_TIMEOUT, LikenessError, from_transport
from likeness.client.models import Image, Job, Page, Photo, Preview, SignedUrl, Style, Subject, UploadResult, Webhook
from likeness.contract.plan import JobKind, JobState
from likeness.contract.requests import GenerateRequest, TrainRequest

Variant = Literal["original", "upscaled"]
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


def _user_agent() -> str:
    return f"likeness-python/{likeness.__version__}"


def env_url(url: str | None) -> str:
    url = url or os.environ.get("LIKENESS_API_URL")
    if not url:
        raise LikenessError("missing_api_url", "Give the API's URL (or set LIKENESS_API_URL).")
    return url.rstrip("/")


def env_key(key: str | None) -> str:
    key = key or os.environ.get("LIKENESS_API_KEY")
    if not key:
        raise LikenessError("missing_api_key", "Give an API key (or set LIKENESS_API_KEY).")
    return key


class Client:
    """A typed client of the Likeness API.

    ``Client(url, key)``; both default to ``LIKENESS_API_URL`` / ``LIKENESS_API_KEY``. Every
    failure raises :class:`~likeness.client.errors.LikenessError`. Creating calls (subjects,
    uploads, train, generate) carry an Idempotency-Key of their own, so their retries never
    create anything twice. ``http`` lets a test pass its own ``httpx.Client`` (e.g. FastAPI's
    ``TestClient``).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: httpx.Timeout | float = DEFAULT_TIMEOUT, retry: Retry = Retry(),
                 http: httpx.Client | None = None):
        self.base_url = env_url(base_url) if http is None else (base_url or str(http.base_url)).rstrip("/")
        self._auth = {"Authorization": f"Bearer {env_key(api_key)}", "User-Agent": _user_agent()}
        self.retry = retry
        self._own_http = http is None
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout)

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- transport ----------------------------------------------------------------------------------------

    def _send(self, call: Call, *, stream: bool = False) -> httpx.Response:
        attempts = self.retry.attempts if call.retryable else 1
        for attempt in range(1, attempts + 1):
            request = self._http.build_request(call.endpoint.method, call.path, **_with(call, self._auth))
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt == attempts:
                    raise from_transport(exc, self.base_url) from None
                time.sleep(self.retry.delay(attempt))
                continue
            if attempt < attempts and response.status_code in (408, 429, 502, 503, 504):
                retry_after = _retry_after(response)
                response.close()
                time.sleep(self.retry.delay(attempt, retry_after))
                continue
            if attempt > 1 and call.endpoint.method == "DELETE" and response.status_code == 404:
                response.status_code = 204  # an earlier attempt deleted it; its answer was lost
            return response
        raise AssertionError("unreachable")

    def _call(self, call: Call):
        response = self._send(call)
        return call.parse(response)

    # ---- subjects -----------------------------------------------------------------------------------------

    def create_subject(self, name: str, *, external_ref: str | None = None,
                       class_token_override: str | None = None) -> Subject:
        """A new subject (a person to learn), tagged with your own end-user reference if given."""
        return self._call(calls.create_subject(name, external_ref, class_token_override))

    def list_subjects(self, *, external_ref: str | None = None, limit: int = 50, offset: int = 0) -> Page[Subject]:
        """Your subjects, newest first; with ``external_ref`` only that end user's."""
        return self._call(Call("list_subjects", params={"external_ref": external_ref, "limit": limit,
                                                         "offset": offset}))

    def get_subject(self, subject_id: str) -> Subject:
        return self._call(Call("get_subject", {"subject_id": subject_id}))

    def delete_subject(self, subject_id: str) -> None:
        """Delete the subject with every photo, adapter and image (database and blobs)."""
        self._call(Call("delete_subject", {"subject_id": subject_id}))

    # ---- photos -------------------------------------------------------------------------------------------

    def upload_photos(self, subject_id: str, files: Iterable[FileLike]) -> UploadResult:
        """Upload 1-30 photos; each file gets its own verdict (``result.files``)."""
        return self._call(calls.upload_photos(subject_id, files))

    def list_photos(self, subject_id: str) -> Page[Photo]:
        """The subject's photos with the intake's verdicts (``pending`` until a training judged them)."""
        return self._call(Call("list_photos", {"subject_id": subject_id}))

    # ---- jobs ---------------------------------------------------------------------------------------------

    def train(self, subject_id: str, request: TrainRequest | None = None) -> Job:
        return self._call(calls.train(subject_id, request))

    def generate(self, subject_id: str, request: GenerateRequest) -> Job:
        return self._call(calls.generate(subject_id, request))

    def get_job(self, job_id: str) -> Job:
        return self._call(Call("get_job", {"job_id": job_id}))

    def list_jobs(self, *, subject_id: str | None = None, state: JobState | None = None,
                  kind: JobKind | None = None, limit: int = 50, offset: int = 0) -> Page[Job]:
        return self._call(Call("list_jobs", params={"subject_id": subject_id, "state": state, "kind": kind,
                                                     "limit": limit, "offset": offset}))

    def cancel_job(self, job_id: str) -> Job:
        return self._call(Call("cancel_job", {"job_id": job_id}))

    def wait(self, job_id: str, *, timeout_s: float | None = None, backoff: Backoff = Backoff(),
             max_outage_s: float | None = 60.0) -> Iterator[Job]:
        """Poll the job until it ends, yielding it each time its state, stage or progress changes.

        The last job yielded is final (``job.done``). Polls back off while nothing changes; an
        API that is briefly unreachable is waited out for up to ``max_outage_s`` (``None``:
        forever). ``timeout_s`` bounds the whole wait (``LikenessError(code="wait_timeout")``).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay, last, outage_since = backoff.initial_s, None, None
        while True:
            try:
                job = self.get_job(job_id)
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
            time.sleep(delay)

    def wait_for(self, job_id: str, **kwargs) -> Job:
        """Poll until the job ends; returns the final job (see :meth:`wait`)."""
        job = None
        for job in self.wait(job_id, **kwargs):  # noqa: B007 - the last one is the answer
            pass
        assert job is not None
        return job

    # ---- images, adapters, styles -------------------------------------------------------------------------

    def list_images(self, subject_id: str, *, job_id: str | None = None, limit: int = 100,
                    offset: int = 0) -> Page[Image]:
        """The subject's portraits, best first: every rank 1 (newest job first), then every rank 2, ..."""
        return self._call(Call("list_images", {"subject_id": subject_id},
                               params={"job_id": job_id, "limit": limit, "offset": offset}))

    def download_image(self, image_id: str, variant: Variant = "original") -> bytes:
        """The image's PNG bytes (``upscaled``: the x2/x4 file)."""
        return self._call(Call("download_image", {"image_id": image_id}, params={"variant": variant}))

    def download_preview(self, preview: Preview) -> bytes:
        """A training preview's PNG bytes (``job.previews``; its URL expires a few minutes after the poll)."""
        return self._call(calls.download_preview(preview.url))

    def image_url(self, image_id: str, variant: Variant = "original") -> SignedUrl:
        """A short-lived absolute URL that needs no API key (hand it to a browser or a chat)."""
        signed = self._call(calls.image_url(image_id, variant))
        return signed.model_copy(update={"url": self.base_url + signed.url})

    def download_adapter(self, subject_id: str, dest: str | Path = ".", *,
                         format: Literal["diffusers", "kohya"] = "diffusers",  # noqa: A002 - the API's name
                         version: int | None = None, chunk_size: int = 1 << 20) -> Path:
        """Stream the subject's trained adapter to ``dest`` (a folder: the server's file name); returns the path."""
        call = Call("download_adapter", {"subject_id": subject_id}, params={"format": format, "version": version})
        response = self._send(call, stream=True)
        try:
            if response.status_code >= 400:
                response.read()
                call.parse(response)
            path = _destination(dest, calls.filename_from(response, f"adapter-{subject_id}"))
            part = path.with_name(path.name + ".part")
            with part.open("wb") as out:
                for chunk in response.iter_bytes(chunk_size):
                    out.write(chunk)
            part.replace(path)
            return path
        except httpx.TransportError as exc:
            raise from_transport(exc, self.base_url) from None
        finally:
            response.close()

    def list_styles(self) -> Page[Style]:
        return self._call(Call("list_styles"))

    def set_webhook(self, url: str | None) -> Webhook:
        """Register (or with ``None`` remove) the webhook; the answer's ``secret`` is shown only now."""
        return self._call(Call("set_webhook", body=calls.WebhookIn(url=url)))


def _with(call: Call, auth: dict[str, str]) -> dict:
    kwargs = call.request_kwargs()
    kwargs["headers"] = {**auth, **kwargs["headers"]}
    return kwargs


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _progress_key(job: Job) -> tuple:
    return job.state, job.stage, round(job.progress, 1), job.eta_s is None, len(job.previews)


def _destination(dest: str | Path, filename: str) -> Path:
    """A folder (an existing one, or a path spelt with a trailing separator) gets the server's file name."""
    folder = str(dest).endswith(("/", os.sep))  # read before Path() drops the separator
    dest = Path(dest)
    if folder or dest.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        return dest / filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest
