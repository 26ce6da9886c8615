"""RemoteRetriever and a server's search port (Info's ``search_port``): sessions search there,
fall back to the main port when it goes away (the same answers, at most the step it failed on
lost), and return to it when it is back."""

from __future__ import annotations

from rest.types import SearchParams
from retriever_service.client import RemoteRetriever
from retriever_service.server import BackgroundServer, ServerConfig
from tests.retriever_service.service_testing import random_contexts, wait_until
from tests.retriever_service.test_client import PATIENT, tree

MiB = 1 << 20


def port_searches(servicer) -> int:
    """SearchStream calls the search port has finished (a session's stream ends when it closes)."""
    return sum(n for method, _, n in servicer._search_port.counts() if method == "SearchStream")


def search_all(retriever: RemoteRetriever, contexts) -> list:
    with retriever.session() as session:
        return [tree(session.search(c, SearchParams())) for c in contexts]


def test_sessions_use_the_search_port_fall_back_and_come_back(datastore, datastore_dir, documents):
    contexts = random_contexts(documents, 30, seed=21)
    expected = [tree(datastore.search(c, SearchParams())) for c in contexts]
    config = ServerConfig(datastore=str(datastore_dir), port=0, search_port=0)
    with BackgroundServer(config, datastore) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=PATIENT) as retriever:
        servicer = server._running._servicer
        assert search_all(retriever, contexts) == expected
        assert wait_until(lambda: port_searches(servicer) == 1)

        port = server.search_port
        servicer.close_search_port(0.0)
        answers = search_all(retriever, contexts)
        lost = [i for i, a in enumerate(answers) if a is None]
        assert len(lost) <= 1, lost  # the step whose search met the closed port, at most
        assert [a for a in answers if a is not None] == \
            [e for i, e in enumerate(expected) if i not in lost]
        endpoint = retriever.stats()["endpoints"][f"127.0.0.1:{server.port}"]
        assert endpoint["search_port_fallbacks"] >= 1

        # The same port serves again: after its back-off, sessions use it again.
        servicer.open_search_port("127.0.0.1", port, threads=1, max_message_bytes=4 * MiB,
                                  keepalive_time_s=30.0, token=None)

        def back() -> bool:
            answers = search_all(retriever, contexts[:5])
            assert all(a is None or a == e for a, e in zip(answers, expected))
            return port_searches(servicer) >= 1

        assert wait_until(back, timeout=40, interval=0.5)


def test_use_search_port_false_keeps_searches_on_the_main_port(datastore, datastore_dir, documents):
    contexts = random_contexts(documents, 10, seed=22)
    config = ServerConfig(datastore=str(datastore_dir), port=0, search_port=0)
    with BackgroundServer(config, datastore) as server:
        with RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=PATIENT,
                             use_search_port=False) as retriever:
            assert search_all(retriever, contexts) == \
                [tree(datastore.search(c, SearchParams())) for c in contexts]
        with RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=PATIENT) as used:
            assert search_all(used, contexts[:1]) == \
                [tree(datastore.search(contexts[0], SearchParams()))]
        # Only the second retriever's session reached the search port.
        assert wait_until(lambda: port_searches(server._running._servicer) == 1)
