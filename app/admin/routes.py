"""The dashboard's pages and actions (``/admin``): server-rendered, htmx for the live parts.

Every route but the login form needs an admin session (:mod:`app.admin.auth`); every POST checks
the CSRF token. Data comes from the same services the API uses (``app.services.*``) through the
same unit of work, with ``caller=None`` where an admin sees every client's resources.
"""

from __future__ import annotations

import math
import mimetypes
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from pydantic import ValidationError

from app.admin import auth
from app.admin.auth import AdminSessionDep, CheckedForm
from app.admin.pages import AdminRoute, error_page, is_htmx, render, safe_next
from app.api.deps import SettingsDep, StoreDep, UoW
from app.api.schemas import ClientLimits
from app.errors import InvalidRequest, NotFound
from app.ratelimit import client_address
from app.services import clients, images, jobs, overview, photos, subjects, thumbnails, webhooks
from core.db.models import Job, Role
from core.storage import BlobNotFound, preview_key
from likeness.contract.plan import ACTIVE_STATES, JobKind, JobState, plan_for

router = APIRouter(prefix="/admin", route_class=AdminRoute, include_in_schema=False)

PAGE_SIZE = 25
NOTICES = {
    "canceled": "Cancel requested: a queued job stops now, a running one at its next step.",
    "retried": "A new job runs the same resolved request.",
    "revoked": "The client's key is refused from now on.",
    "limits": "Limits saved.",
    "redelivered": "The delivery is queued again from its first attempt.",
}


def _see(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


#: Every query parameter is bounded (a page past this, a date outside these years: 422, never an overflow).
MAX_PAGE = 100_000
FIRST_DATE, LAST_DATE = date(1970, 1, 1), date(9998, 12, 31)
MAX_FILTER_CHARS = 64


def _page_number(value: str | None) -> int:
    try:
        page = int(value or 1) if len(value or "") <= 12 else MAX_PAGE + 1
    except ValueError:
        raise InvalidRequest("The page must be a number.", {"page": value[:20] if value else value}) from None
    if page > MAX_PAGE:
        raise InvalidRequest(f"The page must be at most {MAX_PAGE}.", {"max_page": MAX_PAGE})
    return max(1, page)


def _filter_or_none(value: str | None, name: str) -> str | None:
    """A free-text filter (an id): short and without control characters, else 422."""
    if not value:
        return None
    if len(value) > MAX_FILTER_CHARS or not value.isprintable():
        raise InvalidRequest(f"{name} must be an id of at most {MAX_FILTER_CHARS} printable characters.",
                             {"parameter": name})
    return value


def _enum_or_none(cls, value: str | None, name: str):  # noqa: ANN001, ANN202
    if not value:
        return None
    try:
        return cls(value)
    except ValueError:
        raise InvalidRequest(f"Unknown {name} {value!r}.", {name: value, "allowed": [m.value for m in cls]}) from None


def _date_or_none(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        day = date.fromisoformat(value[:32])
    except ValueError:
        raise InvalidRequest(f"{name} must be a date like 2025-01-31.", {name: value[:32]}) from None
    if not FIRST_DATE <= day <= LAST_DATE:
        raise InvalidRequest(f"{name} must be a date between {FIRST_DATE} and {LAST_DATE}.", {name: value})
    return datetime.combine(day, datetime.min.time(), tzinfo=UTC)


def _notice(request: Request) -> str | None:
    return NOTICES.get(request.query_params.get("done", ""))


def _client_names(uow: UoW) -> dict[str, str]:
    rows, _ = clients.list_clients(uow.session, limit=1000)
    return {c.id: c.name for c in rows}


# ---- login ------------------------------------------------------------------------------------------------------


def _login_page(request: Request, settings, status: int = 200, error: str | None = None,  # noqa: ANN001
                next_page: str | None = None) -> Response:
    nonce = auth.login_nonce(request)
    response = render(request, "login.html", status=status, error=error, login_csrf=auth.login_csrf(settings, nonce),
                      next=safe_next(next_page or request.query_params.get("next")))
    response.set_cookie(auth.LOGIN_COOKIE, nonce, **auth.cookie_options(request, settings, auth.LOGIN_TTL_S))
    return response


@router.get("/login")
def login_form(request: Request, settings: SettingsDep):
    return _login_page(request, settings)


async def _posted_form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


#: Failed admin sign-ins allowed per address and minute (an admin key cannot be guessed, but it need not be tried).
LOGIN_FAILURES_PER_MINUTE = 10


@router.post("/login")
def login(request: Request, settings: SettingsDep, uow: UoW, form: Annotated[dict[str, str], Depends(_posted_form)]):
    auth.check_login_csrf(request, settings, form.get("csrf_token"))
    key, next_page = (form.get("api_key") or "").strip(), form.get("next")
    # Failed sign-ins are counted per address (a sliding minute); past the limit even a right key waits.
    limiter, address = request.app.state.rate_limiter, f"admin-login:{client_address(request)}"
    if not (waiting := limiter.peek(address, LOGIN_FAILURES_PER_MINUTE)).allowed:  # N failed: wait
        retry_after = max(1, math.ceil(waiting.reset_s))
        response = _login_page(request, settings, 429, f"Too many failed sign-ins from this address; "
                                                       f"try again in {retry_after} s.", next_page)
        response.headers.update({**waiting.headers(), "Retry-After": str(retry_after)})
        return response
    caller = clients.authenticate(uow.session, key) if key else None
    if caller is None or not caller.is_admin:
        limiter.hit(address, LOGIN_FAILURES_PER_MINUTE)
        # One message for unknown, revoked and non-admin keys; the key is never echoed back.
        return _login_page(request, settings, 401, "That is not a valid admin API key.", next_page)
    client = clients.get_client(uow.session, caller.id)
    response = _see(safe_next(next_page))
    response.set_cookie(auth.SESSION_COOKIE, auth.new_session_cookie(settings, client),
                        **auth.cookie_options(request, settings, auth.SESSION_TTL_S))
    response.delete_cookie(auth.LOGIN_COOKIE, path=auth.COOKIE_PATH)
    return response


@router.post("/logout")
def logout(form: CheckedForm):
    response = _see("/admin/login")
    response.delete_cookie(auth.SESSION_COOKIE, path=auth.COOKIE_PATH, httponly=True, samesite="strict")
    return response


# ---- overview ---------------------------------------------------------------------------------------------------


@router.get("")
@router.get("/")
def overview_page(request: Request, admin: AdminSessionDep, uow: UoW, settings: SettingsDep):
    data = overview.overview(uow.session, settings)
    return render(request, "overview.html", nav="overview", admin=admin, o=data, settings=settings)


# ---- jobs -------------------------------------------------------------------------------------------------------


@router.get("/jobs")
def jobs_page(request: Request, admin: AdminSessionDep, uow: UoW):
    q = request.query_params
    state = _enum_or_none(JobState, q.get("state"), "state")
    kind = _enum_or_none(JobKind, q.get("kind"), "kind")
    since, until = _date_or_none(q.get("date_from"), "date_from"), _date_or_none(q.get("date_to"), "date_to")
    page = _page_number(q.get("page"))
    rows, count = jobs.list_jobs(uow.session, None, state=state, kind=kind,
                                 client_id=_filter_or_none(q.get("client_id"), "client_id"),
                                 subject_id=_filter_or_none(q.get("subject_id"), "subject_id"), since=since,
                                 until=until + timedelta(days=1) if until else None,
                                 limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    filters = {k: q.get(k, "") for k in ("state", "kind", "client_id", "subject_id", "date_from", "date_to")}
    return render(request, "jobs.html", nav="jobs", admin=admin, rows=rows, count=count, page=page,
                  pages=max(1, -(-count // PAGE_SIZE)), filters=filters, client_names=_client_names(uow),
                  query={k: v for k, v in filters.items() if v})


@router.get("/jobs/{job_id}/row")
def job_row(request: Request, job_id: str, admin: AdminSessionDep, uow: UoW):
    """One row of the jobs table (polled while the job is queued or running)."""
    job = jobs.get_job(uow.session, None, job_id)
    client = clients.get_client(uow.session, job.client_id)
    return render(request, "_job_row.html", job=job, client_names={client.id: client.name})


def _job_context(uow: UoW, job: Job) -> dict:
    result = job.result or {}
    previews = [int(p["step"]) for p in result.get("previews") or []] if job.kind == JobKind.TRAIN else []
    return {"job": job, "stage_runs": jobs.list_stage_runs(uow.session, job.id), "previews": previews,
            "selected_step": (result.get("checkpoint_selection") or {}).get("selected_step"),
            "plan_stages": [s.value for s in plan_for(job.kind).stages], "active": job.state in ACTIVE_STATES}


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, admin: AdminSessionDep, uow: UoW):
    job = jobs.get_job(uow.session, None, job_id)
    deliveries, _ = webhooks.list_deliveries(uow.session, None, job_id=job.id, limit=100)
    client = clients.get_client(uow.session, job.client_id)
    subject = subjects.get_subject(uow.session, None, job.subject_id)
    return render(request, "job.html", nav="jobs", admin=admin, deliveries=deliveries, client=client,
                  status_of=webhooks.DeliveryStatus.of,
                  subject=subject, notice=_notice(request), **_job_context(uow, job))


@router.get("/jobs/{job_id}/live")
def job_live(request: Request, job_id: str, admin: AdminSessionDep, uow: UoW):
    """The job page's live part (state, progress, stages, actions); the page reloads once the job ends."""
    job = jobs.get_job(uow.session, None, job_id)
    if job.state not in ACTIVE_STATES and is_htmx(request):
        return Response(status_code=204, headers={"HX-Refresh": "true"})
    return render(request, "_job_live_update.html", client=clients.get_client(uow.session, job.client_id),
                  subject=subjects.get_subject(uow.session, None, job.subject_id), **_job_context(uow, job))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, form: CheckedForm, uow: UoW):
    job = jobs.cancel_job(uow, None, job_id)
    return _see(f"/admin/jobs/{job.id}?done=canceled")


@router.post("/jobs/{job_id}/retry")
def retry_job(job_id: str, form: CheckedForm, uow: UoW, settings: SettingsDep):
    job = jobs.retry_job(uow, job_id, settings)
    return _see(f"/admin/jobs/{job.id}?done=retried")


# ---- subjects ---------------------------------------------------------------------------------------------------


@router.get("/subjects")
def subjects_page(request: Request, admin: AdminSessionDep, uow: UoW):
    q = request.query_params
    page = _page_number(q.get("page"))
    client_id = _filter_or_none(q.get("client_id"), "client_id")
    rows, count = subjects.list_subjects(uow.session, None, client_id=client_id, limit=PAGE_SIZE,
                                         offset=(page - 1) * PAGE_SIZE)
    counts = {s.id: {"photos": photos.count_photos(uow.session, s.id),
                     "jobs": jobs.list_jobs(uow.session, None, subject_id=s.id, limit=1)[1]} for s in rows}
    return render(request, "subjects.html", nav="subjects", admin=admin, rows=rows, count=count, page=page,
                  pages=max(1, -(-count // PAGE_SIZE)), client_id=client_id or "", counts=counts,
                  models=subjects.trained_models(uow.session, [s.id for s in rows]),
                  client_names=_client_names(uow), query={"client_id": client_id} if client_id else {})


@router.get("/subjects/{subject_id}")
def subject_page(request: Request, subject_id: str, admin: AdminSessionDep, uow: UoW):
    subject = subjects.get_subject(uow.session, None, subject_id)
    trainings, _ = jobs.list_jobs(uow.session, None, subject_id=subject.id, kind=JobKind.TRAIN, limit=20)
    results = overview.train_results(trainings)
    trained, intake = next(((j, r.intake) for j, r in results if r.intake), (None, None))
    class_word, word_scores = overview.word_scores(intake)
    fitted, training = next(((j, r.training) for j, r in results if r.training), (None, None))
    gallery, image_count = images.list_images(uow.session, None, subject.id, limit=200, order="by_job")
    recent, job_count = jobs.list_jobs(uow.session, None, subject_id=subject.id, limit=10)
    return render(request, "subject.html", nav="subjects", admin=admin, subject=subject,
                  client=clients.get_client(uow.session, subject.client_id),
                  photos=photos.list_photos(uow.session, None, subject.id), trained=trained, class_word=class_word,
                  word_scores=word_scores, intake=intake, fitted=fitted, training=training,
                  curve=overview.loss_curve(training), gallery=gallery,
                  image_count=image_count, recent=recent, job_count=job_count,
                  model=subjects.trained_models(uow.session, [subject.id]).get(subject.id))


@router.get("/subjects/{subject_id}/delete")
def confirm_delete_subject(request: Request, subject_id: str, admin: AdminSessionDep, uow: UoW, store: StoreDep):
    subject = subjects.get_subject(uow.session, None, subject_id)
    return render(request, "subject_delete.html", nav="subjects", admin=admin, subject=subject,
                  holds=overview.subject_leftovers(uow.session, store, subject.id))


@router.post("/subjects/{subject_id}/delete")
def delete_subject(subject_id: str, form: CheckedForm, uow: UoW, store: StoreDep):
    subject = subjects.get_subject(uow.session, None, subject_id)
    if form.get("confirm_name") != subject.name:
        raise InvalidRequest("Type the subject's name exactly to confirm the deletion.", code="confirmation_mismatch")
    subjects.delete_subject(uow, None, subject.id, store)
    return _see(f"/admin/subjects/{subject.id}/deleted?client_id={subject.client_id}")


@router.get("/subjects/{subject_id}/deleted")
def subject_deleted(request: Request, subject_id: str, admin: AdminSessionDep, uow: UoW, store: StoreDep):
    left = overview.subject_leftovers(uow.session, store, subject_id)
    return render(request, "subject_deleted.html", nav="subjects", admin=admin, subject_id=subject_id, left=left,
                  client_id=request.query_params.get("client_id", ""))


# ---- media (admin-only; never a public URL) -----------------------------------------------------------------------


def _stream(store, key: str | None, what: str) -> StreamingResponse:  # noqa: ANN001
    if not key:
        raise NotFound(f"This {what} does not exist.", code="variant_not_found")
    try:
        chunks = store.open_stream(key)
    except BlobNotFound:
        raise NotFound(f"The {what} file is gone.", code="blob_not_found") from None
    media = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return StreamingResponse(chunks, media_type=media, headers={"Cache-Control": "private, max-age=300",
                                                                "X-Content-Type-Options": "nosniff"})


@router.get("/media/photos/{photo_id}/{variant}")
def photo_file(photo_id: str, variant: Literal["original", "crop", "mask"], admin: AdminSessionDep, uow: UoW,
               store: StoreDep):
    photo = photos.get_photo(uow.session, None, photo_id)
    key = {"original": photo.original_key, "crop": photo.crop_key, "mask": photo.mask_key}[variant]
    return _stream(store, key, f"photo {variant}")


@router.get("/media/previews/{job_id}/{step}")
def preview_file(job_id: str, step: int, admin: AdminSessionDep, uow: UoW, store: StoreDep):
    """A training preview the job lists (the job page shows them while it runs)."""
    job = jobs.get_job(uow.session, None, job_id)
    if step not in {p.get("step") for p in (job.result or {}).get("previews") or []}:
        raise NotFound("This preview does not exist.", code="blob_not_found")
    return _stream(store, preview_key(job.subject_id, job.id, step), "preview")


def _thumbnail(store, key: str | None, what: str) -> Response:  # noqa: ANN001
    if not key:
        raise NotFound(f"This {what} does not exist.", code="variant_not_found")
    try:
        data = thumbnails.thumbnail(store, key)
    except BlobNotFound:
        raise NotFound(f"The {what} file is gone.", code="blob_not_found") from None
    return Response(data, media_type=thumbnails.MEDIA_TYPE, headers={
        "Cache-Control": "private, max-age=86400, immutable", "X-Content-Type-Options": "nosniff"})


@router.get("/media/photos/{photo_id}/{variant}/thumb")
def photo_thumbnail(photo_id: str, variant: Literal["original", "crop", "mask"], admin: AdminSessionDep, uow: UoW,
                    store: StoreDep):
    """A small WebP of the photo (the pages show these; the link opens the file itself)."""
    photo = photos.get_photo(uow.session, None, photo_id)
    key = {"original": photo.original_key, "crop": photo.crop_key, "mask": photo.mask_key}[variant]
    return _thumbnail(store, key, f"photo {variant}")


@router.get("/media/images/{image_id}/{variant}/thumb")
def image_thumbnail(image_id: str, variant: Literal["original", "upscaled"], admin: AdminSessionDep, uow: UoW,
                    store: StoreDep):
    image = images.get_image(uow.session, None, image_id)
    return _thumbnail(store, images.image_blob_key(image, variant), f"{variant} image")


@router.get("/media/images/{image_id}/{variant}")
def image_file(image_id: str, variant: Literal["original", "upscaled"], admin: AdminSessionDep, uow: UoW,
               store: StoreDep):
    image = images.get_image(uow.session, None, image_id)
    return _stream(store, images.image_blob_key(image, variant), f"{variant} image")


# ---- clients ----------------------------------------------------------------------------------------------------


def _limits(form: dict[str, str], fields: tuple[str, ...] = clients.LIMIT_FIELDS) -> dict:
    """The limit fields of a form (empty: the service default), checked like the API checks them."""
    values = {name: (form.get(name) or "").strip() or None for name in fields}
    if values.get("max_candidates") is None:
        values.pop("max_candidates", None)
    try:
        return ClientLimits(**values).model_dump(include=set(fields))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(f"Invalid limits: {problems}", code="validation_error") from None


@router.get("/clients")
def clients_page(request: Request, admin: AdminSessionDep, uow: UoW, store: StoreDep):
    page = _page_number(request.query_params.get("page"))
    rows, count = clients.list_clients(uow.session, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    usage = {c.id: overview.client_usage(uow.session, store, c.id) for c in rows}
    return render(request, "clients.html", nav="clients", admin=admin, rows=rows, count=count, page=page,
                  pages=max(1, -(-count // PAGE_SIZE)), usage=usage, roles=[r.value for r in Role],
                  notice=_notice(request), query={})


@router.post("/clients")
def create_client(request: Request, form: CheckedForm, uow: UoW, admin: AdminSessionDep):
    name = (form.get("name") or "").strip()
    if not name or len(name) > 200:
        raise InvalidRequest("A client needs a name of 1 to 200 characters.", code="validation_error")
    role = _enum_or_none(Role, form.get("role") or "app", "role")
    client, key = clients.create_client(uow.session, name, role, **_limits(form))
    return render(request, "client_key.html", nav="clients", admin=admin, client=client, api_key=key,
                  created=True)


@router.get("/clients/{client_id}")
def client_page(request: Request, client_id: str, admin: AdminSessionDep, uow: UoW, store: StoreDep):
    client = clients.get_client(uow.session, client_id)
    subject_rows, _ = subjects.list_subjects(uow.session, None, client_id=client.id, limit=10)
    job_rows, _ = jobs.list_jobs(uow.session, None, client_id=client.id, limit=10)
    return render(request, "client.html", nav="clients", admin=admin, client=client,
                  usage=overview.client_usage(uow.session, store, client.id), subjects=subject_rows, jobs=job_rows,
                  notice=_notice(request), is_self=client.id == admin.caller.id)


@router.post("/clients/{client_id}/rotate")
def rotate_key(request: Request, client_id: str, form: CheckedForm, uow: UoW, admin: AdminSessionDep):
    client, key = clients.rotate_key(uow, client_id)
    return render(request, "client_key.html", nav="clients", admin=admin, client=client, api_key=key, created=False)


@router.post("/clients/{client_id}/revoke")
def revoke_key(client_id: str, form: CheckedForm, uow: UoW):
    client = clients.revoke(uow, client_id)
    return _see(f"/admin/clients/{client.id}?done=revoked")


@router.post("/clients/{client_id}/limits")
def set_limits(client_id: str, form: CheckedForm, uow: UoW):
    client = clients.set_limits(uow, client_id, **_limits(form))
    return _see(f"/admin/clients/{client.id}?done=limits")


# ---- webhook deliveries -------------------------------------------------------------------------------------------


@router.get("/webhooks")
def webhooks_page(request: Request, admin: AdminSessionDep, uow: UoW):
    q = request.query_params
    page = _page_number(q.get("page"))
    status = q.get("status") or None
    if status is not None and status not in list(webhooks.DeliveryStatus):
        raise InvalidRequest(f"Unknown status {status!r}.", {"allowed": [s.value for s in webhooks.DeliveryStatus]})
    rows, count = webhooks.list_deliveries(uow.session, None,
                                           client_id=_filter_or_none(q.get("client_id"), "client_id"),
                                           job_id=_filter_or_none(q.get("job_id"), "job_id"), status=status,
                                           limit=PAGE_SIZE,
                                           offset=(page - 1) * PAGE_SIZE)
    filters = {k: q.get(k, "") for k in ("client_id", "job_id", "status")}
    return render(request, "webhooks.html", nav="webhooks", admin=admin, rows=rows, count=count, page=page,
                  pages=max(1, -(-count // PAGE_SIZE)), filters=filters, client_names=_client_names(uow),
                  statuses=list(webhooks.DeliveryStatus), status_of=webhooks.DeliveryStatus.of,
                  notice=_notice(request),
                  query={k: v for k, v in filters.items() if v})


@router.post("/webhooks/{delivery_id}/redeliver")
def redeliver(delivery_id: str, form: CheckedForm, uow: UoW):
    webhooks.redeliver(uow, delivery_id)
    back = safe_next(form.get("back"))
    back = "/admin/webhooks" if back == "/admin" else back
    return _see(back + ("&" if "?" in back else "?") + "done=redelivered")


# ---- anything else under /admin -------------------------------------------------------------------------------------


@router.get("/{path:path}")
def not_found(request: Request, path: str, admin: AdminSessionDep):
    return error_page(request, 404, "Not found", "There is no such page in the dashboard.", "not_found")
