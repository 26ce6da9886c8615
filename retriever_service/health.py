"""Client-side health checking, as gRPC A17 (``A17-client-side-health-checking.md``) says.

One ``HealthWatch`` per channel and service name streams ``grpc.health.v1.Health/Watch``:

- the call waits for the channel to connect (``wait_for_ready``), and until its first answer the
  status is ``UNKNOWN``: no searches go to an endpoint before it says it serves;
- ``UNIMPLEMENTED`` means the server has no health service: it counts as serving, for good;
- any other error counts as not serving, and the watch starts again after a backoff (100 ms
  doubling to 2 s, jittered) that every received message resets;
- ``close()`` cancels the call.

The blocking API needs a thread per watch (a server with k shards has k + 1 names); they are
daemon threads that only wait.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("retriever_service.health")


class Health(enum.Enum):
    UNKNOWN = "unknown"  # no answer yet, or the watch failed
    SERVING = "serving"
    NOT_SERVING = "not_serving"
    SERVICE_UNKNOWN = "service_unknown"  # the server does not know this name


_FROM_WIRE = {
    health_pb2.HealthCheckResponse.SERVING: Health.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING: Health.NOT_SERVING,
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: Health.SERVICE_UNKNOWN,
}


class HealthWatch:
    """Follows one service name's health on ``channel`` once started; ``on_change(watch)`` is
    called (on the watch's thread) on the first answer or error and whenever ``status``
    changes."""

    def __init__(
        self,
        channel: grpc.Channel,
        service: str,
        on_change: Callable[[HealthWatch], None],
        *,
        metadata: tuple = (),
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        label: str = "",
    ) -> None:
        self.service = service
        self.status = Health.UNKNOWN
        self.answered = False  # a first answer (or error) came
        self.label = label
        self._stub = health_pb2_grpc.HealthStub(channel)
        self._on_change = on_change
        self._metadata = metadata
        self._initial_backoff_s = initial_backoff_s
        self._max_backoff_s = max_backoff_s
        self._stopped = threading.Event()
        self._call = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"health-watch {label} {service!r}"
        )

    def start(self) -> HealthWatch:
        self._thread.start()
        return self

    def _set(self, status: Health) -> None:
        if status is not self.status or not self.answered:
            self.status = status
            self.answered = True
            self._on_change(self)

    def _run(self) -> None:
        backoff = self._initial_backoff_s
        while not self._stopped.is_set():
            with self._lock:
                if self._stopped.is_set():
                    return
                self._call = self._stub.Watch(
                    health_pb2.HealthCheckRequest(service=self.service),
                    metadata=self._metadata, wait_for_ready=True,
                )
            try:
                for response in self._call:
                    backoff = self._initial_backoff_s  # any message resets the backoff
                    self._set(_FROM_WIRE.get(response.status, Health.NOT_SERVING))
                error = "the server ended the watch"
            except grpc.RpcError as exc:
                if self._stopped.is_set():
                    return
                if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                    log.info("%s has no health service: taken as serving", self.label)
                    self._set(Health.SERVING)
                    return
                error = f"{exc.code().name}: {exc.details()}"
            log.debug("health watch of %s %r failed (%s); again in %.2f s", self.label,
                      self.service, error, backoff)
            self._set(Health.UNKNOWN)
            if self._stopped.wait(backoff * random.uniform(0.8, 1.2)):
                return
            backoff = min(backoff * 2, self._max_backoff_s)

    def close(self) -> None:
        with self._lock:
            self._stopped.set()
            if self._call is not None:
                self._call.cancel()
