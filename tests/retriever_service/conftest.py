"""Fixtures for the retrieval-service tests: small real datastores and subprocess servers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from rest.datastore import Datastore, build_datastore
from tests.retriever_service.service_testing import (
    SHARD_TOKENS,
    VOCAB,
    ServerProcess,
    random_documents,
    write_certs_with_cryptography,
    write_certs_with_openssl,
)


@pytest.fixture(scope="session")
def documents() -> list[list[int]]:
    return random_documents(seed=1234)


@pytest.fixture(scope="session")
def datastore_dir(tmp_path_factory, documents) -> Path:
    path = tmp_path_factory.mktemp("datastore") / "ds"
    build_datastore(path, documents, vocab_size=VOCAB, tokenizer_name="test-tokenizer",
                    tokenizer_fingerprint="f" * 32, shard_tokens=SHARD_TOKENS)
    return path


@pytest.fixture(scope="session")
def datastore(datastore_dir) -> Datastore:
    ds = Datastore.open(datastore_dir)
    assert len(ds.shard_names) >= 3, "the tests want several shards"
    return ds


@pytest.fixture(scope="session")
def slow_datastore_dir(tmp_path_factory) -> Path:
    """6,000 documents that start with [0, 0, 0] and go on with distinct tokens: the REST
    policy's search of [0, 0] counts 5,000 continuations 256 tokens deep, through distinct
    prefixes, and takes a while (about 0.1-0.2 s on an idle machine)."""
    path = tmp_path_factory.mktemp("slow") / "ds"
    rng = np.random.default_rng(5)
    docs = [[0, 0, 0, *rng.integers(1, 60_000, size=258).tolist()] for _ in range(6000)]
    build_datastore(path, docs, vocab_size=60_000, tokenizer_name="test-tokenizer",
                    tokenizer_fingerprint="s" * 32)
    return path


@pytest.fixture
def server_process():
    """Start subprocess servers with ``server_process(*args)``; all are killed at teardown."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        server = ServerProcess(*args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    """A test CA, a server certificate for 127.0.0.1, and a client certificate."""
    out = tmp_path_factory.mktemp("certs")
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("needs the cryptography package or the openssl command")
        write_certs_with_openssl(out)
    else:
        write_certs_with_cryptography(out)
    return out
