"""From the endpoints a user names to the addresses the client dials.

A target is ``host:port`` (``[v6]:port`` for an IPv6 literal). An IP literal is one address. A
name is resolved, and every address it resolves to is one endpoint: a Kubernetes headless
Service name resolves to its pods' addresses, each a replica. Names are resolved again every
``resolve_interval_s``, so that pods that come and go are added and removed; a failed resolution
keeps the addresses known before (DNS being down must not empty the pool). A target with a gRPC
scheme (``unix:``, ``ipv4:``...) is passed to gRPC as it is, as one endpoint; ``dns:///host:port``
is resolved here like ``host:port`` (gRPC's own DNS resolution would pick the first address).

Changes come as ``Change`` lists (added and removed addresses) so that the endpoints that stay
keep their channels and statistics (as tower's ``Discover`` does).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

Resolver = Callable[[str, int], list[tuple[str, int]]]


@dataclass(frozen=True)
class Target:
    """One endpoint the user named: ``host`` and ``port``, or a ``raw`` gRPC target."""

    text: str
    host: str = ""
    port: int = 0
    raw: bool = False

    @property
    def is_name(self) -> bool:
        """Whether ``host`` must be resolved (it is neither an IP literal nor a raw target)."""
        if self.raw:
            return False
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return True
        return False


@dataclass(frozen=True)
class Address:
    """One dialable endpoint: the gRPC target string, and the target it came from (whose host
    is the TLS server name when the address is an IP resolved from a name)."""

    dial: str
    target: Target

    def __str__(self) -> str:
        return self.dial

    def with_port(self, port: int) -> str | None:
        """The same host at another port (``None`` for a raw target such as ``unix:``)."""
        if self.target.raw:
            return None
        return dial_string(parse_target(self.dial).host, port)


def parse_target(text: str) -> Target:
    """``host:port``, ``[v6]:port``, or a target with a gRPC scheme (``unix:/path``)."""
    text = text.strip()
    if not text:
        raise ValueError("an empty endpoint: expected host:port")
    if text.startswith("dns:///"):  # resolved here, not by gRPC's pick_first
        text = text[len("dns:///"):]
    scheme = text.split(":", 1)[0]
    if scheme in ("unix", "unix-abstract", "ipv4", "ipv6", "vsock"):
        return Target(text, raw=True)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"endpoint {text!r}: expected [address]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"endpoint {text!r}: expected host:port ([address]:port for IPv6)")
    if not host:
        raise ValueError(f"endpoint {text!r}: no host")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {text!r}: the port must be 1..65535")
    return Target(text, host, int(port))


def dial_string(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def system_resolver(host: str, port: int) -> list[tuple[str, int]]:
    """Every TCP address ``host`` resolves to, in the resolver's order, without repeats."""
    seen: dict[tuple[str, int], None] = {}
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        seen[(sockaddr[0], sockaddr[1])] = None
    return list(seen)


class Discovery:
    """The current addresses of ``targets``; ``resolve()`` re-resolves names and says what
    changed."""

    def __init__(self, targets: Sequence[Target], resolver: Resolver = system_resolver) -> None:
        self.targets = list(targets)
        self._resolver = resolver
        self._known: dict[Target, list[Address]] = {}
        for target in self.targets:
            if not target.is_name:
                dial = target.text if target.raw else dial_string(target.host, target.port)
                self._known[target] = [Address(dial, target)]
        self.errors: dict[Target, str] = {}

    def addresses(self) -> list[Address]:
        """Every known address, in the order of the targets, without repeats."""
        out: dict[str, Address] = {}
        for target in self.targets:
            for address in self._known.get(target, ()):
                out.setdefault(address.dial, address)
        return list(out.values())

    def resolve(self) -> tuple[list[Address], list[Address]]:
        """Resolve every name again: ``(added, removed)`` addresses."""
        before = {a.dial: a for a in self.addresses()}
        for target in self.targets:
            if not target.is_name:
                continue
            try:
                found = self._resolver(target.host, target.port)
            except OSError as exc:  # keep what was known: DNS down must not empty the pool
                self.errors[target] = f"{type(exc).__name__}: {exc}"
                continue
            self.errors.pop(target, None)
            self._known[target] = [Address(dial_string(h, p), target) for h, p in found]
        after = {a.dial: a for a in self.addresses()}
        added = [a for d, a in after.items() if d not in before]
        removed = [a for d, a in before.items() if d not in after]
        return added, removed


def parse_targets(endpoints: str | Iterable[str]) -> list[Target]:
    """Targets from a list, or from one string of comma-separated ones (``REST_RETRIEVER``)."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    targets = [parse_target(item) for item in items if not isinstance(item, str) or item.strip()]
    if not targets:
        raise ValueError("RemoteRetriever needs at least one endpoint (host:port)")
    return targets
