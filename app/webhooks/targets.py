"""Which URLs a webhook or callback may target, and the one address it is sent to.

A target must be an absolute http(s) URL with a host and no credentials. Its name is
resolved once; every address it has must be public (not private, loopback, link-local,
multicast, reserved, unspecified or shared, also when carried inside an IPv6 address:
IPv4-mapped, 6to4, Teredo, NAT64) unless private targets are allowed. The request is then
sent to that checked address, with the name as Host header and TLS server name (SNI and
certificate check), so a second DNS answer (rebinding) never reaches the connection.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

import httpx

from app.errors import ApiErrorCode

MAX_URL_CHARS = 2048
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_ALLOW = "LOWERING_WEBHOOK_ALLOW_PRIVATE=true allows it"


class TargetRefused(Exception):
    """A URL the service does not send to; ``code`` says whether it is malformed
    (invalid_webhook_url) or points somewhere refused (webhook_target_refused)."""

    def __init__(self, code: ApiErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Target:
    """A checked URL and how to reach it: ``pinned_url`` holds the checked address."""

    url: str
    host: str
    port: int
    address: str
    pinned_url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, str] = field(default_factory=dict)


def _invalid(url: str, why: str) -> TargetRefused:
    return TargetRefused(ApiErrorCode.INVALID_WEBHOOK_URL, f"url {url[:100]!r} {why}")


def check_url(url: str) -> httpx.URL:
    """The URL parsed, or TargetRefused(invalid_webhook_url) saying what is wrong."""
    if len(url) > MAX_URL_CHARS:
        raise _invalid(url, f"is longer than {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise _invalid(url, "is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise _invalid(url, "must start with http:// or https://")
    if not parsed.host:
        raise _invalid(url, "has no host")
    if parsed.userinfo:
        raise _invalid(url, "must not carry credentials (user:password@); sign with the "
                       "webhook's secret instead")
    if any(ch.isspace() for ch in url):
        raise _invalid(url, "contains whitespace")
    return parsed


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """True for an address on the public internet (and whatever IPv4 it carries)."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None and not is_public(inner):
            return False
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local
                                 or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def _addresses(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        infos = []
    found: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if ip not in found:
            found.append(ip)
    return found


def resolve(url: str, *, allow_private: bool) -> Target:
    """Check ``url`` and resolve its host once; raises TargetRefused."""
    parsed = check_url(url)
    host = parsed.host
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = _addresses(host, port)
    if not addresses:
        raise TargetRefused(ApiErrorCode.WEBHOOK_TARGET_REFUSED,
                            f"the host {host[:100]!r} does not resolve")
    refused = [str(ip) for ip in addresses if not is_public(ip)]
    if refused and not allow_private:
        raise TargetRefused(ApiErrorCode.WEBHOOK_TARGET_REFUSED,
                            f"the host {host[:100]!r} resolves to {refused[0]}, which is not "
                            f"a public address (private, loopback, link-local, multicast, "
                            f"reserved or unspecified); {_ALLOW}")
    address = addresses[0]
    pinned = parsed.copy_with(host=str(address))
    headers: dict[str, str] = {}
    extensions: dict[str, str] = {}
    literal = _is_literal(host)
    if not literal:
        headers["host"] = host if parsed.port is None else f"{host}:{parsed.port}"
        if parsed.scheme == "https":
            extensions["sni_hostname"] = host
    return Target(url=url, host=host, port=port, address=str(address),
                  pinned_url=str(pinned), headers=headers, extensions=extensions)


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_callback(url: str | None, *, secret: str | None, allow_private: bool) -> None:
    """A submit's callback_url: refused (as the service's 422) when no secret signs
    callbacks, or when it points where webhooks may not (the same check as at
    registration and at every delivery)."""
    from app.errors import Unprocessable

    if url is None:
        return
    if secret is None:
        raise Unprocessable("callback_url needs LOWERING_WEBHOOK_CALLBACK_SECRET set on the "
                            "service (it signs callbacks); register a webhook instead",
                            code=ApiErrorCode.CALLBACKS_DISABLED)
    try:
        resolve(url, allow_private=allow_private)
    except TargetRefused as exc:
        raise Unprocessable(f"callback_url: {exc.message}", code=exc.code) from None
