"""Endpoints: parsing, names resolved to one endpoint per address, changes as added/removed."""

from __future__ import annotations

import socket

import pytest

from retriever_service.discovery import Discovery, parse_target, parse_targets, system_resolver


@pytest.mark.parametrize("text, host, port", [
    ("10.0.0.5:50051", "10.0.0.5", 50051),
    ("retriever-0.retriever:50051", "retriever-0.retriever", 50051),
    ("[::1]:7", "::1", 7),
    ("dns:///retriever:50051", "retriever", 50051),
    (" localhost:1 ", "localhost", 1),
])
def test_parse_host_and_port(text, host, port):
    target = parse_target(text)
    assert (target.host, target.port, target.raw) == (host, port, False)


def test_ip_literals_are_not_resolved_and_raw_targets_pass_through():
    assert not parse_target("10.0.0.5:1").is_name
    assert not parse_target("[::1]:1").is_name
    assert parse_target("example.test:1").is_name
    raw = parse_target("unix:/run/retriever.sock")
    assert raw.raw and not raw.is_name
    assert [a.dial for a in Discovery([raw]).addresses()] == ["unix:/run/retriever.sock"]


@pytest.mark.parametrize("text, message", [
    ("", "empty endpoint"),
    ("retriever", "expected host:port"),
    ("::1:50051", "IPv6"),
    ("host:0", "1..65535"),
    ("host:99999", "1..65535"),
    ("host:http", "1..65535"),
    (":50051", "no host"),
    ("[::1]50051", r"\[address\]:port"),
])
def test_bad_endpoints_say_what_is_expected(text, message):
    with pytest.raises(ValueError, match=message):
        parse_target(text)


def test_a_comma_separated_string_is_several_endpoints():
    assert [t.text for t in parse_targets("a:1, b:2,,")] == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="at least one endpoint"):
        parse_targets([])


class FakeDns:
    def __init__(self, records):
        self.records = records
        self.calls = 0

    def __call__(self, host, port):
        self.calls += 1
        if host not in self.records:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(address, port) for address in self.records[host]]


def test_a_name_is_one_endpoint_per_address_resolved_again_as_pods_come_and_go():
    dns = FakeDns({"retrievers": ["10.0.0.1", "10.0.0.2"]})
    discovery = Discovery(parse_targets(["retrievers:50051", "10.9.9.9:1"]), dns)
    assert [a.dial for a in discovery.addresses()] == ["10.9.9.9:1"]  # names: not yet resolved
    added, removed = discovery.resolve()
    assert [a.dial for a in added] == ["10.0.0.1:50051", "10.0.0.2:50051"] and removed == []
    assert {a.target.host for a in added} == {"retrievers"}  # the TLS name of each address
    dns.records["retrievers"] = ["10.0.0.2", "10.0.0.3", "fd00::4"]
    added, removed = discovery.resolve()
    assert [a.dial for a in added] == ["10.0.0.3:50051", "[fd00::4]:50051"]
    assert [a.dial for a in removed] == ["10.0.0.1:50051"]
    assert discovery.resolve() == ([], [])


def test_a_failed_resolution_keeps_what_was_known():
    dns = FakeDns({"retrievers": ["10.0.0.1"]})
    discovery = Discovery(parse_targets("retrievers:50051"), dns)
    discovery.resolve()
    del dns.records["retrievers"]
    assert discovery.resolve() == ([], [])  # DNS down must not empty the pool
    assert [a.dial for a in discovery.addresses()] == ["10.0.0.1:50051"]
    assert "Name or service not known" in next(iter(discovery.errors.values()))


def test_the_system_resolver_resolves_localhost():
    addresses = system_resolver("localhost", 50051)
    assert ("127.0.0.1", 50051) in addresses
    assert len(addresses) == len(set(addresses))
