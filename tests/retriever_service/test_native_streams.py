"""The client's native search streams (``rest._engine`` ``Mailbox``, ``NativeSearchChannel``,
``NativeSearchStream``; grpc_client.rs) and where ``RemoteRetriever`` uses them: the mailbox a
step waits in, which streams are native, a message limit, a server killed under a waiting step,
and a session that goes away with a search in flight. Loopback sockets only.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from rest._engine import Mailbox, NativeSearchChannel
from rest.types import SearchParams
from retriever_service import client, wire
from retriever_service.client import RemoteRetriever
from retriever_service.replicas import ReplicaPolicy
from tests.retriever_service.service_testing import GatedDatastore, random_contexts, wait_until
from tests.retriever_service.test_client import PATIENT, serve, tree

PARAMS = SearchParams(min_span=1, budget=16, max_depth=4)


# --- the mailbox ---------------------------------------------------------------------------------

def test_mailbox_gives_what_was_put_in_order_and_nothing_after_close():
    box = Mailbox()
    assert box.put("a", 1) and box.put("b", 2)
    assert box.take(0) == [("a", 0, 1), ("b", 0, 2)]
    assert box.take(0) == []
    assert box.put("c", 3)
    assert box.close() == [("c", 0, 3)]  # delivered and not taken
    assert not box.put("d", 4)  # the step is over
    assert box.take(0) == [] and box.close() == []


def test_mailbox_take_waits_up_to_its_timeout_and_wakes_on_a_put():
    box = Mailbox()
    start = time.monotonic()
    assert box.take(0.05) == []
    assert time.monotonic() - start >= 0.045
    # The wait releases the GIL: another Python thread can put meanwhile and wakes it.
    threading.Timer(0.05, box.put, args=("late", "x")).start()
    start = time.monotonic()
    assert box.take(5.0) == [("late", 0, "x")]
    assert time.monotonic() - start < 4.0


def test_a_channel_to_nothing_fails_its_searches_as_unavailable(tmp_path):
    channel = NativeSearchChannel("127.0.0.1:1", max_message_bytes=1 << 20,
                                  keepalive_time_s=30.0, connect_timeout_s=1.0)
    late = []
    stream = channel.open_stream([], lambda *args: late.append(args))
    box = Mailbox()
    assert stream.send(b"", box, "attempt")  # accepted before the connection fails
    ((attempt, kind, (code, message)),) = box.take(5.0)
    assert (attempt, kind, code) == ("attempt", 2, 14)  # UNAVAILABLE
    assert message
    assert stream.ended()[0] == 14 and stream.pending() == 0
    assert not stream.send(b"", box, "again")  # an ended stream takes nothing
    assert late == []


def test_bad_channel_arguments_are_one_clear_error():
    with pytest.raises(ValueError, match="search channel to"):
        NativeSearchChannel("no port here/x y", max_message_bytes=1, keepalive_time_s=30.0,
                            connect_timeout_s=1.0)
    channel = NativeSearchChannel("127.0.0.1:1", max_message_bytes=1, keepalive_time_s=30.0,
                                  connect_timeout_s=1.0)
    with pytest.raises(ValueError, match="metadata key"):
        channel.open_stream([("Bad Key", "v")], print)


# --- RemoteRetriever -----------------------------------------------------------------------------

def stream_kinds(session) -> set[str]:
    return {type(stream).__name__ for stream in session._streams.values()}


def test_streams_are_native_on_plain_tcp_and_with_a_ca_file(datastore, datastore_dir, documents,
                                                            certs):
    contexts = random_contexts(documents, 10, seed=5)
    with serve(datastore, datastore_dir) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=PATIENT) as r:
        with r.session() as session:
            for context in contexts:
                assert tree(session.search(context, PARAMS)) == tree(
                    datastore.search(context, PARAMS))
            assert stream_kinds(session) == {"_NativeStream"}
    secure = {"tls_cert": str(certs / "server.pem"), "tls_key": str(certs / "server.key")}
    with serve(datastore, datastore_dir, **secure) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=PATIENT,
                            tls_ca_file=certs / "ca.pem") as r:
        with r.session() as session:
            assert tree(session.search(contexts[0], PARAMS)) == tree(
                datastore.search(contexts[0], PARAMS))
            assert stream_kinds(session) == {"_NativeStream"}


def test_tls_with_the_systems_roots_streams_through_grpc_python(datastore, datastore_dir, certs):
    """The native client reads no system roots: such a client keeps gRPC Python's streams, and
    other clients the native ones."""
    with serve(datastore, datastore_dir) as server:
        for options, kind in (({"tls": True}, client._Stream), ({}, client._NativeStream),
                              ({"tls_ca_file": certs / "ca.pem"}, client._NativeStream)):
            with RemoteRetriever(f"127.0.0.1:{server.port}", **options) as r:
                assert wait_until(lambda: r._pool._endpoints)
                (endpoint,) = r._pool._endpoints.values()
                assert endpoint.stream_route()[1].func is kind, options


def test_an_answer_over_the_message_limit_is_no_draft_and_counted(datastore, datastore_dir,
                                                                  documents):
    """Info fits the client's message limit, the answers do not: each search is no draft (not an
    exception), counted as RESOURCE_EXHAUSTED."""
    big = SearchParams(min_span=1, budget=1024, max_depth=16)
    limit = wire.info_response(datastore.info()).ByteSize() + 64
    contexts = [c for c in random_contexts(documents, 200, seed=9)
                if wire.search_response(datastore.search(c, big)).ByteSize() > limit][:5]
    assert len(contexts) == 5
    with serve(datastore, datastore_dir) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=5, policy=PATIENT,
                            max_message_bytes=limit) as r:
        assert r.info() == datastore.info()
        with r.session() as session:
            assert [session.search(c, big) for c in contexts] == [None] * 5
        (stats,) = r.stats()["endpoints"].values()
        # Every search sent failed so, until the endpoint was ejected for it.
        assert stats["failures_RESOURCE_EXHAUSTED"] == stats["attempts_first"] >= 1


def test_a_server_killed_under_a_waiting_step_costs_that_step_only(
        datastore_dir, documents, server_process):
    """SIGKILL while a search waits on the native stream: that search is no draft (within its
    deadline), and a server started again on the same port answers the next ones."""
    contexts = random_contexts(documents, 5, seed=11)
    server = server_process("--datastore", str(datastore_dir), "--port", "0")
    proc, port = server.proc, server.port
    policy = ReplicaPolicy(min_deadline_s=3.0)
    with RemoteRetriever(f"127.0.0.1:{port}", deadline_s=3.0, policy=policy) as r:
        r.info()
        with r.session() as session:
            assert session.search(contexts[0], PARAMS) is not None
            threading.Timer(0.2, os.kill, args=(proc.pid, signal.SIGKILL)).start()
            os.kill(proc.pid, signal.SIGSTOP)  # the next search waits until the kill
            start = time.monotonic()
            assert session.search(contexts[1], PARAMS) is None
            assert time.monotonic() - start < 3.5
            proc.wait(10)
            server_process("--datastore", str(datastore_dir), "--port", str(port))
            assert wait_until(lambda: session.search(contexts[2], PARAMS) is not None, 15)
            assert stream_kinds(session) == {"_NativeStream"}


def test_a_session_closed_with_a_search_in_flight_cancels_it(datastore, datastore_dir,
                                                             documents):
    """The search given up at its deadline is owed; closing the session cancels its stream,
    and the endpoint owes nothing once the cancellation is accounted (no thread is left)."""
    gated = GatedDatastore(datastore)
    contexts = random_contexts(documents, 3, seed=13)
    with serve(gated, datastore_dir) as server, \
            RemoteRetriever(f"127.0.0.1:{server.port}", deadline_s=0.2,
                            policy=ReplicaPolicy(min_deadline_s=0.2)) as r:
        r.info()
        session = r.session()
        assert session.search(contexts[0], PARAMS) is None  # the gate is closed: late
        (endpoint,) = [e for g in r._pool.routing() for e in g.endpoints]
        assert endpoint.owed == 1
        (stream,) = session._streams.values()
        assert isinstance(stream, client._NativeStream) and stream.busy()
        session.close()
        assert wait_until(lambda: endpoint.owed == 0 and not stream.busy())
        gated.gate.set()
        with r.session() as again:
            assert wait_until(lambda: again.search(contexts[1], PARAMS) is not None)
