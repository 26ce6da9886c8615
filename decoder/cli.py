"""``rest generate`` and ``rest chat``: click commands (attached to the ``rest`` group elsewhere).

Generated text goes to stdout, statistics to stderr (or everything to stdout with ``--json``).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from decoder.config import AUTO, DecodingConfig
from decoder.errors import DecoderError
from decoder.generator import GenerationStats, RestGenerator
from decoder.model_support import load_model


def parse_budget(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
    if value == AUTO:
        return AUTO
    try:
        budget = int(value)
    except ValueError:
        budget = -1
    if budget < 0:
        raise click.BadParameter(
            f"expected a number of draft nodes (>= 0) or 'auto', got {value!r}"
        )
    return budget


RETRIEVER_ENV = "REST_RETRIEVER"
RETRIEVER_TOKEN_ENV = "REST_RETRIEVER_TOKEN"
RETRIEVER_OPTION_NAMES = ("datastore", "endpoints", "token", "tls_ca", "tls_cert", "tls_key",
                          "tls_server_name")  # fmt: skip


def retriever_options(command: Callable) -> Callable:
    """Where drafts come from, the same in every command that decodes (``rest generate``,
    ``rest chat``, ``rest bench``, ``decoder-server``): ``--datastore DIR`` in-process, or
    ``--retriever HOST:PORT,...`` (default ``$REST_RETRIEVER``) with the service's bearer token
    (default ``$REST_RETRIEVER_TOKEN``) and TLS files. ``open_retriever(**options)`` takes the
    parameters it adds (``RETRIEVER_OPTION_NAMES``)."""
    file = click.Path(exists=True, dir_okay=False)
    options = [
        click.option("--datastore", type=click.Path(exists=True, file_okay=False),
                     help="Datastore directory, searched in-process."),
        click.option("--retriever", "endpoints", metavar="HOST:PORT[,HOST:PORT]",
                     envvar=RETRIEVER_ENV, show_envvar=True,
                     help="Retrieval service endpoints (retriever-server)."),
        click.option("--token", envvar=RETRIEVER_TOKEN_ENV, show_envvar=True,
                     help="Bearer token the retrieval service requires."),
        click.option("--tls-ca", type=file,
                     help="CA certificate that signed the retrieval service's (turns TLS on)."),
        click.option("--tls-cert", type=file, help="Client certificate, for mutual TLS."),
        click.option("--tls-key", type=file, help="Client private key, for mutual TLS."),
        click.option("--tls-server-name",
                     help="Name to check the service's certificate against, when it differs "
                          "from the endpoint's host."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def common_options(command: Callable) -> Callable:
    """The options ``generate`` and ``chat`` share: model, draft sources, sampling."""
    options = [
        click.option("--model", "model_path", required=True, help="Model directory or hub id."),
        retriever_options,
        click.option("--max-new-tokens", default=128, show_default=True,
                     type=click.IntRange(min=1)),
        click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
                     help="0 decodes greedily."),
        click.option("--top-p", default=1.0, show_default=True,
                     type=click.FloatRange(0, 1, min_open=True)),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
                     help="0 keeps every token."),
        click.option("--seed", type=int, help="Makes sampling repeatable."),
        click.option("--budget", default=AUTO, show_default=True, callback=parse_budget,
                     help="Draft nodes verified per step, or 'auto'."),
        click.option("--stop", multiple=True, help="A string that ends the output (repeatable)."),
        click.option("--no-context-drafts", is_flag=True,
                     help="Do not draft from the prompt and output themselves."),
        click.option("--plain", is_flag=True, help="No drafts: plain autoregressive decoding."),
        click.option("--allow-tokenizer-mismatch", is_flag=True,
                     help="Use a datastore built with another tokenizer anyway."),
        click.option("--dtype", default="auto", show_default=True,
                     type=click.Choice(["auto", "float32", "bfloat16", "float16"])),
        click.option("--device", default="cpu", show_default=True),
        click.option("--attn-implementation", default="sdpa", show_default=True,
                     type=click.Choice(["sdpa", "eager"])),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def reports_errors(command: Callable) -> Callable:
    """Decoder errors end the command with their message (which says what to do), no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (DecoderError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def open_retriever(
    datastore: str | None = None,
    endpoints: str | None = None,
    token: str | None = None,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_server_name: str | None = None,
) -> Any:
    """The retriever ``retriever_options`` describe, or None when they name none. An explicit
    ``--datastore`` wins over an endpoint list that came from ``$REST_RETRIEVER``."""
    if datastore and endpoints:
        ctx = click.get_current_context(silent=True)
        from_env = ctx is not None and ctx.get_parameter_source("endpoints") in (
            click.core.ParameterSource.ENVIRONMENT, click.core.ParameterSource.DEFAULT_MAP
        )
        if not from_env:
            raise click.UsageError("use --datastore or --retriever, not both")
        endpoints = None
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("mutual TLS needs both --tls-cert and --tls-key")
    try:
        if datastore:
            from rest.retriever import LocalRetriever

            return LocalRetriever(datastore)
        if endpoints:
            from retriever_service.client import RemoteRetriever

            # A server name to check only means something under TLS (with the system's roots
            # when no --tls-ca is given).
            return RemoteRetriever(
                [e.strip() for e in endpoints.split(",") if e.strip()], token=token,
                tls=bool(tls_server_name), tls_ca_file=tls_ca, tls_cert_file=tls_cert,
                tls_key_file=tls_key, tls_server_name=tls_server_name,
            )  # fmt: skip
    except ImportError as exc:
        raise click.ClickException(
            f"retrieval is not available in this installation ({exc}); "
            "run without --datastore/--retriever to draft from the context only"
        ) from exc
    return None


def build_generator(options: dict[str, Any]) -> RestGenerator:
    model, tokenizer = load_model(
        options["model_path"], options["dtype"], options["device"], options["attn_implementation"]
    )
    config = DecodingConfig(
        budget=options["budget"],
        context_drafts=not options["no_context_drafts"],
        allow_tokenizer_mismatch=options["allow_tokenizer_mismatch"],
    )
    retriever = None
    if not options["plain"]:
        retriever = open_retriever(**{name: options[name] for name in RETRIEVER_OPTION_NAMES})
    return RestGenerator(model, tokenizer, retriever, config)


def sampling_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    keys = ("temperature", "top_p", "top_k", "seed", "plain")
    return {key: options[key] for key in keys} | {"stop": list(options["stop"])}


def format_stats(stats: GenerationStats) -> str:
    return (
        f"{stats.new_tokens} tokens in {stats.steps} steps (M = {stats.mean_accepted:.2f}), "
        f"{stats.tokens_per_s:.1f} tokens/s; retrieval {stats.retrieval_s * 1e3:.1f} ms, "
        f"verification {stats.verification_s * 1e3:.1f} ms, prefill {stats.prefill_s * 1e3:.1f} ms"
        + (f", {stats.retrieval_failures} failed retrievals" if stats.retrieval_failures else "")
    )


@click.command("generate")
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--json", "as_json", is_flag=True, help="Print text, tokens and statistics as JSON.")
@common_options
@reports_errors
def generate(prompt: str, as_json: bool, **options: Any) -> None:
    """Continue a prompt with retrieval-based speculative decoding (lossless)."""
    generator = build_generator(options)
    stream = generator.stream(prompt, options["max_new_tokens"], **sampling_kwargs(options))
    for chunk in stream:
        if not as_json:
            click.echo(chunk.text, nl=False)
            sys.stdout.flush()
    result = stream.result
    assert result is not None
    if as_json:
        click.echo(json.dumps({
            "text": result.text,
            "tokens": result.tokens,
            "finish_reason": result.finish_reason,
            "stats": result.stats.as_dict(),
        }))  # fmt: skip
    else:
        click.echo()
        click.echo(format_stats(result.stats), err=True)


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The model's chat template when it has one, else a plain transcript."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return tokenizer("\n".join(lines) + "\nAssistant:")["input_ids"]


@click.command("chat")
@click.option("--show-stats/--no-show-stats", default=True, help="Statistics after each answer.")
@common_options
@reports_errors
def chat(show_stats: bool, **options: Any) -> None:
    """Talk with a model, answers streamed as they are verified. /exit or end of input quits."""
    generator = build_generator(options)
    messages: list[dict[str, str]] = []
    while True:
        click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = chat_prompt(generator.tokenizer, messages)
        stream = generator.stream(ids, options["max_new_tokens"], **sampling_kwargs(options))
        for chunk in stream:
            click.echo(chunk.text, nl=False)
            sys.stdout.flush()
        click.echo()
        assert stream.result is not None
        messages.append({"role": "assistant", "content": stream.result.text})
        if show_stats:
            click.echo(format_stats(stream.result.stats), err=True)
