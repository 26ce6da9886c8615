"""RemoteRetriever: equal to the engine, one stream per session, "no draft" on any failure."""

from __future__ import annotations

import time

import pytest

from rest.datastore import Datastore
from rest.retriever import Retriever
from rest.types import SearchParams
from retriever_service.client import IncompatibleEndpoints, RemoteRetriever, RetrieverUnavailable
from retriever_service.server import BackgroundServer, ServerConfig
from tests.retriever_service.service_testing import (
    VOCAB,
    GatedDatastore,
    free_port,
    random_contexts,
)


def serve(datastore, datastore_dir, **options) -> BackgroundServer:
    options.setdefault("port", 0)
    return BackgroundServer(ServerConfig(datastore=str(datastore_dir), **options), datastore)


@pytest.fixture(scope="module")
def server(datastore, datastore_dir):
    with serve(datastore, datastore_dir) as running:
        yield running


def test_is_a_retriever_whose_info_is_the_datastores(server, datastore):
    with RemoteRetriever(f"127.0.0.1:{server.port}") as retriever:
        assert isinstance(retriever, Retriever)
        assert retriever.info() == datastore.info()


@pytest.mark.parametrize("params", [
    SearchParams(), SearchParams(min_span=1, budget=8, max_depth=3),
    SearchParams(policy="rest", budget=32),
], ids=repr)
def test_session_searches_equal_the_engine(server, datastore, documents, params):
    with RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5) as retriever:
        with retriever.session() as session:
            for context in random_contexts(documents, 60, seed=21):
                assert session.search(context, params) == datastore.search(context, params)
            assert (session.searches, session.failures) == (60, 0)


def test_one_stream_per_session(datastore, datastore_dir, documents):
    gated = GatedDatastore(datastore)
    gated.gate.set()
    with serve(gated, datastore_dir) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5) as retriever:
        with retriever.session() as session:
            for context in random_contexts(documents, 5, seed=1):
                session.search(context, SearchParams())
            streams = session._streams
            assert len(streams) == 1
            session.search([1, 2], SearchParams())
            assert session._streams is streams  # the same stream, reused


def test_server_down_is_no_draft_and_counted():
    with RemoteRetriever(f"127.0.0.1:{free_port()}", deadline_s=0.5,
                         info_timeout_s=0.5) as retriever:
        with retriever.session() as session:
            started = time.monotonic()
            assert session.search([1, 2, 3], SearchParams()) is None
            assert session.search([1, 2, 3], SearchParams()) is None
            assert time.monotonic() - started < 2 * 0.5 + 2.0  # bounded by the deadlines
            assert (session.searches, session.failures) == (2, 2)
        with pytest.raises(RetrieverUnavailable, match="did not answer Info"):
            retriever.info()


def test_session_recovers_when_the_server_comes_back(datastore, datastore_dir):
    port = free_port()
    first = serve(datastore, datastore_dir, port=port)
    with RemoteRetriever(f"127.0.0.1:{port}", deadline_s=2) as retriever:
        session = retriever.session()
        assert session.search([1, 2], SearchParams()) == datastore.search([1, 2])
        first.stop()
        assert session.search([1, 2], SearchParams()) is None
        assert session.failures == 1
        with serve(datastore, datastore_dir, port=port):
            retriever.info()  # waits until the channel reconnects
            assert session.search([1, 2], SearchParams()) == datastore.search([1, 2])
            assert session.failures == 1
        session.close()


def test_a_late_answer_is_no_draft_within_the_deadline(datastore, datastore_dir):
    gated = GatedDatastore(datastore)
    with serve(gated, datastore_dir) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=0.2) as retriever:
        retriever.info()
        with retriever.session() as session:
            started = time.monotonic()
            assert session.search([1, 2], SearchParams()) is None
            elapsed = time.monotonic() - started
            # Given up at the deadline (the watchdog ticks every 10 ms), not when the server
            # answers; the upper bound leaves room for a loaded test machine.
            assert 0.2 <= elapsed < 2.0, elapsed
            assert session.failures == 1
            gated.gate.set()
            # The late stream was dropped; the next search opens a new one and is answered.
            assert session.search([1, 2], SearchParams()) == datastore.search([1, 2])
            assert session.failures == 1


def test_a_refused_search_is_no_draft(server):
    with RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5) as retriever:
        with retriever.session() as session:
            assert session.search([1, VOCAB + 5], SearchParams()) is None  # INVALID_ARGUMENT
            assert session.failures == 1
            assert session.search([1, 2], SearchParams()) is not None


def test_sessions_in_threads_are_independent(server, datastore, documents):
    import threading

    contexts = random_contexts(documents, 40, seed=8)
    failures: list[str] = []
    with RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5) as retriever:
        def run() -> None:
            with retriever.session() as session:
                for context in contexts:
                    if session.search(context, SearchParams()) != datastore.search(context):
                        failures.append(repr(context))
        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert failures == []


# --- several endpoints, each serving some shards ---------------------------------------------

@pytest.fixture(scope="module")
def sharded_servers(datastore_dir, datastore):
    names = datastore.shard_names
    groups = [names[:1], names[1:]]
    servers = [serve(Datastore.open(datastore_dir, shards=g), datastore_dir) for g in groups]
    yield [f"127.0.0.1:{s.port}" for s in servers]
    for s in servers:
        s.stop()


def test_info_of_several_endpoints_is_combined(sharded_servers, datastore):
    with RemoteRetriever(sharded_servers) as retriever:
        assert retriever.info() == datastore.info()


@pytest.mark.parametrize("budget", [4096, 16])
def test_several_endpoints_merge_to_the_whole_datastore(sharded_servers, datastore, documents,
                                                        budget):
    params = SearchParams(min_span=1, max_span=12, budget=budget, max_depth=4)
    with RemoteRetriever(sharded_servers, deadline_s=5) as retriever, \
            retriever.session() as session:
        for context in random_contexts(documents, 60, seed=33):
            merged = session.search(context, params)
            whole = datastore.search(context, params)
            assert (merged.match_length, merged.occurrences) == (
                whole.match_length, whole.occurrences)
            assert len(merged) <= budget
            if budget == 4096:  # no server pruned: the merge is exact
                assert (merged.tokens, merged.parents, merged.counts) == (
                    whole.tokens, whole.parents, whole.counts)
        assert len(session._streams) == 2


def test_one_endpoint_down_is_no_draft(sharded_servers):
    endpoints = [sharded_servers[0], f"127.0.0.1:{free_port()}"]
    with RemoteRetriever(endpoints, deadline_s=0.5) as retriever, retriever.session() as session:
        assert session.search([1, 2], SearchParams()) is None
        assert session.failures == 1


def test_endpoints_serving_the_same_shard_are_refused(sharded_servers):
    with RemoteRetriever([sharded_servers[0], sharded_servers[0]]) as retriever:
        with pytest.raises(IncompatibleEndpoints, match="overlapping shards"):
            retriever.info()


def test_endpoints_of_different_datastores_are_refused(sharded_servers, slow_datastore_dir):
    with serve(Datastore.open(slow_datastore_dir), slow_datastore_dir) as other, \
            RemoteRetriever([sharded_servers[0], f"127.0.0.1:{other.port}"]) as retriever:
        with pytest.raises(IncompatibleEndpoints, match="tokenizer_fingerprint"):
            retriever.info()


def test_closing_the_retriever_closes_its_sessions(server):
    retriever = RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5)
    sessions = [retriever.session() for _ in range(3)]
    for session in sessions:
        assert session.search([1, 2], SearchParams()) is not None
    retriever.close()
    assert all(session._streams is None for session in sessions)
