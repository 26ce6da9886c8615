"""RemoteRetriever against one endpoint: equal to the engine, one stream per session, "no draft" on
any failure, usable while its server is down. Replicas and shards: test_client_replicas.py."""

from __future__ import annotations

import time

import pytest

from rest.retriever import Retriever
from rest.types import SearchParams
from retriever_service.client import RemoteRetriever, RetrieverUnavailable
from retriever_service.replicas import ReplicaPolicy
from retriever_service.server import BackgroundServer, ServerConfig
from tests.retriever_service.service_testing import (
    VOCAB,
    GatedDatastore,
    free_port,
    random_contexts,
    wait_until,
)

# Deadlines derived from recent latencies would give up on a search that a loaded test machine
# delays; tests that compare every answer keep the fixed deadline.
PATIENT = ReplicaPolicy(min_deadline_s=5.0)


def tree(result):
    """What a search found, without ``searched_shards``: the service reports the shards an
    answer covers, the in-process engine does not."""
    if result is None:
        return None
    return (result.match_length, result.occurrences, result.tokens, result.parents,
            result.counts, result.shard, result.cut_count)


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
    with RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=PATIENT) as retriever:
        with retriever.session() as session:
            for context in random_contexts(documents, 60, seed=21):
                assert tree(session.search(context, params)) == tree(
                    datastore.search(context, params))
            assert (session.searches, session.failures) == (60, 0)


def test_one_stream_per_session(datastore, datastore_dir, documents):
    gated = GatedDatastore(datastore)
    gated.gate.set()
    with serve(gated, datastore_dir) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5) as retriever:
        with retriever.session() as session:
            for context in random_contexts(documents, 5, seed=1):
                session.search(context, SearchParams())
            streams = dict(session._streams)
            assert len(streams) == 1
            session.search([1, 2], SearchParams())
            assert session._streams == streams  # the same stream, reused


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


def test_usable_while_its_server_is_down_and_working_once_it_answers(datastore, datastore_dir):
    """Constructible, quick to say it is unavailable, answering "no draft" at once, and
    searching as soon as a server listens."""
    port = free_port()
    retriever = RemoteRetriever(f"127.0.0.1:{port}", deadline_s=1.0, info_timeout_s=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(RetrieverUnavailable, match="Connection refused|UNAVAILABLE"):
            retriever.info()
        assert time.monotonic() - started < 1.5  # not gRPC's 20 s connect timeout
        session = retriever.session()
        started = time.monotonic()
        for _ in range(20):
            assert session.search([1, 2], SearchParams()) is None
        assert time.monotonic() - started < 0.5  # nothing to wait for while nothing answers
        with serve(datastore, datastore_dir, port=port):
            assert wait_until(lambda: session.search([1, 2], SearchParams()) is not None, 5.0)
            assert retriever.info() == datastore.info()
            assert tree(session.search([1, 2], SearchParams())) == tree(datastore.search([1, 2]))
        session.close()
    finally:
        retriever.close()


def test_a_session_that_kept_searching_gets_answers_within_a_second_of_a_restart(
    datastore, datastore_dir
):
    """gRPC's default reconnect backoff (1 s growing 1.6x) left a client 8.5-9.6 s behind a
    restarted server; ``client.RECONNECT_OPTIONS`` bring it under a second."""
    port = free_port()
    first = serve(datastore, datastore_dir, port=port)
    with RemoteRetriever(f"127.0.0.1:{port}", deadline_s=0.2, policy=PATIENT) as retriever:
        session = retriever.session()
        assert tree(session.search([1, 2], SearchParams())) == tree(datastore.search([1, 2]))
        first.stop()
        # Keep searching through the outage long enough for gRPC's backoff to grow.
        down_until = time.monotonic() + 4.0
        while time.monotonic() < down_until:
            assert session.search([1, 2], SearchParams()) is None
            time.sleep(0.02)
        with serve(datastore, datastore_dir, port=port):
            back = time.monotonic()
            while session.search([1, 2], SearchParams()) is None:
                assert time.monotonic() - back < 5.0, "never reconnected"
                time.sleep(0.01)
            assert time.monotonic() - back < 1.0
            assert tree(session.search([1, 2], SearchParams())) == tree(datastore.search([1, 2]))
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
            # Given up at the deadline, not when the server answers; the upper bound leaves
            # room for a loaded test machine.
            assert 0.2 <= elapsed < 2.0, elapsed
            assert session.failures == 1
            gated.gate.set()
            # Once the late answer has come (until then the server gets no new search), the next
            # search opens a new stream (the late one is out of step) and is answered.
            endpoint = next(iter(retriever._pool._endpoints.values()))
            assert wait_until(lambda: endpoint.owed == 0)
            assert tree(session.search([1, 2], SearchParams())) == tree(datastore.search([1, 2]))
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
                    found = session.search(context, SearchParams())
                    if tree(found) != tree(datastore.search(context)):
                        failures.append(repr(context))
        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert failures == []


def test_closing_the_retriever_closes_its_sessions(server):
    retriever = RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5)
    sessions = [retriever.session() for _ in range(3)]
    for session in sessions:
        assert session.search([1, 2], SearchParams()) is not None
    retriever.close()
    assert all(session._streams == {} for session in sessions)
    assert all(session.search([1, 2], SearchParams()) is None for session in sessions)
