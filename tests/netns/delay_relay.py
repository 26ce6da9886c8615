"""A TCP relay that delays what a server sends, for hosts whose kernel has no netem.

    python -m tests.netns.delay_relay --listen 10.77.0.12:50051 --target 127.0.0.1:50052 \
        --delay-file /tmp/.../delay-host

Runs in the server's own namespace, on the server's address: every byte the server sends is held
for the delay before it goes out (what ``tc netem delay`` does to the packets the host sends);
what the client sends passes at once. SIGUSR1 reads the delay (milliseconds) from the delay file,
SIGUSR2 sets it back to 0. Order is kept: chunks leave in the order they came, each at its own
time plus the delay.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

CHUNK = 1 << 16


class Relay:
    def __init__(self, target: tuple[str, int], delay_file: Path) -> None:
        self.target = target
        self.delay_file = delay_file
        self.delay_s = 0.0

    def read_delay(self) -> None:
        self.delay_s = float(self.delay_file.read_text().strip()) / 1000.0

    async def handle(self, client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(
            self.pipe(client_reader, server_writer, delayed=False),
            self.pipe(server_reader, client_writer, delayed=True),
            return_exceptions=True,
        )

    async def pipe(self, reader, writer, delayed: bool) -> None:
        loop = asyncio.get_running_loop()
        due: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while (item := await due.get()) is not None:
                at, data = item
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(CHUNK):
                await due.put((loop.time() + (self.delay_s if delayed else 0.0), data))
        except OSError:
            pass
        await due.put(None)
        await sender


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay-file", type=Path, required=True)
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    target_host, target_port = args.target.rsplit(":", 1)
    relay = Relay((target_host, int(target_port)), args.delay_file)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, relay.read_delay)
    loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(relay, "delay_s", 0.0))
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(relay.handle, host, int(port))
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
