"""``retriever-server``: serve a datastore (or some of its shards) over gRPC.

    retriever-server --datastore DIR [--shard NAME ...] [--host 127.0.0.1] [--port 50051]

Besides ``rest.retriever.v1.Retriever`` the server runs the standard health service and server
reflection. ``--port 0`` binds a free port; the bound address is printed on stdout as
``retriever-server listening on HOST:PORT``. On SIGTERM (or SIGINT) health turns NOT_SERVING, new
calls are refused, calls in flight get up to ``--grace-s`` seconds to finish, then the process
exits 0.

``--search-port N`` also answers Search, SearchStream and Info on a second port from the engine's
own gRPC server (``native.py``; no Python on an accepted request's path), printed on a line of its
own (``retriever-server native searches listening on HOST:PORT``) and advertised in
``InfoResponse.search_port``.

Each shard has its own health name (``rest.retriever.v1.Retriever/<shard>``) and goes out of
service when its file changes under the server, fails ``--verify`` or fails the background scrub
(``shards.py``); SIGHUP reopens the datastore from its files (a reload) and serves it again.

For tests and benchmarks, ``BackgroundServer`` runs the same server in a thread of the calling
process.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import signal
import socket
import ssl
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import click
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from rest.cli_errors import one_line, run

from retriever_service.auth import TOKEN_ENV, BearerTokenInterceptor, check_token, token_option
from retriever_service.native import NativeSearchPort
from retriever_service.searches import AsyncSearches
from retriever_service.servicer import SERVICE, RetrieverServicer, add_to_server
from retriever_service.shards import ServedShards, ShardOptions
from retriever_service.shards import open_datastore as open_shards
from retriever_service.telemetry import SearchTelemetry, providers_from_env, serve_prometheus
from retriever_service.validation import PolicyCaps

log = logging.getLogger("retriever_service.server")

SERVICE_NAME = SERVICE.full_name
MiB = 1 << 20


# The accepted values of every numeric option, (lowest, highest): one table for the command line
# (click ranges) and for ``ServerConfig`` (its own check, for callers that build it in code).
INT32_MS_S = (2**31 - 1) / 1000  # gRPC takes times as int32 milliseconds
OPTION_RANGES: dict[str, tuple[float, float]] = {
    "port": (0, 65535),
    "max_concurrent_searches": (1, 1_000_000),
    "workers": (1, 1024),
    "max_context_tokens": (1, 1 << 24),
    "inline_search_us": (0, 1_000_000),
    "max_message_bytes": (1024, 2**31 - 1),  # gRPC takes it as an int32
    "keepalive_time_s": (0.001, INT32_MS_S),
    "keepalive_timeout_s": (0.001, INT32_MS_S),
    "grace_s": (0.0, 86_400.0),
    "scrub_mib_per_s": (0, 1 << 20),
    "exact_max_budget": (0, 4096),
    "exact_max_depth": (1, 256),
    "rest_max_budget": (0, 4096),
    "rest_max_depth": (1, 256),
}


def default_workers() -> int:
    return min(os.cpu_count() or 1, OPTION_RANGES["workers"][1])


def option_name(field_name: str) -> str:
    """``max_context_tokens`` -> ``--max-context-tokens``: messages name the option."""
    return "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server is started with (the command line's options, one for one)."""

    datastore: str
    shards: tuple[str, ...] = ()  # empty: every shard of the datastore
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port
    # A second, plaintext port that serves only the health service (None: none), for probes that
    # cannot speak TLS (the kubelet's gRPC probes) when the main port uses it.
    health_port: int | None = None
    # A second port on the same host where the engine's own gRPC server (no Python on the path of
    # a request) answers Search, SearchStream and Info, advertised in InfoResponse.search_port
    # (0: a free port; None: none), with the main port's TLS. Not opened on a traced server
    # (see docs/SERVER.md).
    search_port: int | None = None
    max_concurrent_searches: int = 64  # in flight at once, running or waiting for a worker
    workers: int = field(default_factory=default_workers)  # search threads
    max_context_tokens: int = 4096
    # With no other search in flight, a search first runs on the event loop for at most this long
    # per back-off level it asks for (exact policy only), then goes to a worker: a thread hand-off
    # costs more than most searches.
    inline_search_us: int = 200
    max_message_bytes: int = 4 * MiB
    keepalive_time_s: float = 30.0  # ping an idle client this often...
    keepalive_timeout_s: float = 10.0  # ...and drop it if the ping is not answered in time
    grace_s: float = 10.0  # how long calls in flight may run on after SIGTERM
    tls_cert: str | None = None  # PEM files; cert + key turn TLS on
    tls_key: str | None = None
    tls_client_ca: str | None = None  # also require client certificates signed by this CA
    token: str | None = None  # require "authorization: Bearer <token>"; never empty
    metrics_port: int | None = None  # serve Prometheus text on http://metrics_host:port/metrics
    metrics_host: str | None = None  # None: the same as host
    verify: bool = False  # full checksums of every shard before serving; failing shards not served
    scrub_mib_per_s: int = 8  # background re-check of the shards' checksums (0: none)
    # The largest budget and max_depth accepted per policy (the cost of a search grows with both).
    exact_max_budget: int = 4096
    exact_max_depth: int = 256
    rest_max_budget: int = 1024
    rest_max_depth: int = 64

    def __post_init__(self) -> None:
        for name, (lowest, highest) in OPTION_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{option_name(name)} must be a number, got {value!r}")
            if not (math.isfinite(value) and lowest <= value <= highest):
                raise ValueError(f"{option_name(name)} must be in {lowest}..{highest}, got {value}")
        if not self.host:
            raise ValueError("--host must not be empty (0.0.0.0 for every interface)")
        if self.health_port is not None:
            lowest, highest = OPTION_RANGES["port"]
            if isinstance(self.health_port, bool) or not isinstance(self.health_port, int) or not (
                lowest <= self.health_port <= highest
            ):
                raise ValueError(f"--health-port must be in {lowest}..{highest}, got {self.health_port}")
            if self.health_port == self.port != 0:
                raise ValueError(f"--health-port must differ from --port (both {self.port})")
        if self.search_port is not None:
            lowest, highest = OPTION_RANGES["port"]
            if isinstance(self.search_port, bool) or not isinstance(self.search_port, int) or not (
                lowest <= self.search_port <= highest
            ):
                raise ValueError(f"--search-port must be in {lowest}..{highest}, got {self.search_port}")
            for other, value in (("--port", self.port), ("--health-port", self.health_port)):
                if value == self.search_port != 0:
                    raise ValueError(f"--search-port must differ from {other} (both {value})")
        for shard in self.shards:
            if not shard:
                raise ValueError("--shard must not be empty")
        if len(set(self.shards)) != len(self.shards):
            raise ValueError(f"--shard names a shard twice: {list(self.shards)}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        check_token(self.token, "--token")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be in 0..65535, got {self.metrics_port}")
        if self.metrics_host is not None and self.metrics_port is None:
            raise ValueError("--metrics-host needs --metrics-port")

    def shard_options(self) -> ShardOptions:
        return ShardOptions(datastore=self.datastore, shards=self.shards, verify=self.verify,
                            scrub_bytes_per_s=self.scrub_mib_per_s * MiB, workers=self.workers)

    def policy_caps(self) -> tuple[tuple[str, PolicyCaps], ...]:
        return (("exact", PolicyCaps(self.exact_max_budget, self.exact_max_depth)),
                ("rest", PolicyCaps(self.rest_max_budget, self.rest_max_depth)))

    def channel_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # Let clients ping as often as this server pings them, without being cut off for it.
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
            # A second server on the same fixed port must fail to bind, not silently share it.
            ("grpc.so_reuseport", 0),
        ]


def open_datastore(config: ServerConfig):
    """The datastore to serve: shards that cannot be opened (or fail ``--verify``) stay out of
    service; fails when no shard can be served."""
    return open_shards(config.shard_options())


def check_tls_files(config: ServerConfig) -> None:
    """Refuse TLS files that gRPC could not use, before anything binds, naming the file: a
    certificate that is not PEM, a key that is not, is encrypted, or does not belong to the
    certificate, a client CA with no certificate in it. (gRPC itself reports all of these as a
    failure to bind.)"""
    if config.tls_cert is None:
        return
    cert, key, client_ca = config.tls_cert, config.tls_key, config.tls_client_ca
    for option, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{option} {path}: no such file")
    for option, path in (("--tls-cert", cert), ("--tls-client-ca", client_ca)):
        if path is None:
            continue
        try:
            ssl.create_default_context(cafile=path)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"{option} {path}: not a PEM certificate ({exc.__class__.__name__}:"
                f" {getattr(exc, 'reason', None) or exc}); give the file that starts with"
                " -----BEGIN CERTIFICATE-----"
            ) from None

    def encrypted() -> bytes:
        raise ValueError(f"--tls-key {key} is encrypted: gRPC needs an unencrypted key file")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=encrypted)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(
                f"--tls-key {key} is not the key of the certificate --tls-cert {cert}; give the"
                " key that the certificate was issued for"
            ) from None
        raise ValueError(
            f"--tls-key {key}: not a PEM private key; give the file that starts with"
            " -----BEGIN PRIVATE KEY----- (or EC/RSA PRIVATE KEY)"
        ) from None


def shard_names(path: str) -> list[str]:
    from rest.datastore import Datastore

    return list(Datastore.open(path).shard_names)


def _tls_files(config: ServerConfig) -> tuple[bytes, bytes, bytes | None] | None:
    """``(certificate, key, client CA or None)`` as PEM bytes; None without TLS."""
    if config.tls_cert is None:
        return None
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return Path(config.tls_cert).read_bytes(), Path(config.tls_key).read_bytes(), client_ca


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None:
        return None
    check_tls_files(config)
    cert, key, client_ca = _tls_files(config)
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class RetrieverServer:
    """A started server: its bound ``port``, its health service (also on ``health_port`` when
    configured), a ``reload`` of its datastore and a graceful ``shutdown``."""

    def __init__(self, server: grpc.aio.Server, port: int, health: HealthServicer,
                 shards: ServedShards, health_server: tuple[grpc.aio.Server, int] | None = None,
                 native: NativeSearchPort | None = None):
        self.server = server
        self.port = port
        self.native = native
        self.search_port = native.port if native is not None else None
        self.health = health
        self.shards = shards
        self._health_server = health_server[0] if health_server else None
        self.health_port = health_server[1] if health_server else None

    async def reload(self) -> None:
        """Reopens the datastore from its files and serves it (SIGHUP)."""
        await self.shards.reload()

    async def shutdown(self, grace_s: float) -> None:
        # NOT_SERVING first, so health watchers (load balancers) stop sending before refusals.
        await self.health.enter_graceful_shutdown()
        if self.native is None:
            await self.server.stop(grace_s)
        else:  # both ports stop accepting at once, and share the grace period
            await asyncio.gather(self.server.stop(grace_s),
                                 asyncio.to_thread(self.native.stop, grace_s))
        if self._health_server is not None:  # probes see NOT_SERVING until the very end
            await self._health_server.stop(0)
        self.shards.close()


async def start_health_server(
    config: ServerConfig, health: HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """The plaintext server on ``config.health_port`` that answers only ``grpc.health.v1``
    (no Retriever, no reflection: it reveals nothing but SERVING or NOT_SERVING), sharing the
    main server's health statuses."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{host_for_address(config.host)}:{config.health_port}"
    problem = why_bind_fails(config.host, config.health_port, port_option="--health-port")
    try:
        port = server.add_insecure_port(address) if problem is None else 0
    except RuntimeError:
        port = 0
    if port == 0:
        problem = problem or "gRPC could not bind it"
        raise OSError(f"could not listen on {address}: {problem}")
    await server.start()
    return server, port


async def start_server(
    config: ServerConfig, datastore=None, *, tracer_provider=None, meter_provider=None
) -> RetrieverServer:
    """Start serving ``datastore`` (opened from ``config`` when not given) on ``config``'s address.

    Tracing is switched on by passing a ``tracer_provider``: without one the gRPC instrumentation
    is not installed at all, so an untraced server pays nothing for it.
    """
    datastore = datastore if datastore is not None else open_datastore(config)
    searches = AsyncSearches(datastore.search_executor(config.workers, as_wire=True))
    traced = tracer_provider is not None or meter_provider is not None
    telemetry = SearchTelemetry("server", tracer_provider, meter_provider) if traced else None
    interceptors = []
    if tracer_provider is not None:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.instrumentation.grpc.filters import health_check, negate

        # The interceptor iterates a server-streaming handler's result, but the asyncio health
        # servicer's Watch writes through its context and returns nothing: traced, every Watch
        # failed at once, and clients that follow health (gRPC A17) saw no server as serving.
        interceptors.append(aio_server_interceptor(tracer_provider=tracer_provider,
                                                   filter_=negate(health_check())))
    if config.token is not None:
        on_reject = telemetry.rejected if telemetry is not None else None
        interceptors.append(BearerTokenInterceptor(config.token, on_reject))
    server = grpc.aio.server(interceptors=interceptors, options=config.channel_options())
    servicer = RetrieverServicer(
        datastore,
        searches,
        max_concurrent_searches=config.max_concurrent_searches,
        max_context_tokens=config.max_context_tokens,
        inline_search_s=config.inline_search_us * 1e-6,
        telemetry=telemetry,
        policy_caps=config.policy_caps(),
    )
    add_to_server(servicer, server)
    health = HealthServicer()
    shards = ServedShards(SERVICE_NAME, health, servicer, config.shard_options())
    await shards.serve(datastore, searches)  # health per shard and for the service
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME),
        server,
    )

    native = None
    try:
        port = _bind(server, config)
        health_server = None
        if config.health_port is not None:
            health_server = await start_health_server(config, health)
        if config.search_port is not None:
            native = start_native_port(config, servicer, traced=tracer_provider is not None,
                                       telemetry=telemetry)
        await server.start()
    except BaseException:
        if native is not None:
            native.stop(0)
        shards.close()
        raise
    return RetrieverServer(server, port, health, shards, health_server, native)


def start_native_port(config: ServerConfig, servicer: RetrieverServicer, *, traced: bool,
                      telemetry: SearchTelemetry | None = None) -> NativeSearchPort | None:
    """The native search port of ``config.search_port``; none on a traced server, whose spans
    the native port would not continue (one log line says so). Its counters feed ``telemetry``'s
    (and its latency the ``/metrics`` endpoint, when the server has one)."""
    if traced:
        log.warning("--search-port: not opened on a traced server (OpenTelemetry traces are "
                    "configured); clients search through --port")
        return None
    problem = why_bind_fails(config.host, config.search_port, port_option="--search-port")
    address = f"{host_for_address(config.host)}:{config.search_port}"
    if problem is not None:
        raise OSError(f"could not listen on {address}: {problem}")
    native = NativeSearchPort(
        config.host, config.search_port, servicer, workers=config.workers,
        max_concurrent_searches=config.max_concurrent_searches,
        max_message_bytes=config.max_message_bytes, keepalive_time_s=config.keepalive_time_s,
        keepalive_timeout_s=config.keepalive_timeout_s,
        inline_search_s=config.inline_search_us * 1e-6, token=config.token,
        tls=_tls_files(config))
    if telemetry is not None:
        telemetry.add_counts(native.stats)
        if config.metrics_port is not None:
            native.export_latency()
    return native


def _bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    address = f"{host_for_address(config.host)}:{config.port}"
    credentials = _server_credentials(config)  # bad TLS files are refused here, before binding
    # Try the address first: gRPC's own failure says only that binding failed (and logs it).
    problem = why_bind_fails(config.host, config.port)
    if problem is None:
        try:
            if credentials is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, credentials)
        except RuntimeError:  # grpcio raises where older versions returned 0
            port = 0
        if port != 0:
            return port
        problem = why_bind_fails(config.host, config.port) or "gRPC could not bind it"
    raise OSError(f"could not listen on {address}: {problem}")


def why_bind_fails(host: str, port: int, *, port_option: str = "--port",
                   host_option: str = "--host") -> str | None:
    """What keeps ``host:port`` from being bound, found by binding it with a plain socket the way
    gRPC will; ``None`` when nothing does."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return (f"{host_option} {host} does not resolve ({exc.strerror}); give an address or a"
                " name of this machine (127.0.0.1, 0.0.0.0 for every interface, ::)")
    for family, kind, proto, _, sockaddr in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (f"{port_option} {port} is in use (another retriever-server?); choose"
                            " another port, 0 for a free one, or stop the process that holds it")
                if exc.errno == errno.EADDRNOTAVAIL:
                    return f"{host_option} {host} is not an address of this machine"
                if exc.errno == errno.EACCES:
                    return (f"{port_option} {port}: permission denied (ports below 1024 need"
                            " privileges)")
                return f"{exc.strerror} ({host_option} {host}, {port_option} {port})"
    return None


def host_for_address(host: str) -> str:
    """``::1`` -> ``[::1]``: an IPv6 literal needs brackets before ``:port``."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


async def serve(config: ServerConfig, datastore=None, *, out=sys.stdout) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    providers = providers_from_env("rest-retriever", prometheus=config.metrics_port is not None)
    metrics_http = None
    try:
        if config.metrics_port is not None:
            metrics_http = _serve_metrics(config)
        running = await start_server(
            config,
            datastore,
            tracer_provider=providers.tracer_provider,
            meter_provider=providers.meter_provider,
        )
    except BaseException:
        if metrics_http is not None:
            metrics_http.shutdown()
        providers.shutdown()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(running.reload()))
    scheme = "TLS" if config.tls_cert else "plaintext"
    # Tests and scripts read the port from this line; keep its shape.
    address = f"{host_for_address(config.host)}:{running.port}"
    print(f"retriever-server listening on {address}", file=out, flush=True)
    if running.search_port is not None:
        print(f"retriever-server native searches listening on"
              f" {host_for_address(config.host)}:{running.search_port}", file=out, flush=True)
    if running.health_port is not None:
        log.info("health service alone, in plaintext, on %s:%d", host_for_address(config.host),
                 running.health_port)
    if metrics_http is not None:
        host, port = metrics_http.server_address[:2]
        print(f"retriever-server metrics on http://{host_for_address(host)}:{port}/metrics",
              file=out, flush=True)
    log.info("serving %s (%s) on %s", config.datastore, scheme, address)
    await stop.wait()
    log.info("shutting down: NOT_SERVING, up to %.1f s for calls in flight", config.grace_s)
    await running.shutdown(config.grace_s)
    if metrics_http is not None:
        metrics_http.shutdown()
    providers.shutdown()
    log.info("stopped")


def _serve_metrics(config: ServerConfig):
    host = config.metrics_host or config.host
    problem = why_bind_fails(host, config.metrics_port, port_option="--metrics-port",
                             host_option="--metrics-host" if config.metrics_host else "--host")
    if problem is not None:
        raise OSError(f"could not serve metrics on {host_for_address(host)}:"
                      f"{config.metrics_port}: {problem}")
    return serve_prometheus(host.strip("[]"), config.metrics_port)


class BackgroundServer:
    """The server on an event loop in a thread of this process (tests, benchmarks).

    ``with BackgroundServer(config, datastore) as server: ... server.port ...``
    """

    def __init__(self, config: ServerConfig, datastore=None, **providers) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="retriever-server")
        self._thread.start()
        try:
            self._running = self._call(start_server(config, datastore, **providers))
        except BaseException:
            self._stop_loop()
            raise
        self.port = self._running.port
        self.health = self._running.health
        self.health_port = self._running.health_port
        self.search_port = self._running.search_port

    def _call(self, coroutine, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def reload(self) -> None:
        """Reopens the datastore from its files, as SIGHUP does to the command."""
        self._call(self._running.reload())

    def stop(self, grace_s: float = 0.0) -> None:
        if self._loop.is_closed():
            return
        self._call(self._running.shutdown(grace_s))
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` (which no comparison excludes)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


def option_range(field_name: str) -> click.ParamType:
    lowest, highest = OPTION_RANGES[field_name]
    if isinstance(lowest, int) and isinstance(highest, int):
        return click.IntRange(lowest, highest)
    return FiniteFloatRange(lowest, highest)


@click.command("serve")
@click.option("--datastore", required=True,
              type=click.Path(exists=True, file_okay=False, readable=True),
              help="Datastore directory (made by `rest datastore build`).")
@click.option("--shard", "shards", multiple=True, metavar="NAME",
              help="Serve only this shard (repeat for several). Default: every shard.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=50051, show_default=True, type=option_range("port"),
              help="0 picks a free port.")
@click.option("--health-port", type=option_range("port"), default=None,
              help="Also serve the gRPC health service alone, in plaintext, on this port: for "
                   "probes that cannot use TLS (the kubelet's). Default: no such port.")
@click.option("--search-port", type=option_range("port"), default=None,
              help="Also answer Search, SearchStream and Info on this port from the engine's "
                   "own gRPC server (no Python on a request's path; TLS as --port; 0: a free "
                   "port), "
                   "advertised in Info.search_port. Default: no such port.")
@click.option("--max-concurrent-searches", default=64, show_default=True,
              type=option_range("max_concurrent_searches"),
              help="Searches in flight at once; more get RESOURCE_EXHAUSTED.")
@click.option("--workers", default=default_workers,
              show_default="the number of CPUs", type=option_range("workers"),
              help="Threads running searches.")
@click.option("--max-context-tokens", default=4096, show_default=True,
              type=option_range("max_context_tokens"), help="Longer contexts get INVALID_ARGUMENT.")
@click.option("--inline-search-us", default=200, show_default=True,
              type=option_range("inline_search_us"),
              help="With no other search in flight, try a search on the event loop for this "
                   "long per back-off level it asks for before handing it to a worker (exact "
                   "policy; 0: always a worker).")
@click.option("--max-message-bytes", default=4 * MiB, show_default=True,
              type=option_range("max_message_bytes"),
              help="Largest request or response; larger ones get RESOURCE_EXHAUSTED.")
@click.option("--keepalive-time-s", default=30.0, show_default=True,
              type=option_range("keepalive_time_s"), help="Ping idle connections this often.")
@click.option("--keepalive-timeout-s", default=10.0, show_default=True,
              type=option_range("keepalive_timeout_s"),
              help="Close a connection whose ping is not answered in this time.")
@click.option("--grace-s", default=10.0, show_default=True, type=option_range("grace_s"),
              help="After SIGTERM, how long calls in flight may still run.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False),
              help="Server certificate (PEM); with --tls-key turns TLS on.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False),
              help="The certificate's private key (PEM, unencrypted).")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False),
              help="Require client certificates signed by this CA (mutual TLS).")
@click.option("--token", callback=token_option,
              help=f"Require 'authorization: Bearer TOKEN'. Default: the {TOKEN_ENV} variable, "
                   "which is better: a command line is visible to other users. Never empty: "
                   "leave both out for no authentication.")
@click.option("--metrics-port", type=option_range("port"),
              help="Serve Prometheus metrics on http://HOST:PORT/metrics (0: a free port, "
                   "printed at start). Default: no metrics endpoint.")
@click.option("--metrics-host", help="Address of the metrics endpoint. Default: --host.")
@click.option("--verify", is_flag=True,
              help="Check every shard in full (checksums, suffix-array order) before serving; a "
                   "shard that fails is not served (one log line says why).")
@click.option("--scrub-mib-per-s", default=8, show_default=True,
              type=option_range("scrub_mib_per_s"),
              help="Re-read the shards in the background at most this fast (a niced thread) and "
                   "stop serving a shard whose checksum changed; 0 turns the scrub off.")
@click.option("--exact-max-budget", default=4096, show_default=True,
              type=option_range("exact_max_budget"),
              help="Largest budget accepted for the exact policy; more is INVALID_ARGUMENT.")
@click.option("--exact-max-depth", default=256, show_default=True,
              type=option_range("exact_max_depth"),
              help="Largest max_depth accepted for the exact policy.")
@click.option("--rest-max-budget", default=1024, show_default=True,
              type=option_range("rest_max_budget"),
              help="Largest budget accepted for the REST policy (whose work grows with its "
                   "5,000 occurrences times max_depth).")
@click.option("--rest-max-depth", default=64, show_default=True,
              type=option_range("rest_max_depth"),
              help="Largest max_depth accepted for the REST policy.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def serve_command(log_level: str, shards: tuple[str, ...], **options) -> None:
    """Serve a REST datastore over gRPC (rest.retriever.v1).

    Traces, metrics and logs are exported as the OpenTelemetry SDK's variables say
    (OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER, OTEL_LOGS_EXPORTER: otlp, console, prometheus,
    none; OTEL_EXPORTER_OTLP_PROTOCOL grpc or http/protobuf; default none).

    Errors are one line (exit status 1; 2 for a bad option); --debug or REST_DEBUG=1 shows the
    traceback.
    """
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = ServerConfig(shards=shards, **options)
    except ValueError as exc:  # options that contradict each other
        raise click.UsageError(str(exc)) from exc
    try:
        check_tls_files(config)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    try:
        datastore = open_datastore(config)
    except KeyError as exc:  # a --shard the datastore does not have
        raise click.ClickException(
            f"--shard: {exc.args[0] if exc.args else exc} in {config.datastore}; its shards are"
            f" {', '.join(shard_names(config.datastore))}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - unreadable or corrupt datastore
        raise click.ClickException(
            f"cannot serve {config.datastore}: {one_line(exc)}"
        ) from exc
    try:
        asyncio.run(serve(config, datastore))
    except OSError as exc:  # an address that cannot be bound
        raise click.ClickException(str(exc)) from exc
    except ValueError as exc:  # OTEL_* variables the OpenTelemetry SDK cannot satisfy
        raise click.ClickException(str(exc)) from exc


def main() -> None:
    run(serve_command, "retriever-server")


if __name__ == "__main__":
    main()
