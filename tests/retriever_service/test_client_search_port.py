"""RemoteRetriever and a server's search port (``InfoResponse.search_port``): searches go there,
fall back to the main port when it fails (the same answers, no step lost), and go there again
once it is back; TLS, server name and token are sent to it too.

Most tests play the search port with a second server on the same datastore (the same servicer,
another port) that the main port's ``Info`` reports, so that it can be killed, held and given
TLS; the last ones use the engine's own search port (``retriever-server --search-port``). All
on loopback sockets.
"""

from __future__ import annotations

import logging
from dataclasses import replace
import threading

import pytest

from rest.types import SearchParams
from retriever_service import wire
from retriever_service.client import RemoteRetriever
from retriever_service.discovery import Address, parse_target
from retriever_service.replicas import ReplicaPolicy
from retriever_service.server import BackgroundServer, ServerConfig, start_native_port
from tests.retriever_service.service_testing import (
    GatedDatastore,
    free_port,
    random_contexts,
    wait_until,
)
from tests.retriever_service.test_client import PATIENT, serve, tree

# Fixed deadlines (answers are compared), and a search port tried again soon after it failed.
POLICY = ReplicaPolicy(min_deadline_s=5.0, search_port_retry_s=0.3)
PARAMS = SearchParams(min_span=1, budget=16, max_depth=4)


def counting(datastore) -> GatedDatastore:
    """The datastore, counting the searches that reach it (its gate open)."""
    gated = GatedDatastore(datastore)
    gated.gate.set()
    return gated


@pytest.fixture
def search_port(monkeypatch) -> int:
    """A free port that every server started from now on reports as its search port."""
    port = free_port()
    info_response = wire.info_response

    def with_search_port(info):
        response = info_response(info)
        response.search_port = port
        return response

    monkeypatch.setattr(wire, "info_response", with_search_port)
    return port


def endpoint_stats(retriever: RemoteRetriever) -> dict:
    (stats,) = retriever.stats()["endpoints"].values()
    return stats


def check_searches(session, datastore, contexts) -> None:
    for context in contexts:
        assert tree(session.search(context, PARAMS)) == tree(datastore.search(context, PARAMS))


def test_searches_go_to_the_search_port(datastore, datastore_dir, documents, search_port):
    main, fast = counting(datastore), counting(datastore)
    with serve(main, datastore_dir) as server, serve(fast, datastore_dir, port=search_port), \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=POLICY) as r:
        assert r.info() == datastore.info()  # Info on the main port
        with r.session() as session:
            check_searches(session, datastore, random_contexts(documents, 20, seed=3))
            assert (session.searches, session.failures) == (20, 0)
        assert (fast.calls, main.calls) == (20, 0)
        stats = endpoint_stats(r)
        assert (stats["search_port"], stats["on_search_port"]) == (search_port, True)
        assert stats["sent_search_port"] == 20 and "sent_main_port" not in stats
        assert "search_port_fallbacks" not in stats


def test_use_search_port_false_keeps_the_main_port(datastore, datastore_dir, documents,
                                                   search_port):
    main, fast = counting(datastore), counting(datastore)
    with serve(main, datastore_dir) as server, serve(fast, datastore_dir, port=search_port), \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=POLICY,
                            use_search_port=False) as r:
        with r.session() as session:
            check_searches(session, datastore, random_contexts(documents, 10, seed=4))
        assert (fast.calls, main.calls) == (0, 10)
        assert endpoint_stats(r)["search_port"] == 0


def test_a_killed_search_port_falls_back_and_is_used_again_once_back(
    datastore, datastore_dir, documents, search_port
):
    main = counting(datastore)
    contexts = random_contexts(documents, 90, seed=5)
    with serve(main, datastore_dir) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=POLICY) as r:
        with r.session() as session:
            fast = counting(datastore)
            with serve(fast, datastore_dir, port=search_port):
                check_searches(session, datastore, contexts[:30])
                assert (fast.calls, main.calls) == (30, 0)
            # Killed: the same answers, from the main port, and no step without one.
            check_searches(session, datastore, contexts[30:60])
            assert main.calls == 30 and session.failures == 0
            assert endpoint_stats(r)["search_port_fallbacks"] >= 1
            # Back on the same port: used again within the retry interval, same answers.
            back = counting(datastore)
            with serve(back, datastore_dir, port=search_port):
                assert wait_until(lambda: session.search(contexts[0], PARAMS) is not None
                                  and back.calls > 0, 5.0)
                calls = back.calls
                check_searches(session, datastore, contexts[60:])
                assert back.calls == calls + 30
            assert session.failures == 0
        stats = endpoint_stats(r)
        assert stats["sent_search_port"] >= 60 and stats["sent_main_port"] >= 30


def test_a_search_in_flight_when_the_search_port_dies_is_answered_by_the_main_port(
    datastore, datastore_dir, documents, search_port
):
    main, fast = counting(datastore), GatedDatastore(datastore)
    context = random_contexts(documents, 1, seed=6)[0]
    with serve(main, datastore_dir) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=10, policy=POLICY) as r:
        wait_until(lambda: endpoint_stats(r).get("on_search_port", False), 5.0)
        with r.session() as session:
            results = []
            fast_server = serve(fast, datastore_dir, port=search_port)
            try:
                search = threading.Thread(
                    target=lambda: results.append(session.search(context, PARAMS)))
                search.start()
                fast.wait_entered(1)  # held at the search port's gate
            finally:
                fast_server.stop()  # its stream ends with the search unanswered
                fast.gate.set()
            search.join(10)
            assert tree(results[0]) == tree(datastore.search(context, PARAMS))
            assert (session.failures, main.calls) == (0, 1)
        stats = endpoint_stats(r)
        assert stats["search_port_fallbacks"] >= 1
        assert "failures_UNAVAILABLE" not in stats and "attempts_failover" not in stats


def test_a_search_port_not_listening_yet_costs_no_step(datastore, datastore_dir, documents,
                                                      search_port):
    main = counting(datastore)
    with serve(main, datastore_dir) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=POLICY) as r:
        with r.session() as session:
            check_searches(session, datastore, random_contexts(documents, 10, seed=7))
            assert session.failures == 0 and main.calls == 10
            assert endpoint_stats(r)["search_port_fallbacks"] >= 1
            assert r.stats()["endpoints"][f"127.0.0.1:{server.port}"]["ejection"] == "serving"


def test_tls_server_name_and_token_are_sent_to_the_search_port(
    datastore, datastore_dir, documents, certs, search_port
):
    secure = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key"),
              "token": "s3cret"}
    main, fast = counting(datastore), counting(datastore)
    with serve(main, datastore_dir, **secure) as server, \
            serve(fast, datastore_dir, port=search_port, **secure), \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=POLICY,
                            token="s3cret", tls_ca_file=certs / "ca.pem",
                            tls_server_name="localhost") as r:
        with r.session() as session:
            check_searches(session, datastore, random_contexts(documents, 10, seed=8))
        assert (fast.calls, main.calls) == (10, 0)
        assert "search_port_fallbacks" not in endpoint_stats(r)


def test_an_invalid_search_port_is_ignored_with_a_warning(datastore, datastore_dir, documents,
                                                         monkeypatch, caplog):
    info_response = wire.info_response

    def with_search_port(info):
        response = info_response(info)
        response.search_port = 70000
        return response

    monkeypatch.setattr(wire, "info_response", with_search_port)
    main = counting(datastore)
    with caplog.at_level(logging.WARNING, logger="retriever_service.client"), \
            serve(main, datastore_dir) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=POLICY) as r:
        with r.session() as session:
            check_searches(session, datastore, random_contexts(documents, 5, seed=9))
        assert main.calls == 5 and endpoint_stats(r)["search_port"] == 0
    assert "search port 70000, which is no TCP port" in caplog.text


@pytest.mark.parametrize(("dial", "expected"), [
    ("10.0.0.7:50051", "10.0.0.7:50053"),
    ("[fd00::7]:50051", "[fd00::7]:50053"),
])
def test_the_search_port_is_dialled_at_the_address_the_endpoint_resolved_to(dial, expected):
    address = Address(dial, parse_target("retriever.rest.svc:50051"))
    assert address.with_port(50053) == expected


def test_a_raw_target_has_no_search_port():
    target = parse_target("unix:/tmp/retriever.sock")
    assert Address(target.text, target).with_port(50053) is None


# --- the engine's own search port -----------------------------------------------------------------


def port_searches(server) -> int:
    """Searches the engine's search port has answered or refused so far."""
    return sum(server._running.native.stats()["requests"].values())


def search_all(retriever: RemoteRetriever, contexts) -> list:
    with retriever.session() as session:
        answers = [tree(session.search(c, SearchParams())) for c in contexts]
        assert session.failures == 0
        return answers


def test_sessions_use_the_engines_search_port_fall_back_and_come_back(
    datastore, datastore_dir, documents
):
    contexts = random_contexts(documents, 30, seed=21)
    expected = [tree(datastore.search(c, SearchParams())) for c in contexts]
    config = ServerConfig(datastore=str(datastore_dir), port=0, search_port=0)
    with BackgroundServer(config, datastore) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=POLICY) as retriever:
        assert search_all(retriever, contexts) == expected
        assert port_searches(server) == len(contexts)

        running = server._running
        running.native.stop(0.0)
        assert search_all(retriever, contexts) == expected  # no step lost
        endpoint = retriever.stats()["endpoints"][f"127.0.0.1:{server.port}"]
        assert endpoint["search_port_fallbacks"] >= 1

        # The same port serves again: after search_port_retry_s, sessions use it again.
        running.native = start_native_port(replace(config, search_port=server.search_port),
                                           running.shards._servicer, traced=False)

        def back() -> bool:
            assert search_all(retriever, contexts[:5]) == expected[:5]
            return port_searches(server) >= 1

        assert wait_until(back, timeout=10, interval=0.1)


def test_use_search_port_false_keeps_searches_off_the_engines_search_port(
    datastore, datastore_dir, documents
):
    contexts = random_contexts(documents, 10, seed=22)
    config = ServerConfig(datastore=str(datastore_dir), port=0, search_port=0)
    with BackgroundServer(config, datastore) as server:
        with RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=PATIENT,
                             use_search_port=False) as retriever:
            assert search_all(retriever, contexts) == \
                [tree(datastore.search(c, SearchParams())) for c in contexts]
            assert port_searches(server) == 0
        with RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=PATIENT) as used:
            assert search_all(used, contexts[:1]) == \
                [tree(datastore.search(contexts[0], SearchParams()))]
        assert port_searches(server) == 1  # the second retriever's one search
