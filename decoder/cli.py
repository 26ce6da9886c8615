"""``rest generate`` and ``rest chat`` (click commands attached to the ``rest`` group elsewhere),
and the retriever options every command that decodes shares (``retriever_options``).

Generated text goes to stdout, statistics to stderr (or everything to stdout with ``--json``).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from decoder.config import AUTO, DecodingConfig
from decoder.errors import DecoderError
from decoder.generator import GenerationStats, RestGenerator
from decoder.tracing import otel_from_env
from decoder.model_support import load_model

RETRIEVER_ENV = "REST_RETRIEVER"
TOKEN_ENV = "REST_RETRIEVER_TOKEN"
PEM_MARKER = b"-----BEGIN "


# ----------------------------------------------------------------------------------------------
# Where drafts come from: one set of options for rest generate, chat, bench and decoder-server


@dataclass(frozen=True)
class RetrieverOptions:
    """What the retriever options say: a datastore opened in-process, or ``retriever-server``
    endpoints with their credentials, or neither (drafts from the context only)."""

    datastore: str | None = None
    endpoints: tuple[str, ...] = ()
    token: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None

    @property
    def uses_tls(self) -> bool:
        return self.tls or any((self.tls_ca, self.tls_cert, self.tls_key, self.tls_server_name))

    def check_tls_files(self) -> None:
        for option, file in (("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            if file:
                check_pem(option, file)

    def open(self, deadline_s: float = 0.1) -> Any:
        """A ``rest.retriever.Retriever``, or None when no retriever was asked for. Errors a user
        can fix end as ``click.ClickException``."""
        try:
            if self.datastore:
                return _open_local(self.datastore)
            if self.endpoints:
                self.check_tls_files()
                from retriever_service.client import RemoteRetriever

                return RemoteRetriever(
                    list(self.endpoints), deadline_s=deadline_s, token=self.token, tls=self.uses_tls,
                    tls_ca_file=self.tls_ca, tls_cert_file=self.tls_cert, tls_key_file=self.tls_key,
                    tls_server_name=self.tls_server_name,
                )  # fmt: skip
        except ImportError as exc:
            raise click.ClickException(
                f"retrieval is not available in this installation ({exc}); "
                "run without --datastore/--retriever to draft from the context only"
            ) from exc
        return None


def _open_local(path: str) -> Any:
    from rest.datastore import DatastoreError
    from rest.retriever import LocalRetriever

    try:
        return LocalRetriever(path)
    except DatastoreError as exc:
        raise click.ClickException(
            f"cannot open the datastore: {exc}; if it is damaged, build it again (rest datastore build --overwrite)"
        ) from exc


def check_pem(option: str, path: str) -> None:
    """A TLS file that is not PEM would only fail later, at the handshake, with a vaguer message."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise click.ClickException(f"{option} {path}: cannot read it ({exc.strerror})") from exc
    if PEM_MARKER not in data:
        kind = "private key" if option == "--tls-key" else "certificate"
        raise click.ClickException(
            f"{option} {path} is not a PEM file (no '-----BEGIN' line): give the {kind} in PEM form"
        )


def parse_endpoints(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    endpoints = tuple(e.strip() for e in value.split(",") if e.strip())
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise click.BadParameter(
                f"expected HOST:PORT[,HOST:PORT...] with ports 1-65535, got {endpoint!r}",
                param_hint="--retriever",
            )
    if not endpoints:
        raise click.BadParameter("is empty: give HOST:PORT[,HOST:PORT...]", param_hint="--retriever")
    return endpoints


def _from_environment(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) == click.core.ParameterSource.ENVIRONMENT


def retriever_options(command: Callable) -> Callable:
    """Adds ``--datastore``, ``--retriever`` (default ``$REST_RETRIEVER``), ``--token`` (default
    ``$REST_RETRIEVER_TOKEN``), ``--tls``, ``--tls-ca``, ``--tls-cert``, ``--tls-key`` and
    ``--tls-server-name`` to a click command, checked and passed to it as one
    ``retriever_options: RetrieverOptions`` argument (``.open()`` makes the retriever)."""
    file = click.Path(exists=True, dir_okay=False)
    options = [
        click.option("--datastore", type=click.Path(exists=True, file_okay=False),
                     help="Datastore directory, searched in-process."),
        click.option("--retriever", "endpoints", envvar=RETRIEVER_ENV, metavar="HOST:PORT[,HOST:PORT]",
                     help=f"retriever-server endpoints (default: ${RETRIEVER_ENV}); several serve "
                          "the shards of one datastore."),
        click.option("--token", envvar=TOKEN_ENV, default=None,
                     help=f"Bearer token the retriever requires (default: ${TOKEN_ENV}, which keeps "
                          "it out of the process list)."),
        click.option("--tls", is_flag=True, help="TLS to the retriever, trusting the system's CAs."),
        click.option("--tls-ca", type=file, help="CA certificate (PEM) that signed the retriever's; turns TLS on."),
        click.option("--tls-cert", type=file, help="Client certificate (PEM) for mutual TLS, with --tls-key."),
        click.option("--tls-key", type=file, help="Private key (PEM) of --tls-cert."),
        click.option("--tls-server-name", metavar="NAME",
                     help="The name the retriever's certificate is for, when not the endpoint's host."),
    ]  # fmt: skip

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        datastore, endpoint_text = kwargs.pop("datastore"), kwargs.pop("endpoints")
        token = kwargs.pop("token")
        tls = {name: kwargs.pop(name) for name in ("tls", "tls_ca", "tls_cert", "tls_key", "tls_server_name")}
        if datastore and endpoint_text is not None:
            if not _from_environment(ctx, "endpoints"):
                raise click.UsageError("use --datastore or --retriever, not both")
            endpoint_text = None  # an explicit --datastore beats $REST_RETRIEVER
        if bool(tls["tls_cert"]) != bool(tls["tls_key"]):
            raise click.UsageError("--tls-cert and --tls-key go together (mutual TLS)")
        endpoints = parse_endpoints(endpoint_text)
        # click reads an empty variable as unset: resolve_token reads it itself, so that an empty
        # secret is an error rather than a retriever without authentication.
        from_environment = token is None or _from_environment(ctx, "token")
        if endpoints:
            from retriever_service.auth import resolve_token  # grpc loads only for a retriever

            try:
                token = resolve_token(None if from_environment else token)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--token") from None
        else:
            given = [f"--{n.replace('_', '-')}" for n, v in tls.items() if v]
            if not from_environment:
                given.insert(0, "--token")
            if given:
                raise click.UsageError(f"{', '.join(given)}: only for --retriever")
            token = None  # $REST_RETRIEVER_TOKEN without a retriever: nothing to authenticate to
        options = RetrieverOptions(datastore, endpoints, token, **tls)
        options.check_tls_files()  # before a model loads for minutes
        kwargs["retriever_options"] = options
        return command(*args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


# ----------------------------------------------------------------------------------------------
# Model and decoding options


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


# Generation settings: GenerationConfig attributes, passed only when given, so that the model's own
# generation config (generation_config.json) decides the rest, as in model.generate.
GENERATION_OPTIONS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p",
                      "typical_p", "repetition_penalty", "no_repeat_ngram_size", "seed")  # fmt: skip


def generation_options(command: Callable) -> Callable:
    """The ``GenerationConfig`` settings a user may give; unset ones come from the model."""
    unit = click.FloatRange(0, 1, min_open=True)
    options = [
        click.option("--max-new-tokens", type=click.IntRange(min=1),
                     help="Most tokens to generate (default: the model's generation config, else 128)."),
        click.option("--min-new-tokens", type=click.IntRange(min=0), help="No EOS before this many tokens."),
        click.option("--do-sample/--greedy", "do_sample", default=None,
                     help="Sample, or take the most likely token (default: the model's generation config; "
                          "a --temperature above 0 samples)."),
        click.option("--temperature", type=click.FloatRange(min=0), help="0 decodes greedily."),
        click.option("--top-p", type=unit, help="Nucleus sampling: the smallest set of tokens with this mass."),
        click.option("--top-k", type=click.IntRange(min=0), help="Sample among the k most likely tokens (0: all)."),
        click.option("--min-p", type=unit, help="Drop tokens less likely than this fraction of the most likely."),
        click.option("--typical-p", type=unit, help="Locally typical sampling mass."),
        click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True),
                     help="Divide the scores of tokens already in the context (1: none)."),
        click.option("--no-repeat-ngram-size", type=click.IntRange(min=1), help="Never repeat an n-gram of this size."),
        click.option("--seed", type=int, help="Makes sampling repeatable."),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


def common_options(command: Callable) -> Callable:
    """The options ``generate`` and ``chat`` share: model, draft sources, sampling."""
    options = [
        click.option("--model", "model_path", required=True, help="Model directory or hub id."),
        retriever_options,
        click.option("--require-retriever", is_flag=True,
                     help="Fail when the retriever cannot be reached, instead of decoding with plain steps."),
        generation_options,
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
        from rest.retriever import RetrieverUnavailable

        try:
            return command(*args, **kwargs)
        except (DecoderError, ValueError, RetrieverUnavailable) as exc:
            raise click.ClickException(str(exc)) from exc

    return wrapper


def load_model_for_cli(options: dict[str, Any]) -> tuple[Any, Any]:
    from rest.tokenizer import missing_local_path

    if missing_local_path(options["model_path"]):
        raise click.ClickException(f"model {options['model_path']} does not exist: give a model directory or a hub id")
    try:
        return load_model(options["model_path"], options["dtype"], options["device"], options["attn_implementation"])
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.ClickException(
            f"cannot load the model {options['model_path']!r} ({first}); give a model directory or a hub id"
        ) from exc


def build_generator(options: dict[str, Any]) -> RestGenerator:
    model, tokenizer = load_model_for_cli(options)
    config = DecodingConfig(
        budget=options["budget"],
        context_drafts=not options["no_context_drafts"],
        allow_tokenizer_mismatch=options["allow_tokenizer_mismatch"],
        require_retriever=options["require_retriever"],
    )
    retriever = None
    if not options["plain"]:
        retriever = options["retriever_options"].open()
    return RestGenerator(model, tokenizer, retriever, config)


def generation_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """``RestGenerator.generate``'s keyword arguments: the settings given, the stops, ``plain``."""
    given = {key: options[key] for key in GENERATION_OPTIONS if options[key] is not None}
    return given | {"stop": list(options["stop"]), "plain": options["plain"]}


def format_stats(stats: GenerationStats) -> str:
    return (
        f"{stats.new_tokens} tokens in {stats.steps} steps (M = {stats.mean_accepted:.2f}), "
        f"{stats.tokens_per_s:.1f} tokens/s; retrieval {stats.retrieval_s * 1e3:.1f} ms, "
        f"verification {stats.verification_s * 1e3:.1f} ms, prefill {stats.prefill_s * 1e3:.1f} ms"
        + (f", {stats.retrieval_failures} failed retrievals" if stats.retrieval_failures else "")
    )


# ----------------------------------------------------------------------------------------------
# rest generate


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """``--prompt``, or ``--prompt-file`` (``-``: stdin), or stdin when it is not a terminal."""
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    if prompt is not None:
        return prompt
    if prompt_file is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise click.UsageError("give the prompt: --prompt TEXT, --prompt-file FILE, or on stdin")
        prompt_file = "-"
    if prompt_file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise click.ClickException(f"cannot read --prompt-file {prompt_file}: {exc.strerror}") from exc
    if not text:
        raise click.ClickException("the prompt is empty: give some text to continue")
    return text


@click.command("generate")
@click.option("--prompt", help="The text to continue.")
@click.option("--prompt-file", metavar="FILE", help="Read the prompt from FILE ('-': stdin). Default: stdin.")
@click.option("--json", "as_json", is_flag=True, help="Print text, tokens and statistics as JSON.")
@common_options
@reports_errors
@otel_from_env("rest-generate")
def generate(prompt: str | None, prompt_file: str | None, as_json: bool, **options: Any) -> None:
    """Continue a prompt with retrieval-based speculative decoding (lossless)."""
    text = read_prompt(prompt, prompt_file)
    generator = build_generator(options)
    stream = generator.stream(text, **generation_kwargs(options))
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


# ----------------------------------------------------------------------------------------------
# rest chat


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The model's chat template when it has one, else a plain transcript."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return tokenizer("\n".join(lines) + "\nAssistant:")["input_ids"]


def default_history_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "rest" / "chat_history"


class LineReader:
    """The user's lines: with line editing and history (readline) on a terminal, plain lines
    from a pipe. ``read`` returns None at the end of input (Ctrl-D)."""

    PROMPT = "> "

    def __init__(self, history_file: Path | None) -> None:
        self.interactive = sys.stdin.isatty()
        self.history_file = history_file
        self.readline = None
        if self.interactive:
            try:
                import readline
            except ImportError:  # no readline on this platform: input() still works, unedited
                return
            self.readline = readline
            if history_file is not None and history_file.exists():
                try:
                    readline.read_history_file(history_file)
                except OSError:
                    pass  # an unreadable history is no reason to refuse to chat

    def read(self) -> str | None:
        if self.interactive:
            try:
                return input(self.PROMPT)
            except EOFError:
                click.echo(err=True)
                return None
        click.echo(self.PROMPT, nl=False, err=True)
        line = sys.stdin.readline()
        return line.rstrip("\n") if line else None

    def save(self) -> None:
        if self.readline is None or self.history_file is None:
            return
        try:
            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            self.readline.set_history_length(1000)
            self.readline.write_history_file(self.history_file)
        except OSError as exc:
            click.echo(f"(chat history not saved: {exc})", err=True)


def stream_answer(generator: RestGenerator, messages: list[dict[str, str]], options: dict[str, Any]) -> tuple[str, Any]:
    """Stream one answer to stdout; Ctrl-C stops it. Returns the text shown and the result (None
    when stopped)."""
    ids = chat_prompt(generator.tokenizer, messages)
    stream = generator.stream(ids, **generation_kwargs(options))
    shown: list[str] = []
    try:
        for chunk in stream:
            shown.append(chunk.text)
            click.echo(chunk.text, nl=False)
            sys.stdout.flush()
    except KeyboardInterrupt:
        # Raised inside the decoding step: the step generator's clean-up ran as it unwound, so
        # the generator is ready for the next answer.
        click.echo()
        click.echo("[answer stopped]", err=True)
        return "".join(shown), None
    click.echo()
    return "".join(shown), stream.result


@click.command("chat")
@click.option("--system", help="A system message that starts the conversation (kept by /reset).")
@click.option("--show-stats/--no-show-stats", default=True, help="Statistics after each answer.")
@click.option("--history-file", type=click.Path(dir_okay=False), default=None,
              help="Where line history is kept (default: $XDG_STATE_HOME/rest/chat_history).")
@common_options
@reports_errors
@otel_from_env("rest-chat")
def chat(system: str | None, show_stats: bool, history_file: str | None, **options: Any) -> None:
    """Talk with a model, answers streamed as they are verified.

    Ctrl-C stops an answer; /reset starts the conversation again; /exit, /quit or Ctrl-D quits.
    """
    generator = build_generator(options)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    reader = LineReader(Path(history_file) if history_file else default_history_file())
    try:
        while True:
            try:
                line = reader.read()
            except KeyboardInterrupt:  # at the prompt: a fresh line, as shells do
                click.echo(err=True)
                continue
            if line is None or line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                messages = list(start)
                click.echo("[conversation reset]", err=True)
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            text, result = stream_answer(generator, messages, options)
            messages.append({"role": "assistant", "content": text})
            if show_stats and result is not None:
                click.echo(format_stats(result.stats), err=True)
    finally:
        reader.save()
