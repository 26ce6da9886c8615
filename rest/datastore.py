"""Datastores from Python: open and search (memory-mapped, in Rust), build from token sequences.

The format is documented in docs/DATASTORE_FORMAT.md. Searching releases the GIL.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from rest import _engine
from rest.types import DatastoreInfo, SearchParams, SearchResult

DatastoreError = _engine.DatastoreError
ShardUnavailableError = _engine.ShardUnavailableError
FORMAT_VERSION = _engine.FORMAT_VERSION
# The most back-off levels one search may ask for (also the retrieval service's cap).
MAX_LEVELS = _engine.MAX_LEVELS
DEFAULT_SHARD_TOKENS = 1 << 28

__all__ = [
    "Datastore", "DatastoreError", "ShardUnavailableError", "ShardChange", "SearchExecutor",
    "SearchSession", "build_datastore", "FORMAT_VERSION", "MAX_LEVELS",
]


class ShardChange(NamedTuple):
    """A shard that went out of service (``serving`` False) and why, e.g. "the file was truncated
    or resized from 20319128 to 1000 bytes by another process"."""

    shard: str
    path: Path
    serving: bool
    reason: str


def _engine_query(params: SearchParams, shards: Sequence[str] | None) -> tuple:
    """A search's parameters and shards as the engine's ``query, shards`` arguments."""
    return params._query, list(shards) if shards is not None else None


def _as_list(tokens: Sequence[int]) -> list[int]:
    return tokens if isinstance(tokens, list) else list(tokens)


def _levels(raws: list, shard: str, searched: tuple[str, ...]) -> list[SearchResult]:
    """The engine's back-off levels as ``search_levels`` returns them: ``[]`` when nothing
    matched (the engine always answers the first level)."""
    if raws[0][0] == 0:
        return []
    return [SearchResult.from_engine(raw, shard, searched) for raw in raws]


def _label(shards: Sequence[str] | None) -> str:
    return ",".join(shards) if shards else ""


class Datastore:
    """An open datastore directory (all its shards, or the ones named).

    Shards are in service until their file changes under the mapping (truncated, overwritten,
    opened for writing by another process): then they are out of service, with the reason, and
    stay so until the datastore is opened again (docs/DATASTORE_FORMAT.md, "Files changed under a
    running process"). A search that names such a shard raises ``ShardUnavailableError``; one over
    every shard covers those in service.
    """

    def __init__(self, native: _engine.Datastore) -> None:
        self._native = native

    @classmethod
    def open(
        cls,
        path: str | Path,
        shards: Sequence[str] | None = None,
        *,
        leases: bool = True,
        inotify: bool = True,
        tolerate_bad_shards: bool = False,
    ) -> Datastore:
        """Maps the datastore at ``path``. Raises DatastoreError for a missing, truncated,
        corrupt or foreign file (naming the file and the problem), KeyError for an unknown shard.

        ``leases`` and ``inotify`` choose how shard files are watched for changes (both by
        default; a lease needs the file's owner or CAP_LEASE and is skipped where it cannot be
        had). ``tolerate_bad_shards``: a shard that cannot be opened is kept out of service with
        the reason instead of failing the open (which still fails when no shard opens)."""
        return cls(_engine.Datastore.open(
            str(path), list(shards) if shards is not None else None, leases, inotify,
            tolerate_bad_shards))

    @property
    def path(self) -> Path:
        return Path(self._native.path)

    @property
    def vocab_size(self) -> int:
        return self._native.vocab_size

    @property
    def shard_names(self) -> list[str]:
        return self._native.shard_names

    def info(self) -> DatastoreInfo:
        n = self._native
        return DatastoreInfo(
            format_version=n.format_version,
            vocab_size=n.vocab_size,
            n_tokens=n.n_tokens,
            n_docs=n.n_docs,
            tokenizer_name=n.tokenizer_name,
            tokenizer_fingerprint=n.tokenizer_fingerprint,
            shards=tuple(n.shard_names),
        )

    def manifest(self) -> dict:
        return json.loads(self._native.manifest_json())

    def shard_states(self) -> dict[str, str | None]:
        """Every shard, in manifest order: None while it serves, else why it is out of service."""
        return dict(self._native.shard_states())

    def shard_leases(self) -> dict[str, bool]:
        """Whether each opened shard holds a read lease (a writer then waits until the shard is
        out of service; without one, the change is heard of just after it happens)."""
        return self._native.shard_leases()

    def events_fileno(self) -> int:
        """A file descriptor that becomes readable when ``shard_changes`` has changes (for
        ``loop.add_reader``)."""
        return self._native.events_fileno()

    def shard_changes(self) -> list[ShardChange]:
        """The shards that went out of service since the last call, oldest first (the first call
        also returns the shards refused at open)."""
        return [ShardChange(name, Path(path), serving, reason)
                for name, path, serving, reason in self._native.shard_changes()]

    def take_out_of_service(self, shard: str, reason: str) -> None:
        """Stops serving ``shard`` (until the datastore is opened again); KeyError if unknown."""
        self._native.take_out_of_service(shard, reason)

    def search(
        self,
        context: Sequence[int],
        params: SearchParams = SearchParams(),
        shards: Sequence[str] | None = None,
    ) -> SearchResult:
        """The continuation tree of ``context``, over the shards in service (named in the
        result's ``searched_shards``). ValueError for an empty context or an id outside the
        vocabulary; KeyError for an unknown shard; ShardUnavailableError when a named shard (or
        every shard) is out of service."""
        if shards is None:  # the usual call, without the helpers' calls (a search takes a few µs)
            raw, searched = self._native.search(
                context if type(context) is list else list(context), params._query, None)
            return SearchResult.from_engine(raw, "", searched)
        raw, searched = self._native.search(_as_list(context), *_engine_query(params, shards))
        return SearchResult.from_engine(raw, _label(shards), searched)

    def search_levels(
        self,
        context: Sequence[int],
        params: SearchParams,
        levels: int,
        shards: Sequence[str] | None = None,
    ) -> list[SearchResult]:
        """Back-off levels in one engine call, as ``rest.retriever.RetrievalSession.search_levels``
        defines them: the tree of the longest match (``search``), then of the suffixes one token
        shorter each while at least ``params.min_span`` long, at most ``levels`` (1 to
        ``MAX_LEVELS``) results; ``[]`` when nothing matched."""
        query, only = _engine_query(params, shards)
        raws, searched = self._native.search_levels(_as_list(context), query, levels, only)
        return _levels(raws, _label(shards), searched)

    def session(self) -> SearchSession:
        """A search session for searches whose contexts extend each other (one decoding
        session's): the same answers, found faster (see ``SearchSession``)."""
        return SearchSession(self)

    def try_search(
        self,
        context: Sequence[int],
        params: SearchParams,
        shards: Sequence[str] | None,
        time_limit_s: float,
        *,
        levels: int = 1,
        as_wire: bool = False,
        session: SearchSession | None = None,
    ) -> list[SearchResult] | bytes | None:
        """``search_levels``, or None when it did not finish within ``time_limit_s``: a bounded
        try before handing the search to another thread. ``as_wire``: the result as a
        serialized ``rest.retriever.v1`` ``SearchResponse`` (what the retrieval server sends),
        built without Python objects. ``session``: searched with what that session remembers."""
        raw = self._native.try_search(
            _as_list(context),
            *_engine_query(params, shards),
            max(0, int(time_limit_s * 1e6)),
            levels,
            as_wire,
            session._native if session is not None else None,
        )
        return raw if raw is None or as_wire else _levels(*raw)

    def try_search_request(
        self,
        request: bytes,
        limits: RequestLimits,
        slice_per_level_s: float,
        remaining_s: float | None,
        session: SearchSession | None = None,
    ) -> bytes | bool | None:
        """The retrieval server's inline ``try_search`` of a serialized ``rest.retriever.v1``
        ``SearchRequest``, decoded and checked in the engine against ``limits`` (the checks of
        ``retriever_service.validation``): the serialized ``SearchResponse``; ``False`` when the
        search did not finish within ``slice_per_level_s`` per back-off level asked for (never
        past ``remaining_s``); ``None`` for a request the checks do not accept, left to the
        Python parser (which refuses it with its message)."""
        return self._native.try_search_request(
            request, limits._native, slice_per_level_s, remaining_s,
            session._native if session is not None else None)

    def search_batch(
        self,
        contexts: Sequence[Sequence[int]],
        params: SearchParams = SearchParams(),
        shards: Sequence[str] | None = None,
    ) -> list[SearchResult]:
        """Many searches at once, in parallel across the machine's cores."""
        raws = self._native.search_batch([_as_list(c) for c in contexts], *_engine_query(params, shards))
        label = _label(shards)
        return [SearchResult.from_engine(raw, label, searched) for raw, searched in raws]

    def verify(self) -> None:
        """The slow full check (checksums, suffix-array structure); raises DatastoreError."""
        self._native.verify()

    def verify_each(self) -> dict[str, str]:
        """``verify`` shard by shard: ``{shard: what is wrong}`` for the shards that fail."""
        return dict(self._native.verify_each())

    def start_scrub(self, bytes_per_s: int, pause_s: float = 10.0) -> Scrub:
        """Re-reads every shard in service in the background (a niced engine thread, at most
        ``bytes_per_s``, 0 for no limit, ``pause_s`` between passes) and takes a shard out of
        service when its checksum no longer matches its header (bytes changed in place)."""
        return Scrub(_engine.Scrub(self._native, bytes_per_s, pause_s))

    def search_executor(self, workers: int, *, as_wire: bool = False) -> SearchExecutor:
        """Searches on ``workers`` native threads, for callers that must not block (event loops).
        ``as_wire``: results come as serialized ``SearchResponse`` messages (see ``try_search``)."""
        return SearchExecutor(self, workers, as_wire=as_wire)


class RequestLimits:
    """What a retrieval server accepts in a request, in the engine's form (for
    ``Datastore.try_search_request``): the vocabulary size, the context limit, the served shards
    and the largest ``(budget, max_depth)`` of the exact and the REST policy."""

    def __init__(self, vocab_size: int, max_context_tokens: int, shards: Sequence[str],
                 exact_caps: tuple[int, int], rest_caps: tuple[int, int]) -> None:
        self._native = _engine.RequestLimits(vocab_size, max_context_tokens, list(shards),
                                             exact_caps, rest_caps)


class SearchSession:
    """The searches of one decoding session over one datastore.

    A decoder's context grows by the tokens each step accepted; the session keeps what its last
    search found (the intervals of the suffixes it probed) and narrows them by the new tokens
    instead of searching the whole datastore again. Answers are exactly ``Datastore.search`` and
    ``Datastore.search_levels``'s, for any context (a context that does not extend the last one
    only costs a fresh search). One per decoding session; not for concurrent use.
    """

    def __init__(self, datastore: Datastore) -> None:
        self._native = datastore._native.session()

    def search(
        self,
        context: Sequence[int],
        params: SearchParams = SearchParams(),
        shards: Sequence[str] | None = None,
    ) -> SearchResult:
        """``Datastore.search``."""
        query, only = _engine_query(params, shards)
        (raw,), searched = self._native.search_levels(_as_list(context), query, 1, only)
        return SearchResult.from_engine(raw, _label(shards), searched)

    def search_levels(
        self,
        context: Sequence[int],
        params: SearchParams,
        levels: int,
        shards: Sequence[str] | None = None,
    ) -> list[SearchResult]:
        """``Datastore.search_levels``."""
        query, only = _engine_query(params, shards)
        raws, searched = self._native.search_levels(_as_list(context), query, levels, only)
        return _levels(raws, _label(shards), searched)

    def forget(self) -> None:
        """Drop what the session remembers (the next search starts afresh)."""
        self._native.forget()


class SearchExecutor:
    """Searches of one datastore, queued and run on the engine's own threads.

    Made for event loops: ``submit`` returns at once; when searches have finished, ``fileno()``
    becomes readable and ``completed()`` returns them. No Python thread is involved, so a search
    costs its caller no GIL hand-off (see retriever_rs/python/src/executor.rs).
    """

    def __init__(self, datastore: Datastore, workers: int, *, as_wire: bool = False) -> None:
        self._native = _engine.SearchExecutor(datastore._native, workers, as_wire)
        self._as_wire = as_wire

    def submit(
        self,
        tag: int,
        context: Sequence[int],
        params: SearchParams,
        shards: Sequence[str] | None = None,
        timeout_s: float | None = None,
        *,
        levels: int = 1,
        session: SearchSession | None = None,
    ) -> None:
        """Queues a search of ``levels`` back-off levels (``Datastore.search_levels``), with what
        ``session`` remembers when given; ``completed`` returns its outcome under ``tag``. A
        search still waiting for a worker after ``timeout_s`` seconds is not run, and one still
        running then is given up (outcome ``TimeoutError`` in both cases)."""
        self._native.submit(
            tag,
            _as_list(context),
            *_engine_query(params, shards),
            timeout_s,
            levels,
            session._native if session is not None else None,
        )

    def fileno(self) -> int:
        return self._native.fileno()

    def cancel(self, tag: int) -> None:
        """Gives up the search queued under ``tag`` (its caller went away): a queued one is not
        run, a running one stops at its next check; its outcome (``TimeoutError``) still comes
        back from ``completed``."""
        self._native.cancel(tag)

    def completed(self) -> list[tuple[int, list[SearchResult] | bytes | BaseException]]:
        """The searches finished since the last call: ``(tag, levels)`` as ``search_levels``
        returns them (bytes when ``as_wire``), or ``(tag, exception)`` with the exception
        ``Datastore.search`` would have raised."""
        done = self._native.completed()
        if self._as_wire:
            return done
        return [
            (tag, outcome if isinstance(outcome, BaseException) else _levels(*outcome))
            for tag, outcome in done
        ]

    def close(self) -> None:
        """Refuses new searches; the queued ones still run and complete."""
        self._native.close()


class Scrub:
    """A running scrub (``Datastore.start_scrub``)."""

    def __init__(self, native) -> None:
        self._native = native

    @property
    def bytes_read(self) -> int:
        return self._native.stats()[0]

    @property
    def passes(self) -> int:
        """Complete passes over every shard in service."""
        return self._native.stats()[1]

    @property
    def found(self) -> int:
        """Shards this scrub took out of service."""
        return self._native.stats()[2]

    def stop(self) -> None:
        self._native.stop()


def build_datastore(
    out_dir: str | Path,
    documents: Iterable[Sequence[int]],
    *,
    vocab_size: int,
    tokenizer_name: str,
    tokenizer_fingerprint: str,
    shard_tokens: int | None = None,
    parallel_shards: int = 2,
    overwrite: bool = False,
    progress: bool = False,
    batch_docs: int = 256,
) -> DatastoreInfo:
    """Builds a datastore at ``out_dir`` from token-id documents (one document per sequence).

    Continuations never cross document boundaries. The directory appears only when complete.
    """
    builder = _new_builder(out_dir, vocab_size, tokenizer_name, tokenizer_fingerprint, shard_tokens,
                           parallel_shards, overwrite)
    bar = _progress_bar(progress)
    start = time.perf_counter()
    added = 0
    try:
        batch: list[list[int]] = []
        for doc in documents:
            batch.append(list(doc))
            if len(batch) >= batch_docs:
                added = _add(builder, batch, bar, added)
                batch = []
        if batch:
            added = _add(builder, batch, bar, added)
        manifest = json.loads(builder.finish())
    except BaseException:
        builder.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    if progress:
        elapsed = time.perf_counter() - start
        print(f"built {manifest['n_tokens']:,} tokens in {len(manifest['shards'])} shard(s) "
              f"in {elapsed:.1f}s ({manifest['n_tokens'] / max(elapsed, 1e-9):,.0f} tokens/s)")
    return Datastore.open(out_dir).info()


def build_datastore_from_array(
    out_dir: str | Path,
    tokens,
    doc_lengths: Sequence[int],
    *,
    vocab_size: int,
    tokenizer_name: str,
    tokenizer_fingerprint: str,
    shard_tokens: int | None = None,
    parallel_shards: int = 2,
    overwrite: bool = False,
) -> DatastoreInfo:
    """Like ``build_datastore`` for documents laid end to end in one integer array (numpy)."""
    import numpy as np

    flat = np.ascontiguousarray(tokens, dtype="<u4")
    builder = _new_builder(out_dir, vocab_size, tokenizer_name, tokenizer_fingerprint, shard_tokens,
                           parallel_shards, overwrite)
    try:
        builder.add_flat(flat.tobytes(), [int(n) for n in doc_lengths])
        builder.finish()
    except BaseException:
        builder.abort()
        raise
    return Datastore.open(out_dir).info()


def _new_builder(out_dir, vocab_size, tokenizer_name, tokenizer_fingerprint, shard_tokens, parallel_shards,
                 overwrite) -> _engine.DatastoreBuilder:
    return _engine.DatastoreBuilder(str(out_dir), vocab_size, tokenizer_name, tokenizer_fingerprint,
                                    shard_tokens or DEFAULT_SHARD_TOKENS, parallel_shards, overwrite)


def _add(builder, batch, bar, added: int) -> int:
    total = builder.add_documents(batch)
    if bar is not None:
        bar.update(total - added)
    return total


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit="tok", unit_scale=True, desc="datastore", smoothing=0.1)
