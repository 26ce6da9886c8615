"""RemoteRetriever over replicated shards: replica sets from Info, failover, hedging, health,
ejection of a stalled replica, a lost shard, names resolved to several addresses, answers that
break the contract, and the metrics that show it all."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from rest.datastore import Datastore
from rest.retriever import LocalRetriever
from rest.types import SearchParams
from retriever_service.client import SERVICE_NAME, IncompatibleEndpoints, RemoteRetriever
from retriever_service.replicas import EjectionPolicy, ReplicaPolicy
from retriever_service.server import BackgroundServer, ServerConfig
from retriever_service.v1 import retriever_pb2 as pb
from retriever_service.v1 import retriever_pb2_grpc as pb_grpc
from tests.retriever_service.service_testing import (
    VOCAB,
    GatedDatastore,
    ServerProcess,
    random_contexts,
    wait_until,
)

PATIENT = ReplicaPolicy(min_deadline_s=5.0)  # compare every answer: no adaptive deadline
WIDE = SearchParams(min_span=1, max_span=12, budget=4096, max_depth=4)  # no shard prunes


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


def address(server) -> str:
    return f"127.0.0.1:{server.port}"


def set_health(server: BackgroundServer, name: str, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else \
        health_pb2.HealthCheckResponse.NOT_SERVING
    asyncio.run_coroutine_threadsafe(server.health.set(name, status), server._loop).result(10)


def endpoint(retriever: RemoteRetriever, server):
    return retriever._pool._endpoints[address(server)]


def attempts(retriever: RemoteRetriever, server) -> int:
    counts = endpoint(retriever, server).counts
    return sum(v for k, v in counts.items() if k.startswith("attempts_"))


@pytest.fixture(scope="module")
def layout(datastore_dir, datastore):
    """Two replica sets ([shard 0], [shards 1, 2]), two replicas each, in this process."""
    names = datastore.shard_names
    groups = [names[:1], names[1:]]
    servers = [[serve(Datastore.open(datastore_dir, shards=g), datastore_dir) for _ in range(2)]
               for g in groups]
    yield servers
    for replicas in servers:
        for s in replicas:
            s.stop()


def test_endpoints_serving_the_same_shards_are_replicas(layout, datastore, documents):
    endpoints = [address(s) for replicas in layout for s in replicas]
    with RemoteRetriever(endpoints, deadline_s=5, policy=PATIENT) as retriever:
        assert retriever.info() == datastore.info()  # each shard counted once
        stats = retriever.stats()["shards"]
        assert {label: sorted(g["endpoints"]) for label, g in stats.items()} == {
            "shard-00000": sorted(endpoints[:2]), "shard-00001,shard-00002": sorted(endpoints[2:])}
        with retriever.session() as session:
            for context in random_contexts(documents, 40, seed=33):
                assert tree(session.search(context, WIDE)) == tree(datastore.search(context, WIDE))
            assert (session.failures, session.partial) == (0, 0)
        firsts = sum(e.get("attempts_first", 0) for e in retriever.stats()["endpoints"].values())
        assert firsts == 2 * 40  # one replica of each set per step (and a hedge at times)


def test_the_merge_keeps_match_and_occurrences_exact_when_shards_prune(layout, datastore,
                                                                        documents):
    params = SearchParams(min_span=1, max_span=12, budget=16, max_depth=4)
    endpoints = [address(replicas[0]) for replicas in layout]
    with RemoteRetriever(endpoints, deadline_s=5, policy=PATIENT) as retriever, \
            retriever.session() as session:
        for context in random_contexts(documents, 40, seed=34):
            merged, whole = session.search(context, params), datastore.search(context, params)
            assert (merged.match_length, merged.occurrences) == (whole.match_length,
                                                                 whole.occurrences)
            assert len(merged) <= params.budget


def test_overlapping_shard_sets_and_other_datastores_are_refused(
    layout, datastore, datastore_dir, slow_datastore_dir
):
    names = datastore.shard_names
    with serve(Datastore.open(datastore_dir, shards=names[:2]), datastore_dir) as overlapping, \
            RemoteRetriever([address(layout[0][0]), address(overlapping)]) as retriever:
        with pytest.raises(IncompatibleEndpoints, match="overlap"):
            retriever.info()
    with serve(Datastore.open(slow_datastore_dir), slow_datastore_dir) as other, \
            RemoteRetriever([address(layout[0][0]), address(other)]) as retriever:
        with pytest.raises(IncompatibleEndpoints, match="tokenizer_fingerprint"):
            retriever.info()


def test_a_killed_replica_fails_over_within_the_step(datastore_dir, datastore, documents):
    """SIGKILL: no health notice, the stream breaks; the same step's search goes to the other
    replica, and no search is lost."""
    servers = [ServerProcess("--datastore", str(datastore_dir)) for _ in range(2)]
    try:
        with RemoteRetriever([s.address for s in servers], deadline_s=5,
                             policy=PATIENT) as retriever, retriever.session() as session:
            contexts = random_contexts(documents, 30, seed=5)
            for context in contexts[:10]:
                assert tree(session.search(context, WIDE)) == tree(datastore.search(context, WIDE))
            used = max(servers, key=lambda s: attempts(retriever, s))
            other = next(s for s in servers if s is not used)
            used.kill()
            for context in contexts[10:]:
                assert tree(session.search(context, WIDE)) == tree(datastore.search(context, WIDE))
            assert session.failures == 0
            assert attempts(retriever, other) >= 20
            dead = retriever.stats()["endpoints"][used.address]
            assert dead["health"] != "serving" or dead["ejection"] != "serving"
    finally:
        for s in servers:
            s.kill()


def test_a_slow_replica_is_hedged_to_the_other(datastore, datastore_dir, documents):
    """The replica a search went to stalls: after the shard's recent p95 the search goes to the
    other replica too, whose answer wins long before the deadline."""
    slow = GatedDatastore(datastore)
    slow.gate.set()
    reader = InMemoryMetricReader()
    with serve(slow, datastore_dir) as a, serve(datastore, datastore_dir) as b, \
            RemoteRetriever([address(a), address(b)], deadline_s=10, policy=PATIENT,
                            meter_provider=MeterProvider(metric_readers=[reader])) as retriever, \
            retriever.session() as session:
        contexts = random_contexts(documents, 40, seed=9)
        for context in contexts[:30]:  # enough answers to know the shard's p95
            assert session.search(context, WIDE) is not None
        slow.gate.clear()
        # Make the stalled replica the cheaper one, so that the next search goes there first.
        endpoint(retriever, b).ewma._rtt = 10.0
        endpoint(retriever, a).ewma._rtt = 1e-6
        hedges_before = retriever.stats()["shards"]["shard-00000,shard-00001,shard-00002"]["hedges"]
        started = time.monotonic()
        context = contexts[30]
        assert tree(session.search(context, WIDE)) == tree(datastore.search(context, WIDE))
        assert time.monotonic() - started < 2.0  # not the stalled replica's 20 s, nor 10 s
        shard = retriever.stats()["shards"]["shard-00000,shard-00001,shard-00002"]
        assert shard["hedges"] == hedges_before + 1
        assert endpoint(retriever, b).counts["attempts_hedge"] >= 1
        slow.gate.set()
        hedges = metric_points(reader, "rest.retriever.client.attempts")
        assert any(attrs["kind"] == "hedge" and attrs["endpoint"] == address(b)
                   and attrs["shard"] == "shard-00000,shard-00001,shard-00002"
                   for attrs, _ in hedges)


def metric_points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict, float]]:
    data = reader.get_metrics_data()
    return [(dict(point.attributes), getattr(point, "value", None))
            for resource in data.resource_metrics for scope in resource.scope_metrics
            for metric in scope.metrics if metric.name == name
            for point in metric.data.data_points]


@pytest.mark.parametrize("name", [SERVICE_NAME, f"{SERVICE_NAME}/shard-00001"])
def test_replicas_not_serving_get_no_searches(datastore, datastore_dir, documents, name):
    """Health (A17): a replica NOT_SERVING, overall or for one of its shards, is passed over
    while another serves; it is used again once it serves."""
    with serve(datastore, datastore_dir) as a, serve(datastore, datastore_dir) as b, \
            RemoteRetriever([address(a), address(b)], deadline_s=5,
                            policy=PATIENT) as retriever, retriever.session() as session:
        assert session.search([1, 2], WIDE) is not None
        set_health(a, name, serving=False)
        assert wait_until(lambda: not endpoint(retriever, a).fully_serving)
        before = attempts(retriever, a)
        for context in random_contexts(documents, 20, seed=2):
            assert tree(session.search(context, WIDE)) == tree(datastore.search(context, WIDE))
        assert attempts(retriever, a) == before
        set_health(b, SERVICE_NAME, serving=False)
        assert wait_until(lambda: endpoint(retriever, b).health.value == "not_serving")
        if name == SERVICE_NAME:  # nobody serves: no search is sent, none waits
            started = time.monotonic()
            assert session.search([1, 2], WIDE) is None
            assert time.monotonic() - started < 0.1
        else:  # a replica with one shard out of service beats none
            assert session.search([1, 2], WIDE) is not None
        set_health(a, name, serving=True)
        assert wait_until(lambda: endpoint(retriever, a).fully_serving)
        assert tree(session.search([1, 2], WIDE)) == tree(datastore.search([1, 2], WIDE))


def test_a_stalled_server_costs_one_short_deadline_then_nothing_until_it_answers(
    datastore, datastore_dir, documents
):
    """A stalled server is given up after its shard's adaptive deadline (a multiple of recent
    latencies, not the retriever's 2 s); while it owes that answer no search waits for it, and
    repeated failures eject it (the breaker); once it answers it is used again."""
    gated = GatedDatastore(datastore)
    gated.gate.set()
    policy = ReplicaPolicy(owed_timeout_s=0.2,
                           ejection=EjectionPolicy(base_ejection_time_s=0.1,
                                                   max_ejection_time_s=0.2))
    with serve(gated, datastore_dir) as server, \
            RemoteRetriever(address(server), deadline_s=2.0, policy=policy) as retriever, \
            retriever.session() as session:
        contexts = random_contexts(documents, 60, seed=3)
        for context in contexts[:40]:
            session.search(context, WIDE)
        adaptive = retriever._pool.routing()[0].stats.deadline(2.0)
        assert adaptive < 2.0  # derived from the latencies seen, below the fixed deadline
        gated.gate.clear()
        stalled = []
        give_up_at = time.monotonic() + 1.5
        while time.monotonic() < give_up_at:
            started = time.monotonic()
            assert session.search(contexts[40], WIDE) is None
            stalled.append(time.monotonic() - started)
        assert stalled[0] < adaptive + 0.3, stalled[:3]  # not the 2 s deadline
        waited = [t for t in stalled if t > max(0.05, adaptive / 2)]  # not scheduling noise
        # One wait per owed-timeout (0.2 s) at most, until the breaker ejects it; the rest of the
        # searches had nothing to wait for.
        assert len(waited) <= 5 and len(stalled) > 10 * len(waited), (len(stalled), waited)
        assert endpoint(retriever, server).counts["ejections"] >= 1
        gated.gate.set()  # the server answers again: its late answers and probes find it
        assert wait_until(lambda: session.search(contexts[50], WIDE) is not None, 5.0)
        context = contexts[51]
        assert tree(session.search(context, WIDE)) == tree(datastore.search(context, WIDE))


def test_a_lost_shard_leaves_the_others(layout, datastore, documents, datastore_dir):
    """Every replica of a shard set gone: searches go on with the other sets (partial answers,
    counted), in about the time of a healthy one."""
    names = datastore.shard_names
    with serve(Datastore.open(datastore_dir, shards=names[1:]), datastore_dir) as doomed, \
            RemoteRetriever([address(layout[0][0]), address(doomed)], deadline_s=5,
                            policy=PATIENT) as retriever, retriever.session() as session:
        assert tree(session.search([1, 2], WIDE)) == tree(datastore.search([1, 2], WIDE))
        doomed.stop()
        first_shard = Datastore.open(datastore_dir, shards=names[:1])
        for context in random_contexts(documents, 20, seed=12):
            assert tree(session.search(context, WIDE)) == tree(first_shard.search(context, WIDE))
        assert session.failures == 0 and session.partial == 20


def test_a_name_with_several_addresses_is_several_replicas_resolved_again(
    datastore, datastore_dir
):
    servers = [serve(datastore, datastore_dir) for _ in range(3)]
    records = {"retrievers": [servers[0].port, servers[1].port]}

    def resolver(host, port):  # a headless Service: one address per pod (ports stand in here)
        return [("127.0.0.1", p) for p in records[host]]

    try:
        with RemoteRetriever("retrievers:50051", deadline_s=5, policy=PATIENT,
                             resolver=resolver) as retriever, retriever.session() as session:
            assert retriever.info() == datastore.info()
            assert sorted(retriever.stats()["endpoints"]) == sorted(map(address, servers[:2]))
            assert tree(session.search([1, 2], WIDE)) == tree(datastore.search([1, 2], WIDE))
            kept = endpoint(retriever, servers[1])
            records["retrievers"] = [servers[1].port, servers[2].port]  # a pod replaced
            retriever.refresh()
            assert wait_until(
                lambda: sorted(retriever.stats()["endpoints"]) == sorted(map(address, servers[1:])))
            assert endpoint(retriever, servers[1]) is kept  # its channel and statistics stay
            assert wait_until(lambda: len(retriever._pool.routing()[0].endpoints) == 2
                              and endpoint(retriever, servers[2]).fully_serving)
            for _ in range(5):
                assert tree(session.search([1, 2], WIDE)) == tree(datastore.search([1, 2], WIDE))
    finally:
        for s in servers:
            s.stop()


class CorruptRetriever(pb_grpc.RetrieverServicer):
    """A server whose answers break the contract, one way after another."""

    def __init__(self, answers):
        self.answers = answers

    async def Info(self, request, context):
        return pb.InfoResponse(format_version=1, vocab_size=VOCAB, n_tokens=10, n_docs=1,
                               tokenizer_name="test-tokenizer",
                               tokenizer_fingerprint="f" * 32, shards=["shard-00000"])

    async def SearchStream(self, request_iterator, context):
        i = 0
        async for _ in request_iterator:
            yield self.answers[i % len(self.answers)]
            i += 1


CORRUPT = [
    pb.SearchResponse(match_length=2, occurrences=3, tokens=[5, 6], parents=[-1, 7],
                      counts=[2, 1]),  # a parent that is no earlier node
    pb.SearchResponse(match_length=2, occurrences=3, tokens=[5, VOCAB + 3], parents=[-1, 0],
                      counts=[2, 1]),  # a token outside the vocabulary
    pb.SearchResponse(match_length=2, occurrences=3, tokens=[5, 6], parents=[-1, -1],
                      counts=[2, 2]),  # counts that add up to more than the occurrences
    pb.SearchResponse(match_length=2, occurrences=3, tokens=[5, 6], parents=[-1], counts=[2]),
    pb.SearchResponse(match_length=40, occurrences=3),  # a match longer than the context
]


@pytest.fixture
def corrupt_server():
    """On its own event loop, as ``BackgroundServer`` runs the real one."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server()
        pb_grpc.add_RetrieverServicer_to_server(CorruptRetriever(CORRUPT), server)
        health_servicer = HealthServicer()
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join()


def test_answers_that_break_the_contract_are_no_draft_and_counted(corrupt_server):
    tolerant = ReplicaPolicy(min_deadline_s=5.0,
                             ejection=EjectionPolicy(consecutive_failures=len(CORRUPT) + 1))
    with RemoteRetriever(corrupt_server, deadline_s=5, policy=tolerant) as retriever, \
            retriever.session() as session:
        for _ in CORRUPT:
            assert session.search([1, 2, 3], SearchParams()) is None  # never an exception
        assert session.invalid_answers == len(CORRUPT)
        assert retriever.stats()["endpoints"][corrupt_server]["failures_invalid"] == len(CORRUPT)


def test_a_corrupt_replica_fails_over_to_a_sound_one(corrupt_server, datastore, datastore_dir):
    one_shard = Datastore.open(datastore_dir, shards=datastore.shard_names[:1])
    with serve(one_shard, datastore_dir) as sound, \
            RemoteRetriever([corrupt_server, address(sound)], deadline_s=5,
                            policy=PATIENT) as retriever, retriever.session() as session:
        for _ in range(10):  # whichever replica it tries first, the answer is the sound one's
            assert tree(session.search([1, 2], WIDE)) == tree(one_shard.search([1, 2], WIDE))
        assert session.failures == 0


def test_concurrent_sessions_share_replicas_without_losing_answers(layout, datastore, documents):
    endpoints = [address(s) for replicas in layout for s in replicas]
    contexts = random_contexts(documents, 30, seed=8)
    wrong: list = []
    with RemoteRetriever(endpoints, deadline_s=5, policy=PATIENT) as retriever:
        def run() -> None:
            with retriever.session() as session:
                for context in contexts:
                    if tree(session.search(context, WIDE)) != tree(datastore.search(context, WIDE)):
                        wrong.append(context)
        threads = [threading.Thread(target=run) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(e["in_flight"] == 0 for e in retriever.stats()["endpoints"].values())
    assert wrong == []


# --- back-off levels: one round trip per step -----------------------------------------------------

def levels_tree(levels):
    return None if levels is None else [tree(level) for level in levels]


@pytest.mark.parametrize("levels", [1, 3])
def test_search_levels_equal_the_in_process_levels(layout, datastore, datastore_dir, documents,
                                                   levels):
    """Every level of every replica set in one request each, merged level by level: what the
    in-process retriever answers for the whole datastore."""
    params = SearchParams(min_span=1, max_span=12, budget=4096, max_depth=4)
    endpoints = [address(s) for replicas in layout for s in replicas]
    local = LocalRetriever(str(datastore_dir)).session()
    with RemoteRetriever(endpoints, deadline_s=5, policy=PATIENT) as retriever, \
            retriever.session() as session:
        for context in random_contexts(documents, 40, seed=40 + levels):
            assert levels_tree(session.search_levels(context, params, levels)) == levels_tree(
                local.search_levels(context, params, levels))
        assert session.failures == 0


def test_search_levels_is_one_request_per_replica_set(layout, datastore, documents):
    endpoints = [address(replicas[0]) for replicas in layout]
    params = SearchParams(min_span=1, max_span=12, budget=64, max_depth=4)
    with RemoteRetriever(endpoints, deadline_s=5, policy=PATIENT) as retriever, \
            retriever.session() as session:
        context = documents[3][:30]
        session.search_levels(context, params, 3)
        if any(e.levels_supported is False for e in retriever._pool._endpoints.values()):
            pytest.skip("this server answers one level per request (SearchRequest.levels is"
                        " not served yet): the client falls back to a search per level")
        before = sum(attempts(retriever, s) for s in (layout[0][0], layout[1][0]))
        for context in random_contexts(documents, 20, seed=6):
            assert session.search_levels(context, params, 3) is not None
        after = sum(attempts(retriever, s) for s in (layout[0][0], layout[1][0]))
        assert after - before == 2 * 20  # one request per replica set and step, all levels
