"""Separate hosts on one machine: Linux network namespaces, veth pairs and a bridge.

    ns rest<pid>-sw (the switch: a bridge, br0, and one port per host)
      |- p0 ===veth=== eth0  ns rest<pid>-decoder   10.77.0.1
      |- p1 ===veth=== eth0  ns rest<pid>-r1        10.77.0.11   retriever replica
      |- p2 ===veth=== eth0  ns rest<pid>-r2        10.77.0.12   ...

Everything lives in namespaces named after this process: nothing is added to the root namespace
(the veth pairs are made inside the switch), so traffic stays inside them and their loopbacks.
Programs run as argv through ``ip netns exec`` (no ``setns`` in this process: gRPC's threads would
stay behind); readiness is polled (a listening socket, seen by ``ss -N``), never slept for.
Cleanup kills only the PIDs inside these namespaces (``ip netns pids``), TERM then KILL, and
deletes the namespaces.

Faults are context managers, each undone at the end of its block, with the mode in its name as
clients see them differently:
- ``cut(host)``: the host's switch port goes down. Blackhole: packets vanish, the peer's TCP only
  notices by its own deadline or keepalive.
- ``latency(host, ms)``: ``tc netem`` delay on the host's interface (every packet it sends is
  late), rebuilt with ``tc qdisc replace``, never stacked. Where the kernel has no netem
  (``CONFIG_NET_SCH_NETEM`` unset), a host started ``behind_relay`` gets the same one-way delay
  from a relay in its own namespace (``delay_relay.py``) that holds every chunk the server
  sends for that long.
- loss needs netem (``impair(host, Impairment(loss_percent=...))``).

Kill and restart are the process's own (``Process.kill``). The impairment parameters are checked
and turned into ``tc`` arguments by pure functions, testable without root (as mininet's
``TCIntf`` does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUBNET = "10.77.0"
PREFIX = 24


# --- impairments as tc arguments (pure) ---

@dataclass(frozen=True)
class Impairment:
    """What ``tc netem`` does to the packets a host sends."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_percent: float = 0.0
    seed: int | None = None  # netem's own random seed (kernel 5.16+), for repeatable loss

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must be >= 0")
        if self.jitter_ms and not self.delay_ms:
            raise ValueError("jitter needs a delay to vary around")
        if not 0 <= self.loss_percent <= 100:
            raise ValueError("loss_percent must be in 0..100")
        if not (self.delay_ms or self.loss_percent):
            raise ValueError("an impairment that does nothing: give a delay or a loss")


def netem_args(impairment: Impairment) -> list[str]:
    """The ``tc qdisc replace dev DEV root ...`` arguments for ``impairment``."""
    args = ["netem"]
    if impairment.delay_ms:
        args += ["delay", f"{impairment.delay_ms:g}ms"]
        if impairment.jitter_ms:
            args += [f"{impairment.jitter_ms:g}ms"]
    if impairment.loss_percent:
        args += ["loss", f"{impairment.loss_percent:g}%"]
    if impairment.seed is not None:
        args += ["seed", str(impairment.seed)]
    return args


# --- what the machine allows ---

@dataclass(frozen=True)
class Support:
    """Whether namespaces can be made here, and whether the kernel has netem."""

    missing: str | None  # why the tests cannot run, or None
    netem: bool


def probe_support() -> Support:
    if not sys.platform.startswith("linux"):
        return Support("network namespaces are Linux only", False)
    for tool in ("ip", "tc", "ss"):
        if shutil.which(tool) is None:
            return Support(f"`{tool}` not found: install iproute2", False)
    name = f"rest{os.getpid()}-probe"
    made = _quiet(["ip", "netns", "add", name])
    if made.returncode != 0:
        return Support(f"cannot create a network namespace (needs CAP_NET_ADMIN, i.e. root):"
                       f" {made.stderr.strip()}", False)
    try:
        _quiet(["ip", "-n", name, "link", "set", "lo", "up"])
        netem = _quiet(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root",
                        "netem", "delay", "1ms"]).returncode == 0
        veth = _quiet(["ip", "-n", name, "link", "add", "a0", "type", "veth", "peer", "name",
                       "b0"])
        if veth.returncode != 0:
            return Support(f"cannot create veth pairs: {veth.stderr.strip()}", netem)
        bridge = _quiet(["ip", "-n", name, "link", "add", "br0", "type", "bridge"])
        if bridge.returncode != 0:
            return Support(f"cannot create a bridge: {bridge.stderr.strip()}", netem)
    finally:
        _quiet(["ip", "netns", "del", name])
    return Support(None, netem)


def _unique(log_dir: Path, label: str) -> str:
    """``label``, or ``label-2``, ``label-3``... when a program of that name ran before."""
    candidate, n = label, 1
    while (log_dir / f"{candidate}.err").exists():
        n += 1
        candidate = f"{label}-{n}"
    return candidate


def _quiet(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def _run(argv: list[str]) -> str:
    done = _quiet(argv)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


# --- hosts, programs, faults ---

@dataclass
class Host:
    name: str  # its namespace
    address: str
    port_index: int  # its port on the switch: p<index>
    relay: Process | None = None  # the delay relay in front of its server, if any


class Process:
    """A program running in a host's namespace, its output in files (for the test report)."""

    def __init__(self, host: Host, argv: list[str], label: str, log_dir: Path,
                 env: dict | None = None) -> None:
        self.host = host
        label = _unique(log_dir, label)
        self.argv = argv
        self.label = label
        self.serving_port: int | None = None  # a server's port, once known
        self.stdout_path = log_dir / f"{label}.out"
        self.stderr_path = log_dir / f"{label}.err"
        self._stdout = open(self.stdout_path, "ab")
        self._stderr = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", host.name, *argv], cwd=ROOT, stdout=self._stdout,
            stderr=self._stderr, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )  # ``ip netns exec`` execs the program: this PID is the program's

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.proc.send_signal(signum)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no health notice; its sockets are reset by the kernel."""
        if self.alive():
            self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stdout.close()
        self._stderr.close()

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def errors(self) -> str:
        return self.stderr_path.read_text(errors="replace")


class Network:
    """The namespaces of one test; ``close()`` removes everything it made."""

    def __init__(self, log_dir: Path, netem: bool) -> None:
        self.tag = f"rest{os.getpid()}"
        self.log_dir = log_dir
        self.netem = netem
        self.hosts: dict[str, Host] = {}
        self.processes: list[Process] = []
        self.switch = f"{self.tag}-sw"
        self._made: list[str] = []
        self._etc: list[Path] = []
        self._made_etc_netns = False
        self._add_namespace(self.switch)
        _run(["ip", "-n", self.switch, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", "br0", "up"])

    def _add_namespace(self, name: str) -> None:
        _quiet(["ip", "netns", "del", name])  # a leftover of a crashed run with this PID
        _run(["ip", "netns", "add", name])
        self._made.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def host(self, role: str, number: int) -> Host:
        """A host with its own namespace and ``10.77.0.<number>``, plugged into the switch."""
        name = f"{self.tag}-{role}"
        index = len(self.hosts)
        self._add_namespace(name)
        port = f"p{index}"
        _run(["ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name",
              "eth0", "netns", name])
        _run(["ip", "-n", self.switch, "link", "set", port, "master", "br0", "up"])
        address = f"{SUBNET}.{number}"
        _run(["ip", "-n", name, "addr", "add", f"{address}/{PREFIX}", "dev", "eth0"])
        _run(["ip", "-n", name, "link", "set", "eth0", "up"])
        host = Host(name, address, index)
        self.hosts[role] = host
        self._wait(lambda: "state UP" in _run(["ip", "-n", name, "link", "show", "eth0"]),
                   f"{role}'s link to come up")
        return host

    def hosts_file(self, host: Host, names: dict[str, list[str]]) -> None:
        """``/etc/hosts`` as ``host``'s programs see it (``ip netns exec`` mounts
        ``/etc/netns/<namespace>/hosts`` over it): a name per list of addresses."""
        top = Path("/etc/netns")
        if not top.exists():
            top.mkdir()
            self._made_etc_netns = True
        folder = top / host.name
        folder.mkdir(exist_ok=True)
        self._etc.append(folder)
        lines = ["127.0.0.1 localhost"] + [f"{a} {n}" for n, addrs in names.items()
                                           for a in addrs]
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def run(self, host: Host, argv: list[str], label: str, env: dict | None = None) -> Process:
        process = Process(host, argv, label, self.log_dir, env)
        self.processes.append(process)
        return process

    def listening(self, host: Host, port: int) -> bool:
        out = _quiet(["ss", "-N", host.name, "-ltnH", f"sport = :{port}"]).stdout
        return bool(out.strip())

    def wait_listening(self, host: Host, port: int, process: Process | None = None,
                       timeout: float = 60.0) -> None:
        def ready() -> bool:
            if process is not None and not process.alive():
                raise RuntimeError(f"{process.label} exited: {process.errors()[-2000:]}")
            return self.listening(host, port)
        self._wait(ready, f"a listener on {host.address}:{port}", timeout)

    @staticmethod
    def _wait(predicate, what: str, timeout: float = 10.0, interval: float = 0.02) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for {what}")
            time.sleep(interval)

    # --- servers ---

    def start_retriever(self, host: Host, datastore: Path, shards: list[str], port: int = 50051,
                        label: str | None = None, behind_relay: bool = False,
                        wait: bool = True) -> Process:
        """``retriever-server`` on ``host``; ``behind_relay``: on loopback, reached through a
        delay relay on the host's address (see ``latency``), unless the kernel has netem.
        ``wait``: until it listens (else call ``wait_listening`` with ``serving_port``)."""
        relay = behind_relay and not self.netem
        listen_host, listen_port = ("127.0.0.1", port + 1) if relay else (host.address, port)
        argv = [sys.executable, "-m", "retriever_service.server", "--datastore", str(datastore),
                "--host", listen_host, "--port", str(listen_port), "--log-level", "WARNING",
                "--grace-s", "0"]
        for shard in shards:
            argv += ["--shard", shard]
        process = self.run(host, argv, label or f"retriever-{host.name}")
        if relay and host.relay is None:
            host.relay = self.run(host, [
                sys.executable, "-m", "tests.netns.delay_relay", "--listen",
                f"{host.address}:{port}", "--target", f"127.0.0.1:{listen_port}",
                "--delay-file", str(self._delay_file(host))], f"relay-{host.name}")
            self.wait_listening(host, port, host.relay)
        process.serving_port = listen_port
        if wait:
            self.wait_listening(host, listen_port, process)
        return process

    # --- faults ---

    @contextlib.contextmanager
    def cut(self, host: Host):
        """Blackhole: the host's switch port is down for the block."""
        port = f"p{host.port_index}"
        _run(["ip", "-n", self.switch, "link", "set", port, "down"])
        try:
            yield
        finally:
            _run(["ip", "-n", self.switch, "link", "set", port, "up"])
            self._wait(lambda: "state UP" in _run(["ip", "-n", host.name, "link", "show",
                                                   "eth0"]), "the link to come back")

    @contextlib.contextmanager
    def impair(self, host: Host, impairment: Impairment):
        """``tc netem`` on what ``host`` sends, for the block (needs a kernel with netem)."""
        if not self.netem:
            raise RuntimeError("this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM)")
        _run(["ip", "netns", "exec", host.name, "tc", "qdisc", "replace", "dev", "eth0", "root",
              *netem_args(impairment)])
        try:
            yield
        finally:
            _run(["ip", "netns", "exec", host.name, "tc", "qdisc", "del", "dev", "eth0", "root"])

    @contextlib.contextmanager
    def latency(self, host: Host, delay_ms: float):
        """Every answer ``host`` sends is ``delay_ms`` late, for the block: netem where the kernel
        has it, else the relay in front of a server started ``behind_relay``."""
        if self.netem:
            with self.impair(host, Impairment(delay_ms=delay_ms)):
                yield
            return
        if host.relay is None:
            raise RuntimeError(f"no netem here, and {host.name}'s server has no relay in front"
                               " (start it with behind_relay=True)")
        self._delay_file(host).write_text(f"{delay_ms}\n")
        host.relay.signal(signal.SIGUSR1)
        try:
            yield
        finally:
            host.relay.signal(signal.SIGUSR2)

    def _delay_file(self, host: Host) -> Path:
        return self.log_dir / f"delay-{host.name}"

    # --- cleanup ---

    def close(self) -> dict[str, str]:
        """Stop every program, delete the namespaces; returns each program's stderr."""
        reports = {}
        for process in self.processes:
            process.stop()
            reports[process.label] = process.errors()
        for name in reversed(self._made):
            # Anything still running in our namespaces was started by this test: only those.
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = [int(p) for p in _quiet(["ip", "netns", "pids", name]).stdout.split()]
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                if pids and sig == signal.SIGTERM:
                    with contextlib.suppress(TimeoutError):
                        self._wait(lambda: not _quiet(["ip", "netns", "pids", name]).stdout
                                   .strip(), "programs to exit", timeout=5)
            _quiet(["ip", "netns", "del", name])
        for folder in self._etc:
            shutil.rmtree(folder, ignore_errors=True)
        if self._made_etc_netns:
            with contextlib.suppress(OSError):
                Path("/etc/netns").rmdir()  # made here; only when empty
        return reports
