"""Where a webhook may be sent: public internet addresses only, unless the operator allows private ones.

A webhook URL is chosen by a client, and the worker POSTs to it from inside the operator's
network: without a check, a client could make the service call cloud metadata
(``169.254.169.254``), an admin port on loopback or anything on the private network (SSRF).

* :func:`check_url` runs when a URL is registered: scheme, a well-formed host, and a host
  that is an IP literal in *any* notation (``127.1``, ``2130706433``, ``0x7f000001``,
  ``0177.0.0.1``, ``[::ffff:127.0.0.1]``) or ``localhost`` is judged by its address.
* :func:`resolve_checked` runs at every delivery: the name is resolved, *every* address is
  checked, and the caller connects to a checked address (never resolving again), so a name
  that later resolves elsewhere (DNS rebinding) cannot redirect the request.

Always refused: unspecified (``0.0.0.0/8``, ``::``), multicast, reserved, link-local
(``169.254/16``: cloud metadata; ``fe80::/10``). Refused unless
``LIKENESS_WEBHOOK_ALLOW_PRIVATE=true``: loopback, private (10/8, 172.16/12, 192.168/16,
``fc00::/7``), shared (100.64/10) and other non-global addresses. Redirects are never followed.
"""

from __future__ import annotations

import ipaddress
import re
import socket

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HOST_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")
_IPV4_PART = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")

# Indirection for tests (a resolver that answers what a rebinding DNS server would).
getaddrinfo = socket.getaddrinfo


class DestinationRefused(Exception):
    """The URL's destination is not allowed; ``str()`` says why in words a client can act on."""


def parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address of ``host`` in any notation a resolver accepts (``inet_aton``, WHATWG URL):
    1-4 dot-separated parts, each decimal, octal (leading 0) or hex (0x); the last part fills the
    remaining bytes (``127.1`` = 127.0.0.1, ``2130706433`` = 127.0.0.1). None: not an IPv4 literal."""
    parts = host.lower().removesuffix(".").split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.match(p) for p in parts):
        return None
    values = []
    for part in parts:
        if part.startswith("0x"):
            values.append(int(part[2:] or "0", 16))
        elif len(part) > 1 and part.startswith("0"):
            if not set(part) <= set("01234567"):
                return None
            values.append(int(part, 8))
        else:
            values.append(int(part))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        return None
    number = last
    for i, value in enumerate(head):
        number += value << (8 * (3 - i))
    return ipaddress.IPv4Address(number)


def literal_address(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is a literal (brackets, IPv6 zone and loose IPv4 notations allowed)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0] if ":" in host else host)
    except ValueError:
        return parse_ipv4(host)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped ``::ffff:a.b.c.d``, NAT64, 6to4, Teredo)."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def refusal(address: IPAddress, *, allow_private: bool) -> str | None:
    """Why ``address`` may not receive webhooks (None: it may)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return refusal(embedded, allow_private=allow_private)
    if address.is_unspecified or (isinstance(address, ipaddress.IPv4Address) and address in _THIS_NETWORK):
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_link_local:
        return "a link-local address (e.g. cloud metadata)"
    if address.is_reserved:
        return "a reserved address"
    if allow_private:
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a non-public address"
    return None


def check_url(url: str, *, allow_private: bool) -> httpx.URL:
    """The parsed URL if it may be registered; raises :class:`DestinationRefused` otherwise."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise DestinationRefused(f"The URL cannot be parsed: {exc}.") from None
    if parsed.scheme not in ("http", "https"):
        raise DestinationRefused("The webhook URL must be http(s).")
    host = parsed.raw_host.decode("ascii", errors="replace").lower()
    if not host:
        raise DestinationRefused("The webhook URL has no host.")
    address = literal_address(host)
    if address is None:
        if not _HOST_RE.match(host):
            raise DestinationRefused(f"The host {host!r} is not a valid host name.")
        if not allow_private and (host.removesuffix(".") == "localhost" or host.removesuffix(".").endswith(
                ".localhost")):
            raise DestinationRefused("The webhook URL points at localhost (a loopback address).")
        return parsed
    reason = refusal(address, allow_private=allow_private)
    if reason is not None:
        raise DestinationRefused(f"The webhook URL points at {reason} ({address}); webhooks go to public addresses.")
    return parsed


def resolve_checked(url: httpx.URL, *, allow_private: bool) -> list[IPAddress]:
    """Every address ``url``'s host resolves to, each checked; raises :class:`DestinationRefused` if any
    is not allowed (a name with one bad address is refused whole) and ``OSError`` if it does not resolve."""
    check_url(str(url), allow_private=allow_private)
    host = url.raw_host.decode("ascii").lower()
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    port = url.port or (443 if url.scheme == "https" else 80)
    addresses: list[IPAddress] = []
    for *_, sockaddr in getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        reason = refusal(address, allow_private=allow_private)
        if reason is not None:
            raise DestinationRefused(f"{host} resolves to {reason} ({address}); webhooks go to public addresses.")
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    return addresses


def pinned_request_args(url: httpx.URL, address: IPAddress) -> dict:
    """``httpx`` arguments that send to ``url`` over a connection to ``address``: the URL with the
    address as host, the original ``Host`` header and, for https, the original name for SNI and
    certificate checks."""
    pinned = url.copy_with(host=str(address))
    host = url.raw_host.decode("ascii")
    netloc = f"[{host}]" if ":" in host else host
    if url.port is not None:
        netloc += f":{url.port}"
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return {"url": pinned, "headers": {"Host": netloc}, "extensions": extensions}
