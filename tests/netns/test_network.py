"""The impairment helpers: checked parameters and the ``tc netem`` arguments they become (no
root needed); and, where namespaces can be made, a network that cleans up after itself."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.netns.network import Impairment, netem_args


@pytest.mark.parametrize("impairment, args", [
    (Impairment(delay_ms=20), ["netem", "delay", "20ms"]),
    (Impairment(delay_ms=20, jitter_ms=2.5), ["netem", "delay", "20ms", "2.5ms"]),
    (Impairment(loss_percent=1, seed=7), ["netem", "loss", "1%", "seed", "7"]),
    (Impairment(delay_ms=5, loss_percent=0.5), ["netem", "delay", "5ms", "loss", "0.5%"]),
])
def test_netem_arguments(impairment, args):
    assert netem_args(impairment) == args


@pytest.mark.parametrize("kwargs, message", [
    ({}, "does nothing"),
    ({"delay_ms": -1}, ">= 0"),
    ({"jitter_ms": 3}, "needs a delay"),
    ({"loss_percent": 101}, "0..100"),
])
def test_impairments_that_make_no_sense_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Impairment(**kwargs)


def connects(net, source, address: str, port: int, timeout: float) -> bool:
    probe = subprocess.run(
        ["ip", "netns", "exec", source.name, sys.executable, "-c",
         f"import socket; socket.create_connection(({address!r}, {port}), timeout={timeout})"],
        capture_output=True, text=True)
    return probe.returncode == 0


@pytest.mark.netns
def test_a_network_connects_its_hosts_cuts_a_link_and_cleans_up(net):
    a, b = net.host("a", 2), net.host("b", 3)
    listener = net.run(b, [sys.executable, "-c",
                           "import socket, time; s = socket.socket();"
                           f" s.bind(({b.address!r}, 7000)); s.listen(); time.sleep(60)"],
                       "listener")
    net.wait_listening(b, 7000, listener)
    assert connects(net, a, b.address, 7000, timeout=5)
    with net.cut(b):
        assert not connects(net, a, b.address, 7000, timeout=1)  # blackholed: a timeout
    assert connects(net, a, b.address, 7000, timeout=5)
    names = [a.name, b.name, net.switch]
    net.close()
    assert not listener.alive()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
