"""The served datastore, shard by shard: health, changes heard from the engine, checks, reload.

Each shard has its own health name, ``rest.retriever.v1.Retriever/<shard>``: SERVING while the
shard is in service, NOT_SERVING once its file changed under the server (the engine hears of it:
docs/DATASTORE_FORMAT.md, "Files changed under a running process"), failed ``--verify``, failed
the background scrub, or could not be opened. The service-level names (``""`` and
``rest.retriever.v1.Retriever``) stay SERVING while at least one shard is in service. Every change
is one log line that names the shard, its file and what changed.

The engine announces changes on a file descriptor (``Datastore.events_fileno``) that the event
loop watches, so the server reacts without polling. ``reload`` (SIGHUP) opens the datastore
again from its files, checks it as at start, and serves the new one; searches already running
finish on the old one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from grpc_health.v1 import health_pb2

from retriever_service.searches import AsyncSearches

log = logging.getLogger("retriever_service.shards")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# The scrub's pause between two passes over the datastore.
SCRUB_PAUSE_S = 10.0


@dataclass(frozen=True)
class ShardOptions:
    """How the served datastore is opened, checked and watched (the server's options)."""

    datastore: str
    shards: tuple[str, ...] = ()  # empty: every shard
    verify: bool = False  # full checksums before serving
    scrub_bytes_per_s: int = 0  # 0: no background scrub
    workers: int = 1


def open_datastore(options: ShardOptions):
    """The datastore, with shards that cannot be opened kept out of service (the open fails only
    when none can); with ``verify``, every shard checked in full first, and the ones that fail
    taken out of service. Blocking (a full check reads every byte)."""
    from rest.datastore import Datastore

    datastore = Datastore.open(options.datastore, shards=list(options.shards) or None,
                               tolerate_bad_shards=True)
    if options.verify:
        for shard, problem in datastore.verify_each().items():
            datastore.take_out_of_service(shard, f"failed --verify: {problem}")
    if all(reason is not None for reason in datastore.shard_states().values()):
        from rest.datastore import ShardUnavailableError

        reasons = "; ".join(f"{name}: {why}" for name, why in datastore.shard_states().items())
        raise ShardUnavailableError(f"no shard can be served ({reasons})")
    return datastore


def health_name(service: str, shard: str) -> str:
    return f"{service}/{shard}"


class ServedShards:
    """Keeps the health service in step with the served datastore's shards, and reloads it."""

    def __init__(self, service: str, health, servicer, options: ShardOptions) -> None:
        self._service = service
        self._health = health
        self._servicer = servicer
        self._options = options
        self._loop = asyncio.get_running_loop()
        self._datastore = None
        self._searches: AsyncSearches | None = None
        self._scrub = None
        self._reloading = asyncio.Lock()
        self._published: set[str] = set()

    async def serve(self, datastore, searches: AsyncSearches) -> None:
        """Starts watching ``datastore`` (which ``searches`` searches) and publishes its health."""
        previous, previous_scrub = self._datastore, self._scrub
        if previous is not None and self._watched(previous):
            self._loop.remove_reader(previous.events_fileno())
        self._datastore, self._searches, self._scrub = datastore, searches, None
        if self._watched(datastore):
            self._loop.add_reader(datastore.events_fileno(), self._on_changes)
            self._on_changes()  # the shards refused at open, or failed --verify
            if self._options.scrub_bytes_per_s > 0:
                self._scrub = datastore.start_scrub(self._options.scrub_bytes_per_s, SCRUB_PAUSE_S)
        if previous_scrub is not None:
            previous_scrub.stop()
        await self.publish()

    @staticmethod
    def _watched(datastore) -> bool:
        # A stand-in datastore (tests) may have no shard states: it is simply always in service.
        return hasattr(datastore, "events_fileno")

    def _on_changes(self) -> None:
        for change in self._datastore.shard_changes():
            if change.serving:
                log.info("shard %s (%s) is in service", change.shard, change.path)
            else:
                log.warning("shard %s (%s) is out of service: %s", change.shard, change.path,
                            change.reason)
        self._loop.create_task(self.publish())

    async def publish(self) -> None:
        """Health of every shard, and of the service (SERVING while one shard serves)."""
        if self._watched(self._datastore):
            states = self._datastore.shard_states()
        else:
            states = {shard: None for shard in self._datastore.shard_names}
        for shard, reason in states.items():
            await self._health.set(health_name(self._service, shard),
                                   SERVING if reason is None else NOT_SERVING)
        # A shard that a reload no longer serves (its datastore lost it) is NOT_SERVING.
        for shard in self._published - set(states):
            await self._health.set(health_name(self._service, shard), NOT_SERVING)
        self._published |= set(states)
        overall = SERVING if any(reason is None for reason in states.values()) else NOT_SERVING
        for name in ("", self._service):
            await self._health.set(name, overall)

    async def reload(self) -> None:
        """Opens the datastore again from its files (SIGHUP) and serves the new one. A failed
        reopen is logged, and the old datastore goes on serving."""
        async with self._reloading:
            log.info("reloading %s", self._options.datastore)
            try:
                datastore = await self._loop.run_in_executor(None, open_datastore, self._options)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the running datastore
                log.error("reload of %s failed, still serving the previous files: %s",
                          self._options.datastore, exc)
                return
            searches = AsyncSearches(datastore.search_executor(self._options.workers,
                                                               as_wire=True))
            old_searches = self._searches
            self._servicer.use_datastore(datastore, searches)
            await self.serve(datastore, searches)
            old_searches.close_when_idle()
            states = datastore.shard_states()
            serving = sum(reason is None for reason in states.values())
            log.info("reloaded %s: %d of %d shards in service", self._options.datastore, serving,
                     len(states))

    @property
    def searches(self) -> AsyncSearches:
        return self._searches

    def close(self) -> None:
        """Stops watching and scrubbing (the server has stopped)."""
        if self._datastore is not None and self._watched(self._datastore):
            self._loop.remove_reader(self._datastore.events_fileno())
        if self._scrub is not None:
            self._scrub.stop()
        if self._searches is not None:
            self._searches.close()
