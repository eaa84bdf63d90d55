"""The caller's account: webhook registration and delivery log; style packs."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request

from app.api.deps import CurrentClient, SettingsDep, UoW
from app.api.routes import API_PREFIX
from app.api.routes._common import errors, page
from app.api.schemas import DeliveryPublic, Page, StylePublic, WebhookIn, WebhookOut
from app.services import webhooks
from pipelines.generation.styles import list_styles as load_styles

router = APIRouter(prefix=API_PREFIX, tags=["account"])


@router.put("/webhook", response_model=WebhookOut, responses=errors(),
            summary="Register the webhook URL for job events; returns a new signing secret (shown once)",
            description="Each job state change is POSTed as JSON, signed the Standard Webhooks way "
                        "(`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>` over "
                        "`<id>.<ts>.` + body with the base64 key of the `whsec_` secret) and, during a transition, "
                        "with `X-Likeness-Signature: t=<ts>,v1=<hex>`, hex = HMAC-SHA256(secret, `<ts>.` + body). "
                        "Failed deliveries are retried with backoff. "
                        "The URL must reach a public address (422 `invalid_webhook_url` for loopback, private, "
                        "link-local, multicast, reserved or unspecified ones, in any notation; checked again "
                        "after DNS resolution at every delivery); redirects are not followed.")
def put_webhook(body: WebhookIn, caller: CurrentClient, uow: UoW, settings: SettingsDep):
    secret = webhooks.set_webhook(uow.session, caller, body.url, settings)
    return WebhookOut(url=body.url, secret=secret)


@router.get("/webhook/deliveries", response_model=Page[DeliveryPublic], responses=errors(),
            summary="Webhook delivery log (newest first)")
def list_deliveries(request: Request, caller: CurrentClient, uow: UoW, job_id: str | None = None,
                    limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=1_000_000)):
    rows, count = webhooks.list_deliveries(uow.session, caller, job_id=job_id, limit=limit, offset=offset)
    return page(request, [DeliveryPublic.model_validate(r) for r in rows], count, offset)


@router.get("/styles", response_model=Page[StylePublic], responses=errors(), summary="Available style packs")
def list_styles(caller: CurrentClient):
    data = [StylePublic(name=s.name, version=s.version, title=s.title, description=s.description, aspect=s.aspect,
                        controlnet=s.controlnet.model_dump() if s.controlnet else None) for s in load_styles()]
    return {"data": data, "count": len(data)}
