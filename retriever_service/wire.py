"""Conversions between the wire messages (``retriever_pb2``) and the types of ``rest.types``.

Both directions live here so that the client and the server cannot drift apart on, say, which
policy enum value means ``"rest"``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from rest import _engine
from rest.types import DatastoreInfo, SearchParams, SearchResult
from retriever_service.v1 import retriever_pb2 as pb

POLICY_TO_WIRE = {"exact": pb.POLICY_EXACT, "rest": pb.POLICY_REST}
# POLICY_UNSPECIFIED is what an old or minimal client sends: the documented default.
POLICY_FROM_WIRE = {
    pb.POLICY_UNSPECIFIED: "exact", pb.POLICY_EXACT: "exact", pb.POLICY_REST: "rest"
}
PARAM_FIELDS = ("min_span", "max_span", "budget", "max_depth")


@functools.lru_cache(maxsize=256)  # a session sends the same parameters on every step
def params_to_wire(params: SearchParams) -> pb.SearchParams:
    """The wire form of ``params`` (cached: do not modify it; messages that take it copy it)."""
    return pb.SearchParams(
        min_span=params.min_span,
        max_span=params.max_span,
        budget=params.budget,
        max_depth=params.max_depth,
        policy=POLICY_TO_WIRE[params.policy],
    )


def search_request(
    context: Sequence[int], params: SearchParams, shard: str | None = None, levels: int | None = None
) -> pb.SearchRequest:
    """The request for ``context``; ``levels`` back-off levels in one answer (unset: one, what a
    server that predates the field answers)."""
    # Only the last max_span tokens can take part in a match: sending more is wasted bandwidth.
    tail = context[-params.max_span :] if len(context) > params.max_span else context
    request = pb.SearchRequest(context=tail, params=params_to_wire(params))
    if shard is not None:
        request.shard = shard
    if levels is not None:
        request.levels = levels
    return request


def search_response(result: SearchResult, backoff: Sequence[SearchResult] = ()) -> pb.SearchResponse:
    """The response for ``result`` (the first level) and the further back-off levels."""
    return pb.SearchResponse(
        match_length=result.match_length,
        occurrences=result.occurrences,
        tokens=result.tokens,
        parents=result.parents,
        counts=result.counts,
        shard=result.shard,
        backoff=[
            pb.Level(
                match_length=level.match_length,
                occurrences=level.occurrences,
                tokens=level.tokens,
                parents=level.parents,
                counts=level.counts,
                cut_count=level.cut_count,
            )
            for level in backoff
        ],
        searched_shards=result.searched_shards,
        cut_count=result.cut_count,
    )


def search_levels_response(results: Sequence[SearchResult]) -> pb.SearchResponse:
    """The response for ``RetrievalSession.search_levels``' results (``[]``: no match)."""
    if not results:
        return pb.SearchResponse()
    return search_response(results[0], results[1:])


def search_result(response: pb.SearchResponse) -> SearchResult:
    """The first (longest-match) level of ``response``."""
    # A slice of a repeated field is a list made in C: tuple(field) iterates in Python, 3x slower.
    # SearchResult.from_engine skips the frozen dataclass's __init__ (the same result, faster).
    return SearchResult.from_engine(
        (response.match_length, response.occurrences, tuple(response.tokens[:]),
         tuple(response.parents[:]), tuple(response.counts[:]), response.cut_count),
        response.shard, tuple(response.searched_shards[:]))


def search_levels_result(response: pb.SearchResponse) -> list[SearchResult]:
    """Every level of ``response``, longest match first, as ``RetrievalSession.search_levels``
    returns them: ``[]`` when nothing matched. Each level carries the response's shard fields."""
    if response.match_length == 0:
        return []
    first = search_result(response)
    shard, searched = first.shard, first.searched_shards
    return [first] + [
        SearchResult.from_engine(
            (level.match_length, level.occurrences, tuple(level.tokens[:]),
             tuple(level.parents[:]), tuple(level.counts[:]), level.cut_count),
            shard, searched)
        for level in response.backoff
    ]


def decode_response(data: bytes) -> tuple[list[SearchResult], tuple[str, ...]]:
    """Every level of the serialized ``SearchResponse`` ``data`` (the first always, even when
    nothing matched) and its ``searched_shards``, decoded by the engine: half the cost or less of
    parsing the message and copying its repeated fields in Python for a 3-level answer
    (docs/BENCHMARKS.md). ``ValueError`` for bytes that are not a ``SearchResponse``."""
    raws, shard, searched = _engine.decode_search_response(data)
    return [SearchResult.from_engine(raw, shard, searched) for raw in raws], searched


def decode_levels(data: bytes) -> tuple[list[SearchResult], tuple[str, ...]]:
    """``search_levels_result`` of the serialized ``SearchResponse`` ``data`` (no level when
    nothing matched), and its ``searched_shards`` (given even then), by ``decode_response``."""
    levels, searched = decode_response(data)
    return ([] if levels[0].match_length == 0 else levels), searched


def info_response(info: DatastoreInfo) -> pb.InfoResponse:
    return pb.InfoResponse(
        format_version=info.format_version,
        vocab_size=info.vocab_size,
        n_tokens=info.n_tokens,
        n_docs=info.n_docs,
        tokenizer_name=info.tokenizer_name,
        tokenizer_fingerprint=info.tokenizer_fingerprint,
        shards=list(info.shards),
    )


def datastore_info(response: pb.InfoResponse) -> DatastoreInfo:
    return DatastoreInfo(
        format_version=response.format_version,
        vocab_size=response.vocab_size,
        n_tokens=response.n_tokens,
        n_docs=response.n_docs,
        tokenizer_name=response.tokenizer_name,
        tokenizer_fingerprint=response.tokenizer_fingerprint,
        shards=tuple(response.shards),
    )
