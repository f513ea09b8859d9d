"""Where webhooks may go: http(s) URLs whose every address is public, unless the configuration allows more.

A tenant chooses its endpoints' URLs, so a URL is a request for batchd to connect somewhere from inside the
operator's network. A host is refused when any address it resolves to is loopback, private, link-local,
shared (CGNAT), multicast, unspecified or reserved, including those same addresses inside IPv6 (IPv4-mapped,
NAT64, 6to4, Teredo), unless `[webhooks] allow_private_targets` or `allowed_networks` allows it. The check
runs when an endpoint is added and at every delivery: the deliverer's connector resolves through
`GuardedResolver`, so it connects to the very addresses it checked (DNS may answer differently each time).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import SplitResult, urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from .config import WebhookSettings

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMES = ("http", "https")
MAX_URL_LENGTH = 2048
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")


class TargetRefused(OSError):  # noqa: N818 - reads as the condition it reports
    """A URL or an address batchd will not deliver to; the message says why. An OSError, so that aiohttp's
    connector reports it from the resolver as a connection failure (ClientConnectorDNSError.os_error)."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for, when it carries one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def _kind(address: Address) -> str | None:
    """What makes an address non-public, or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in _NAT64_LOCAL:
            return "local-use NAT64"
        inner = _embedded_ipv4(address)
        if inner is not None:
            kind = _kind(inner)
            return None if kind is None else f"{kind} (inside IPv6)"
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-public", not address.is_global),
    )
    return next((kind for kind, hit in checks if hit), None)


@dataclass(frozen=True)
class TargetPolicy:
    allow_private: bool = False
    allowed: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: WebhookSettings) -> TargetPolicy:
        allowed = tuple(ipaddress.ip_network(network, strict=False) for network in settings.allowed_networks)
        return cls(settings.allow_private_targets, allowed)

    def refusal(self, text: str) -> str | None:
        """Why `text` (an IP address) may not be delivered to, or None when it may."""
        address = ipaddress.ip_address(text.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) names no host
        if self.allow_private or any(address in network for network in self.allowed):
            return None
        kind = _kind(address)
        if kind is None:
            return None
        return f"{text} is a {kind} address (allow it with [webhooks] allowed_networks)"

    def check_address(self, text: str) -> None:
        reason = self.refusal(text)
        if reason is not None:
            raise TargetRefused(reason)


def parse_url(url: str) -> SplitResult:
    """The URL's parts, if it is one batchd may deliver to whatever its host resolves to: http or https, a
    host, no credentials (the signature is what authenticates batchd), not too long."""
    if len(url) > MAX_URL_LENGTH:
        raise TargetRefused(f"a webhook URL may be at most {MAX_URL_LENGTH} characters")
    if url != url.strip() or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise TargetRefused("a webhook URL may not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise TargetRefused(f"not a URL: {error}") from None
    if parts.scheme.lower() not in SCHEMES:
        scheme = f"{parts.scheme}://" if parts.scheme else "a URL without a scheme"
        raise TargetRefused(f"a webhook URL must be http:// or https://, not {scheme}")
    if not parts.hostname:
        raise TargetRefused("a webhook URL must name a host")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("a webhook URL may not carry credentials: the signature authenticates batchd")
    if port == 0:
        raise TargetRefused("a webhook URL's port must be 1 to 65535")
    return parts


def ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def check_url(url: str, policy: TargetPolicy) -> None:
    """Refuses (TargetRefused) a URL that is not http(s), or whose host does not resolve or resolves to any
    address the policy refuses."""
    parts = parse_url(url)
    host = parts.hostname or ""
    if ip_literal(host):
        policy.check_address(host)
        return
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise TargetRefused(f"{host} does not resolve: {error}") from None
    for info in infos:
        policy.check_address(str(info[4][0]))


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing a host when any of its addresses is refused: the connector then connects
    only to addresses that were checked. (aiohttp does not resolve IP literals: the deliverer checks those
    itself.)"""

    def __init__(self, policy: TargetPolicy) -> None:
        self.policy = policy
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            reason = self.policy.refusal(result["host"])
            if reason is not None:
                raise TargetRefused(f"{host}: {reason}")
        return results

    async def close(self) -> None:
        await self._inner.close()
