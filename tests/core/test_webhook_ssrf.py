"""Webhooks never reach the operator's own network unless the operator allows it (SSRF): refused at
registration in every notation, again at delivery after DNS resolution, and redirects are not followed."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from core import webhook_targets, webhooks
from tests.app.helpers import subject_with_photo
from tests.core.test_webhooks import Receiver, allow_private, receiver  # noqa: F401 - fixtures

REFUSED = [
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata (link-local)
    "http://127.0.0.1:8080/hook", "http://127.1/", "http://2130706433/", "http://0x7f000001/", "http://0177.0.0.1/",
    "http://0x7f.1/", "http://127.000.000.001/", "http://0.0.0.0/", "http://0/", "http://0.1.2.3/",
    "http://10.1.2.3/", "http://192.168.1.1/", "http://172.16.0.1/", "http://172.31.255.255/", "http://100.64.0.1/",
    "http://[::1]/", "http://[::]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/", "http://[fc00::1]/",
    "http://[fd12:3456::1]/", "http://[fe80::1]/", "http://[64:ff9b::7f00:1]/", "http://[2002:7f00:1::]/",
    "http://224.0.0.1/", "http://[ff02::1]/", "http://240.0.0.1/", "http://255.255.255.255/",
    "http://localhost:8000/", "http://LOCALHOST./", "http://admin.localhost/", "http://%31%32%37.0.0.1/",
    "ftp://example.com/", "http:///nohost",
]
PUBLIC = ["https://hooks.example.com/likeness", "http://93.184.216.34:8080/hook", "http://[2606:4700::1111]/hook"]
ALWAYS_REFUSED = ["http://169.254.169.254/", "http://[fe80::1]/", "http://0.0.0.0/", "http://224.0.0.1/",
                  "http://240.0.0.1/", "http://[::ffff:169.254.169.254]/"]


@pytest.mark.parametrize("url", REFUSED)
def test_registration_refuses_non_public_destinations_in_every_notation(client_a, url):
    response = client_a.put("/v1/webhook", json={"url": url})
    assert response.status_code == 422, (url, response.text)
    assert response.json()["code"] == "invalid_webhook_url" and response.json()["message"]


def test_registration_accepts_public_destinations(client_a):
    for url in PUBLIC:
        response = client_a.put("/v1/webhook", json={"url": url})
        assert response.status_code == 200 and response.json()["url"] == url, response.text


def test_an_operator_may_allow_private_targets_but_never_metadata_or_unspecified(client_a, allow_private):  # noqa: F811
    for url in ("http://127.0.0.1:9000/hook", "http://10.0.0.5/hook", "http://[fd00::5]/hook", "http://localhost/"):
        assert client_a.put("/v1/webhook", json={"url": url}).status_code == 200, url
    for url in ALWAYS_REFUSED:
        assert client_a.put("/v1/webhook", json={"url": url}).status_code == 422, url


@pytest.mark.parametrize("host,expected", [("127.1", "127.0.0.1"), ("2130706433", "127.0.0.1"),
                                           ("0x7f000001", "127.0.0.1"), ("0177.0.0.01", "127.0.0.1"),
                                           ("10.0x10.1", "10.16.0.1"), ("1.2.3.4.", "1.2.3.4"),
                                           ("4294967296", None), ("1.256.1.1", None), ("08.0.0.1", None),
                                           ("example.com", None), ("1e3", None)])
def test_loose_ipv4_notations_are_read_as_resolvers_read_them(host, expected):
    parsed = webhook_targets.parse_ipv4(host)
    assert (str(parsed) if parsed else None) == expected


def _fake_dns(monkeypatch, answers: dict[str, list[str]]) -> list[str]:
    """Resolve names from ``answers`` (what a rebinding DNS server would say); returns the names asked."""
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        asked.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        family = {4: socket.AF_INET, 6: socket.AF_INET6}
        return [(family[ipaddress.ip_address(a).version], socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(webhook_targets, "getaddrinfo", getaddrinfo)
    return asked


def _delivery_to(client, url: str) -> str:  # noqa: ANN001
    """A delivery row for a job event of ``client`` whose webhook is ``url`` (stored as is)."""
    from core import sealed
    from core.config import get_settings
    from core.db.models import Client, Job
    from tests.app.fixtures import session_scope

    subject_id = subject_with_photo(client)
    job_id = client.post(f"/v1/subjects/{subject_id}/train").json()["id"]
    with session_scope() as session:
        row = session.get(Client, client.id)
        row.webhook_url, row.webhook_secret = url, sealed.seal(get_settings(), "whsec_test")
        session.flush()
        return webhooks.queue_job_event(session, session.get(Job, job_id))


def _delivery(delivery_id: str):  # noqa: ANN202
    from core.db.models import WebhookDelivery
    from tests.app.fixtures import session_scope

    with session_scope() as session:
        return session.get(WebhookDelivery, delivery_id)


def test_a_name_that_resolves_to_loopback_at_delivery_is_refused(client_a, receiver, monkeypatch):  # noqa: F811
    """DNS rebinding: the name passed registration (public-looking), then resolves to the local listener."""
    port = receiver.server.server_address[1]
    asked = _fake_dns(monkeypatch, {"hooks.example.test": ["127.0.0.1"], "mixed.example.test": ["93.184.216.34",
                                                                                              "10.0.0.7"]})
    assert client_a.put("/v1/webhook", json={"url": f"http://hooks.example.test:{port}/hook"}).status_code == 200
    delivery_id = _delivery_to(client_a, f"http://hooks.example.test:{port}/hook")
    assert webhooks.record_and_send(delivery_id) is False  # refused for good, not retried
    row = _delivery(delivery_id)
    assert row.error == webhooks.DESTINATION_REFUSED and row.delivered_at is None and row.next_attempt_at is None
    assert asked == ["hooks.example.test"] and receiver.requests == []
    # The tenant's log never says what an internal name resolves to.
    logged = client_a.get("/v1/webhook/deliveries").json()["data"]
    assert logged and all("127.0.0.1" not in (d["error"] or "") and "loopback" not in (d["error"] or "")
                          for d in logged)

    # One bad address among several refuses the name: every address is checked.
    mixed = _delivery_to(client_a, f"http://mixed.example.test:{port}/hook")
    assert webhooks.record_and_send(mixed) is False and _delivery(mixed).error == webhooks.DESTINATION_REFUSED
    assert "10.0.0.7" not in _delivery(mixed).error
    assert receiver.requests == []


def test_a_loopback_url_stored_before_the_check_is_refused_at_delivery(client_a, receiver):  # noqa: F811
    delivery_id = _delivery_to(client_a, receiver.url)  # http://127.0.0.1:<port>/hook, as once accepted
    assert webhooks.record_and_send(delivery_id) is False
    assert _delivery(delivery_id).error == webhooks.DESTINATION_REFUSED and receiver.requests == []


def test_delivery_connects_to_the_address_it_checked(client_a, receiver, allow_private, monkeypatch):  # noqa: F811
    """The name is resolved once; the request goes to that address with the original Host header."""
    port = receiver.server.server_address[1]
    asked = _fake_dns(monkeypatch, {"receiver.example.test": ["127.0.0.1"]})
    delivery_id = _delivery_to(client_a, f"http://receiver.example.test:{port}/hook")
    assert webhooks.record_and_send(delivery_id) is False
    assert _delivery(delivery_id).delivered_at is not None and asked == ["receiver.example.test"]
    headers, _ = receiver.requests[-1]
    assert headers["host"] == f"receiver.example.test:{port}"


def test_redirects_are_not_followed(client_a, allow_private):  # noqa: F811
    redirecting = Receiver(status=302, location="http://169.254.169.254/latest/meta-data/")
    try:
        delivery_id = _delivery_to(client_a, redirecting.url)
        assert webhooks.record_and_send(delivery_id) is False
        row = _delivery(delivery_id)
        assert row.status_code == 302 and "redirects are not followed" in row.error and row.delivered_at is None
        assert len(redirecting.requests) == 1
    finally:
        redirecting.close()
