"""Back-off levels in one answer (SearchRequest.levels): every level of a request equals the
in-process engine's, a stream's drafting equals in-process drafting, the cap is enforced, and a
client that predates the field gets what it got before."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from decoder.draft_sources import RetrieverDraftSource
from rest.datastore import MAX_LEVELS
from rest.retriever import LocalRetriever, RetrievalSession
from rest.types import SearchParams
from retriever_service import wire
from retriever_service.server import BackgroundServer, ServerConfig
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc
from tests.retriever_service.service_testing import random_contexts


@pytest.fixture(scope="module", params=[200, 0], ids=["inline-slice", "executor-only"])
def stub(request, datastore, datastore_dir):
    config = ServerConfig(datastore=str(datastore_dir), port=0, max_context_tokens=64,
                          inline_search_us=request.param)
    with BackgroundServer(config, datastore) as running:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield pb_grpc.RetrieverStub(channel)


PARAMS = [
    SearchParams(),
    SearchParams(min_span=1, max_span=6, budget=8, max_depth=3),
    SearchParams(min_span=1, budget=0),
    SearchParams(min_span=1, budget=16, max_depth=4, policy="rest"),
]


@pytest.mark.parametrize("params", PARAMS, ids=repr)
def test_every_level_equals_the_in_process_engine(stub, datastore, documents, params):
    for i, context in enumerate(random_contexts(documents, 30, seed=21)):
        levels = 1 + i % 4
        shard = datastore.shard_names[i % 3] if i % 5 == 0 else None
        response = stub.Search(wire.search_request(context, params, shard, levels=levels))
        expected = datastore.search_levels(context, params, levels,
                                           shards=[shard] if shard else None)
        found = wire.search_levels_result(response)
        assert found == expected, context
        # cut_count and the covered shards are part of every level's answer too.
        assert [r.cut_count for r in found] == [r.cut_count for r in expected]
        assert list(response.searched_shards) == ([shard] if shard else datastore.shard_names)


def test_a_stream_answers_every_level_of_every_request_in_order(stub, datastore, documents):
    params = SearchParams(min_span=1)
    contexts = random_contexts(documents, 60, seed=22)
    requests = [wire.search_request(c, params, levels=3) for c in contexts]
    responses = list(stub.SearchStream(iter(requests), timeout=30))
    assert [wire.search_levels_result(r) for r in responses] == [
        datastore.search_levels(c, params, 3) for c in contexts]


class _OneRoundTripSession(RetrievalSession):
    """Every level of a step in one request on one stream: what the server offers a client."""

    def __init__(self, stub) -> None:
        self._requests: list = []
        self._stub = stub
        self.round_trips = 0

    def search(self, context, params):
        raise AssertionError("drafting must ask for all levels at once")

    def search_levels(self, context, params, levels):
        self.round_trips += 1
        response = self._stub.Search(wire.search_request(context, params, levels=levels))
        return wire.search_levels_result(response)


def test_remote_drafting_with_levels_equals_in_process_drafting(stub, datastore_dir, documents):
    """A decoding session's contexts (a document's tokens one step at a time): the datastore
    source drafts the same levels, every token, parent and count, through one round trip a step."""
    params = SearchParams(min_span=1, budget=24)
    remote_session = _OneRoundTripSession(stub)
    remote = RetrieverDraftSource(remote_session, params, levels=3)
    with LocalRetriever(str(datastore_dir)) as local_retriever:
        local = RetrieverDraftSource(local_retriever.session(), params, levels=3)
        steps = 0
        for doc in documents[:6]:
            for end in range(1, min(len(doc), 80), 3):
                got, want = remote.propose(doc[:end]), local.propose(doc[:end])
                assert [(lv.match_length, lv.occurrences, lv.trie) for lv in got] == [
                    (lv.match_length, lv.occurrences, lv.trie) for lv in want], end
                steps += 1
    assert remote_session.round_trips == steps


@pytest.mark.parametrize("levels", [0, MAX_LEVELS + 1])
def test_levels_beyond_the_cap_are_invalid_argument(stub, levels):
    request = wire.search_request([1, 2, 3], SearchParams(), levels=levels)
    with pytest.raises(grpc.RpcError) as info:
        stub.Search(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("levels")


def _message_without_new_fields():
    """``SearchResponse`` as a client built before fields 7-9 existed sees it."""
    file_proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(file_proto)
    response = next(m for m in file_proto.message_type if m.name == "SearchResponse")
    kept = [f for f in response.field if f.number <= 6]
    del response.field[:]
    response.field.extend(kept)
    del file_proto.service[:]  # only the response is needed, without what refers to the rest
    others = [m for m in file_proto.message_type if m.name != "SearchResponse"]
    for message in others:
        file_proto.message_type.remove(message)
    file_proto.name = "old_retriever.proto"
    file_proto.package = "old.rest.retriever.v1"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("old.rest.retriever.v1.SearchResponse"))


def test_a_request_without_levels_gets_the_answer_it_always_got(stub, datastore, documents):
    old_response = _message_without_new_fields()
    for context in random_contexts(documents, 30, seed=23):
        request = wire.search_request(context, SearchParams())
        assert not request.HasField("levels")
        data = stub.Search(request).SerializeToString()
        response = pb.SearchResponse.FromString(data)
        assert len(response.backoff) == 0
        expected = datastore.search(context)
        old = old_response.FromString(data)  # the new fields are unknown to it, and skipped
        assert (old.match_length, old.occurrences, list(old.tokens), list(old.parents),
                list(old.counts), old.shard) == (
            expected.match_length, expected.occurrences, list(expected.tokens),
            list(expected.parents), list(expected.counts), expected.shard)


class SliceRecorder:
    """The datastore, with the time limit of every ``try_search`` (the inline slice) recorded,
    and what the servicer gives ``try_search_request`` (the slice per level and the time left,
    from which the engine makes the slice) in ``requests``. ``engine_checks=False``: a datastore
    without ``try_search_request`` (the servicer decodes and checks every request in Python)."""

    def __init__(self, datastore, engine_checks: bool = True) -> None:
        self._datastore = datastore
        self._engine_checks = engine_checks
        self.slices: list[float] = []
        self.requests: list[tuple[float, float | None]] = []
        if engine_checks:
            self.try_search_request = self._try_search_request

    def __getattr__(self, name):
        if name == "try_search_request" and not self._engine_checks:
            raise AttributeError(name)
        return getattr(self._datastore, name)

    def _try_search_request(self, request, limits, slice_per_level_s, remaining_s, session=None):
        self.requests.append((slice_per_level_s, remaining_s))
        return self._datastore.try_search_request(request, limits, slice_per_level_s,
                                                  remaining_s, session)

    def try_search(self, context, params, shards, time_limit_s, **kwargs):
        self.slices.append(time_limit_s)
        return self._datastore.try_search(context, params, shards, time_limit_s, **kwargs)


class Remaining:
    """What the servicer uses of a call's context: its deadline."""

    def __init__(self, remaining_s) -> None:
        self.remaining_s = remaining_s

    def time_remaining(self):
        return self.remaining_s

    async def abort(self, code, message):
        raise AssertionError(f"refused: {code} {message}")


@pytest.mark.parametrize("engine_checks", [False, True], ids=["python-checks", "engine-checks"])
def test_the_inline_slice_is_per_level_and_never_past_the_deadline(datastore, documents,
                                                                   engine_checks):
    import asyncio

    from retriever_service.searches import AsyncSearches
    from retriever_service.servicer import RetrieverServicer

    recorder = SliceRecorder(datastore, engine_checks)
    params = SearchParams(min_span=1)
    contexts = random_contexts(documents, 8, seed=23)

    async def run() -> list[tuple[int, float | None, list]]:
        searches = AsyncSearches(datastore.search_executor(1, as_wire=True))
        servicer = RetrieverServicer(recorder, searches, max_concurrent_searches=4,
                                     max_context_tokens=64, inline_search_s=200e-6)
        answers = []
        try:
            for i, context in enumerate(contexts):
                levels, remaining = 1 + i % 4, (None, 10.0, 300e-6)[i % 3]
                data = wire.search_request(context, params, levels=levels).SerializeToString()
                response = await servicer.Search(data, Remaining(remaining))
                answers.append((levels, remaining, wire.search_levels_result(
                    pb.SearchResponse.FromString(response))))
        finally:
            searches.close()
        return answers

    answers = asyncio.run(run())
    if engine_checks:
        # The engine makes the slice (slice per level times the levels the request asks for,
        # never past the time left) from what the servicer gives it: these, for every call.
        assert recorder.requests == [(200e-6, remaining) for _, remaining, _ in answers]
        assert recorder.slices == []  # no call needed a second, Python-checked try
    else:
        assert recorder.slices == pytest.approx(
            [200e-6 * levels if remaining is None else min(200e-6 * levels, remaining)
             for levels, remaining, _ in answers])
        assert recorder.slices[1] == pytest.approx(400e-6)  # 2 levels, a far deadline
        assert recorder.slices[5] == pytest.approx(300e-6)  # 4 levels, cut to the deadline
    # The same answers, on the loop or on a worker.
    assert [found for _, _, found in answers] == [
        datastore.search_levels(c, params, 1 + i % 4) for i, c in enumerate(contexts)]
