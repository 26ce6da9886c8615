"""The one retrieval interface the decoder uses, and its in-process implementation.

A ``Retriever`` answers for a whole datastore; a ``RetrievalSession`` is what one generation uses
(the remote implementation keeps one gRPC stream per session). ``RetrievalSession.search`` never
raises for a failed or slow retrieval: it returns ``None`` ("no draft") and counts the failure, so
decoding falls back to plain steps with unchanged output.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import replace

from rest.types import DatastoreInfo, SearchParams, SearchResult


class RetrieverUnavailable(RuntimeError):
    """The retriever did not answer (yet): decoding goes on without its drafts, unless the caller
    asked for a retriever to be required."""


class RetrievalSession(abc.ABC):
    """One generation's channel to a retriever."""

    failures: int = 0

    @abc.abstractmethod
    def search(self, context: Sequence[int], params: SearchParams) -> SearchResult | None:
        """The continuation tree for ``context``, or ``None`` when retrieval failed or timed out."""

    def search_levels(
        self, context: Sequence[int], params: SearchParams, levels: int
    ) -> list[SearchResult] | None:
        """Back-off levels: the continuation tree of the longest matching suffix (as ``search``),
        then of the suffixes one token shorter each, down to ``params.min_span``: at most
        ``levels`` results, longest match first; ``[]`` when not even ``min_span`` tokens match.
        ``None`` when retrieval failed or timed out.

        A suffix of a suffix that occurs occurs too, so level ``k`` has match length
        ``m - k + 1`` for the longest match ``m``. This default asks one search per level;
        implementations answer all levels in one call (one engine call in-process, one round
        trip remotely).
        """
        results: list[SearchResult] = []
        span = params.max_span
        while len(results) < levels and span >= params.min_span:
            result = self.search(list(context[-span:]), replace(params, max_span=span))
            if result is None:
                return None
            if result.match_length <= 0:
                break
            results.append(result)
            span = result.match_length - 1
        return results

    def close(self) -> None:
        """Release the session's resources (a stream, for example)."""

    def __enter__(self) -> RetrievalSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Retriever(abc.ABC):
    """A datastore, local or remote."""

    @abc.abstractmethod
    def info(self) -> DatastoreInfo:
        """Metadata of the datastore (tokenizer fingerprint, vocabulary size, shards...).
        Raises ``RetrieverUnavailable`` when the retriever cannot be reached."""

    @abc.abstractmethod
    def session(self) -> RetrievalSession:
        """A session for one generation."""

    def close(self) -> None:
        """Release connections or memory maps."""

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LocalSession(RetrievalSession):
    """One engine search session per retrieval session: each step's search narrows what the
    last step's found (``rest.datastore.SearchSession``), with the same answers."""

    def __init__(self, datastore) -> None:
        self._session = datastore.session()

    def search(self, context: Sequence[int], params: SearchParams) -> SearchResult | None:
        from rest.datastore import DatastoreError

        try:
            return self._session.search(context, params)
        except DatastoreError:  # a shard out of service (its file changed): no draft this step
            self.failures += 1
            return None

    def search_levels(
        self, context: Sequence[int], params: SearchParams, levels: int
    ) -> list[SearchResult] | None:
        from rest.datastore import DatastoreError

        try:
            return self._session.search_levels(context, params, levels)
        except DatastoreError:  # as in ``search``
            self.failures += 1
            return None


class LocalRetriever(Retriever):
    """In-process retrieval over a datastore directory (memory-mapped)."""

    def __init__(self, path: str, shards: Sequence[str] | None = None) -> None:
        from rest.datastore import Datastore

        self.datastore = Datastore.open(path, shards=shards)

    def info(self) -> DatastoreInfo:
        return self.datastore.info()

    def session(self) -> RetrievalSession:
        return _LocalSession(self.datastore)
