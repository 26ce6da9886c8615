"""``decoder-server`` as a child process on loopback, for benchmarks and tests.

It listens on 127.0.0.1 with a port the OS picks; ``url`` is known once the port is bound and
``wait_ready`` waits until ``/health`` says the model is loaded. Its stderr goes to a file.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """``python -m decoder.server --host 127.0.0.1 --port 0 ARGS``; ``ready_timeout`` seconds
    for the model to load (0: do not wait)."""

    def __init__(self, *args: str, log_path: Path, env: dict | None = None,
                 ready_timeout: float = 120.0) -> None:  # fmt: skip
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "decoder.server", "--host", "127.0.0.1", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )  # fmt: skip
        line = self.proc.stdout.readline()  # blocks until the port is bound (or the end)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match is None:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(f"decoder-server did not start: {line!r} {self.log()}")
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        if ready_timeout:
            self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"decoder-server exited with {self.proc.returncode}: "
                                   f"{self.log()}")  # fmt: skip
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"decoder-server not ready after {timeout:.0f} s: {self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()
