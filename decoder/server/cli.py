"""``decoder-server``: the command line, model loading and the HTTP server's life.

It binds its port first and prints ``decoder-server listening on HOST:PORT`` (``--port 0``
picks a free port), then loads the model on a thread while ``/health`` answers 503 ("loading");
``/health`` turns 200 when the model, the retriever and the decoder are ready. On SIGTERM it
drains: ``/health`` and new requests get 503 and the port stops accepting connections, requests
in flight finish (for at most ``--grace-s`` seconds), then it exits 0 (after SIGINT, 130).
A model that fails to load ends the process with one line and exit status 1.
"""

from __future__ import annotations

import logging
import signal
import socket
from typing import Any

import click

from decoder.cli import parse_budget, retriever_options
from decoder.config import AUTO, DecodingConfig
from decoder.errors import DecoderError
from decoder.server.metrics import ServerMetrics
from decoder.server.serving import ModelInfo, ServerState, build_app

log = logging.getLogger("decoder.server")
PROG = "decoder-server"


def context_limit(config: Any) -> int | None:
    """Prompt plus output tokens the model can take, from its config (None: it does not say)."""
    text = config.get_text_config(decoder=True)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length",
                 "n_ctx"):  # fmt: skip
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6), or one line saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]  # fmt: skip
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port "
            "or --host, or stop what is using it"
        ) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def make_loader(options: dict[str, Any], retriever: Any, served_name: str):
    """The model loader ``ServerState`` runs on its thread: model, generator, decoder."""

    def load():
        from decoder.generator import RestGenerator
        from decoder.model_support import load_model
        from decoder.batch import BatchDecoder

        log.info("loading %s on %s", options["model_path"], options["device"])
        model, tokenizer = load_model(options["model_path"], options["dtype"], options["device"],
                                      options["attn_implementation"])  # fmt: skip
        config = DecodingConfig(budget=options["budget"])
        generator = RestGenerator(model, tokenizer, retriever, config)
        if config.adaptive:
            # Measured before requests come: a calibration inside a step stalls the whole batch.
            log.info("calibrating verification cost per tree size and batch size")
            generator.costs.measure_up_to(options["max_batch"])
        decoder = BatchDecoder(generator, max_batch=options["max_batch"])
        log.info("batches of at most %d sequences", options["max_batch"])
        info = ModelInfo(served_name, tokenizer, generator.encode, context_limit(model.config))
        return decoder, info

    return load


def serve(options: dict[str, Any]) -> None:
    import uvicorn

    from rest.tokenizer import missing_local_path

    if missing_local_path(options["model_path"]):  # before the port is bound and a model loads
        raise click.ClickException(f"--model {options['model_path']}: no such directory")
    retriever = options["retriever_options"].open()
    served_name = options["served_model_name"] or options["model_path"]
    sock = bind(options["host"], options["port"])
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"{PROG} listening on {shown}:{port}")

    server: uvicorn.Server | None = None

    def stop_on_failure(exc: BaseException) -> None:
        log.error("%s", f"{type(exc).__name__}: {exc}")
        if server is not None:
            server.should_exit = True

    state = ServerState(
        make_loader(options, retriever, served_name), ServerMetrics(),
        max_in_flight=options["max_concurrent_requests"], on_failure=stop_on_failure,
    )  # fmt: skip

    class DrainingServer(uvicorn.Server):
        """Uvicorn's server, which also tells the app to refuse new requests at once."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            state.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        build_app(state), log_level=options["log_level"].lower(), lifespan="on",
        timeout_graceful_shutdown=options["grace_s"], access_log=options["access_log"],
    )  # fmt: skip
    server = DrainingServer(config)
    # Uvicorn raises the signal it caught again once it has shut down; with the default handler
    # that would end the process by SIGTERM after a clean drain. This one lets it exit 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        if retriever is not None and hasattr(retriever, "close"):
            retriever.close()
    if state.failure is not None:
        exc = state.failure
        if isinstance(exc, (DecoderError, ValueError, OSError)):
            raise click.ClickException(f"could not serve {options['model_path']}: {exc}")
        raise exc


@click.command(PROG)
@click.option("--model", "model_path", required=True, help="Model directory or hub id.")
@retriever_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="0 picks a free port.")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1),
              help="Sequences decoded together in one step.")
@click.option("--max-concurrent-requests", default=64, show_default=True,
              type=click.IntRange(min=1),
              help="Requests in flight (decoding or waiting); more get 429 at once.")
@click.option("--served-model-name", help="The model name clients use (default: --model).")
@click.option("--budget", default=AUTO, show_default=True, callback=parse_budget,
              help="Draft nodes verified per sequence and step, or 'auto'.")
@click.option("--attn-implementation", default="sdpa", show_default=True,
              type=click.Choice(["sdpa", "eager"]))
@click.option("--grace-s", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="On SIGTERM, how long requests in flight may take to finish.")
@click.option("--access-log/--no-access-log", default=False, show_default=True,
              help="Log every HTTP request.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def command(**options: Any) -> None:
    """An OpenAI-compatible server (/v1/completions, /v1/chat/completions) decoding with
    retrieval-based speculative decoding, many requests at once."""
    logging.basicConfig(level=options["log_level"].upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    serve(options)


def main() -> None:
    from rest.cli_errors import run

    run(command, PROG)
