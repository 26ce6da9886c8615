"""The server's native search port (``--search-port``): ``rest.retriever.v1.Retriever``'s
``Search``, ``SearchStream`` and ``Info`` served by the engine's gRPC server (tonic, on its own
threads in this process; retriever_rs/python/src/grpc.rs), with no Python on the path of an
accepted request. The Python server keeps everything else (health, reflection, reloads, drain,
metrics export) and the rare answers the native port leaves to it (``RetrieverServicer.native_parse``
and ``native_engine_error``: refusals with the Python parser's status and message).
"""

from __future__ import annotations

from rest import _engine


class NativeSearchPort:
    """A started native port serving ``servicer``'s datastore (``servicer.attach_native``)."""

    def __init__(self, host: str, port: int, servicer, *, workers: int, max_concurrent_searches: int,
                 max_message_bytes: int, keepalive_time_s: float, keepalive_timeout_s: float,
                 inline_search_s: float, token: str | None,
                 tls: tuple[bytes, bytes, bytes | None] | None = None) -> None:
        datastore, limits, info = servicer.native_serving()
        self._server = _engine.NativeSearchServer(
            host, port, datastore._native, limits._native, info.SerializeToString(), servicer,
            workers=workers, max_concurrent_searches=max_concurrent_searches,
            max_message_bytes=max_message_bytes, keepalive_time_s=keepalive_time_s,
            keepalive_timeout_s=keepalive_timeout_s, inline_search_s=inline_search_s,
            token=token, tls=tls)
        self.port = self._server.port
        self._collector = None
        servicer.attach_native(self)

    def export_latency(self) -> None:
        """Serve the latency histogram on the process's Prometheus endpoint (prometheus_client's
        registry) until ``stop``."""
        from prometheus_client import REGISTRY

        from retriever_service.telemetry import NativeLatencyCollector

        self._collector = NativeLatencyCollector(self._server.stats)
        REGISTRY.register(self._collector)

    def use_datastore(self, datastore, limits, info) -> None:
        """Serve ``datastore`` (a ``rest.datastore.Datastore``) with ``limits`` (its
        ``RequestLimits``) and answer Info with ``info`` from now on."""
        self._server.use_datastore(datastore._native, limits._native, info.SerializeToString())

    @property
    def in_flight(self) -> int:
        return self._server.in_flight

    def stats(self) -> dict:
        """The native counters (``NativeSearchServer.stats``)."""
        return self._server.stats()

    def stop(self, grace_s: float) -> None:
        """Stop accepting calls, let those in flight finish for up to ``grace_s`` s, end the rest
        (blocks: run it off the event loop)."""
        self._server.stop(grace_s)
        if self._collector is not None:
            from prometheus_client import REGISTRY

            REGISTRY.unregister(self._collector)
            self._collector = None
