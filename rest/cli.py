"""The ``rest`` command line: datastores, the retrieval server, generation, the demo, benchmarks.

Commands that need torch, transformers or gRPC live in other modules, imported only when one of
them runs: ``rest --help`` and the datastore commands start in a fraction of a second. The list
of those commands, with their one-line help, is written out below for that reason
(``tests/rest/test_cli.py`` checks it against the commands themselves).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click

from rest.cli_errors import DEBUG_ENV, DEBUG_FLAG, run
from rest.types import POLICIES, SearchParams

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}
PACKAGE = "rest-decoding"


class LazyGroup(click.Group):
    """A group whose subcommands ``{name: ("module:attribute", "one-line help")}`` are imported
    when one of them runs, not to list them."""

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name][0].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy:
                rows.append((name, self.lazy[name][1]))
                continue
            command = super().get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version(PACKAGE)
    except PackageNotFoundError:
        number = "(not installed)"
    from rest.datastore import FORMAT_VERSION

    click.echo(f"rest {number} (datastore format {FORMAT_VERSION})")
    ctx.exit()


@click.group(
    cls=LazyGroup,
    context_settings=CONTEXT_SETTINGS,
    lazy={
        "generate": ("decoder.cli:generate", "Continue a prompt with retrieval-based speculative decoding (lossless)."),
        "chat": ("decoder.cli:chat", "Talk with a model, answers streamed as they are verified."),
        "demo": ("rest.demo:demo_command", "The whole system offline: demo model, datastore, retriever-server, REST vs plain decoding."),
        "bench": ("bench.suite:bench_command", "Decode a workload with every drafting method and plain decoding, on the same model."),
    },
    epilog=f"Errors are one line; {DEBUG_FLAG} (or {DEBUG_ENV}=1) shows their traceback.",
)  # fmt: skip
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=print_version,
              help="Print the version and exit.")
def cli() -> None:
    """Retrieval-based speculative decoding (REST)."""


@cli.command("serve", hidden=True, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def renamed_serve() -> None:
    """Renamed: ``rest datastore serve`` (it serves a datastore, not a model)."""
    raise click.UsageError(
        "'rest serve' is now 'rest datastore serve': it serves a datastore to decoders over gRPC, "
        "not a model (the same program is installed as retriever-server)"
    )


@cli.group(
    cls=LazyGroup,
    lazy={"serve": ("retriever_service.server:serve_command",
                    "Serve a REST datastore over gRPC (rest.retriever.v1): the same as retriever-server.")},
)  # fmt: skip
def datastore() -> None:
    """Build, inspect, verify, query and serve suffix-array datastores."""


# ----------------------------------------------------------------------------------------------
# Opening datastores, with errors written for users


def open_datastore(path: str) -> Any:
    from rest.datastore import Datastore, DatastoreError

    where = Path(path)
    if not where.exists():
        raise click.ClickException(f"{path} does not exist: give a datastore directory (made by 'rest datastore build')")
    if not where.is_dir():
        raise click.ClickException(f"{path} is a file, not a datastore directory (made by 'rest datastore build')")
    try:
        return Datastore.open(path)
    except DatastoreError as exc:
        raise click.ClickException(
            f"cannot open the datastore: {exc}; if it is damaged, build it again (rest datastore build --overwrite)"
        ) from exc


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def shard_rows(ds: Any) -> list[dict[str, Any]]:
    """Each shard of the manifest with its size on disk."""
    rows = []
    for shard in ds.manifest().get("shards", []):
        file = ds.path / shard["file"]
        rows.append({**shard, "bytes_on_disk": file.stat().st_size if file.exists() else 0})
    return rows


def datastore_summary(ds: Any) -> dict[str, Any]:
    """What ``info`` prints: the datastore's metadata, its shards and their sizes on disk."""
    info = ds.info()
    shards = shard_rows(ds)
    files = [p for p in ds.path.iterdir() if p.is_file()]
    return {
        "path": str(ds.path.resolve()),
        "info": info.__dict__ | {"shards": list(info.shards)},
        "bytes_on_disk": sum(p.stat().st_size for p in files),
        "shards": shards,
        "manifest": ds.manifest(),
    }


def print_datastore(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    info = summary["info"]
    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]{summary['path']}[/]")
    width = summary["manifest"].get("token_width")
    fields = [
        ("tokens", f"{info['n_tokens']:,} in {info['n_docs']:,} documents"),
        ("vocabulary", f"{info['vocab_size']:,} ids" + (f" ({width}-byte tokens)" if width else "")),
        ("tokenizer", info["tokenizer_name"]),
        ("fingerprint", info["tokenizer_fingerprint"]),
        ("on disk", f"{human_bytes(summary['bytes_on_disk'])} in {len(summary['shards'])} shard(s), "
                    f"{summary['bytes_on_disk'] / max(info['n_tokens'], 1):.1f} bytes per token"),
        ("format", f"version {info['format_version']}"),
    ]  # fmt: skip
    for name, value in fields:
        console.print(f"  {name:<12} {value}", markup=False)
    table = Table(box=None, pad_edge=False)
    for name, justify in (("shard", "left"), ("tokens", "right"), ("documents", "right"), ("on disk", "right")):
        table.add_column(name, justify=justify)
    for shard in summary["shards"]:
        table.add_row(shard["name"], f"{shard['n_tokens']:,}", f"{shard['n_docs']:,}", human_bytes(shard["bytes_on_disk"]))
    console.print(table)


# ----------------------------------------------------------------------------------------------
# build


def check_shard_tokens(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is None:
        return None
    from rest._engine import MAX_SHARD_TOKENS

    if not 2 <= value <= MAX_SHARD_TOKENS:
        raise click.BadParameter(f"must be between 2 and {MAX_SHARD_TOKENS:,} tokens, got {value:,}; leave it out for 2^28")
    return value


def input_files(paths: list[str], corpus: str | None) -> list[Path | str]:
    if bool(paths) == bool(corpus):
        raise click.UsageError("give input files (--input FILE...) or --corpus, not both and not neither")
    if corpus == "stdlib":
        from rest.corpus import stdlib_files

        return list(stdlib_files())
    if corpus == "site-packages":
        from rest.corpus import site_packages_files

        return list(site_packages_files())
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise click.ClickException(f"input {missing[0]} does not exist: give existing files or folders to --input")
    return list(paths)


def load_tokenizer_for_build(tokenizer_id: str) -> Any:
    from rest.tokenizer import load_tokenizer, missing_local_path

    if missing_local_path(tokenizer_id):
        raise click.ClickException(f"tokenizer {tokenizer_id} does not exist: give a model or tokenizer directory, or a hub id")
    try:
        return load_tokenizer(tokenizer_id)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.ClickException(
            f"cannot load tokenizer {tokenizer_id!r} ({first}); give a model or tokenizer directory, or a hub id"
        ) from exc


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def build_from_reader(out_dir: str | Path, reader: Any, tokenizer: Any, *, progress: bool, **build_options: Any) -> Any:
    """Tokenize a ``DocumentReader``'s documents and build a datastore of them at ``out_dir``,
    with a progress bar over the input's bytes; returns its ``DatastoreInfo``."""
    from rest.datastore import build_datastore
    from rest.progress import BuildProgress
    from rest.tokenizer import tokenizer_fingerprint, tokenizer_name, vocab_size_of

    tokens = 0
    with BuildProgress(reader.summary.total_bytes, enabled=progress) as bar:

        def documents() -> Iterator[list[int]]:
            nonlocal tokens
            for texts in batched(reader, 64):
                # verbose=False: documents longer than the model's context are fine here, and the
                # warning about them would only interrupt the bar.
                ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
                yield from ids
                tokens += sum(map(len, ids))
                bar.update(reader.summary.bytes_read, tokens)

        return build_datastore(
            out_dir,
            documents(),
            vocab_size=vocab_size_of(tokenizer),
            tokenizer_name=tokenizer_name(tokenizer),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            **build_options,
        )


@datastore.command("build")
@click.option("--tokenizer", "tokenizer_id", required=True, help="Tokenizer directory or hub id (loaded with AutoTokenizer).")
@click.option("--input", "inputs", multiple=True, help="Input files or folders (repeatable).")
@click.option("--corpus", type=click.Choice(["stdlib", "site-packages"]), help="A corpus found on this machine instead of --input.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "text", "jsonl", "json", "parquet", "sharegpt", "ultrachat"]))
@click.option("--field", default="text", show_default=True, help="JSON field or Parquet column holding the text.")
@click.option("--include", multiple=True, metavar="GLOB",
              help="In folders, read only files matching one of these globs (e.g. '*.py'; repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="In folders, leave out files matching these globs (e.g. 'tests/*'; repeatable).")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Datastore directory to create.")
@click.option("--shard-tokens", type=int, default=None, callback=check_shard_tokens,
              help="Tokens per shard (default 2^28).")
@click.option("--overwrite", is_flag=True, help="Replace an existing datastore.")
@click.option("--progress/--no-progress", default=None, help="A progress bar on stderr (default: when it is a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("files", nargs=-1)
def build_command(tokenizer_id, inputs, corpus, fmt, field, include, exclude, out_dir, shard_tokens, overwrite,
                  progress, as_json, files):
    """Tokenize documents and build a datastore at --out.

    Folders give their text files: hidden entries are left out, binary files skipped (and
    counted), and --include/--exclude choose among the rest.
    """
    from rest.documents import DocumentReader, InputFormatError

    paths = input_files(list(inputs) + list(files), corpus)
    if Path(out_dir).exists() and not overwrite:
        raise click.ClickException(f"{out_dir} already exists: pass --overwrite to replace it, or choose another --out")
    reader = DocumentReader(paths, "text" if corpus else fmt, field, include, exclude)
    tokenizer = load_tokenizer_for_build(tokenizer_id)
    start = time.perf_counter()
    try:
        info = build_from_reader(out_dir, reader, tokenizer, progress=sys.stderr.isatty() if progress is None else progress,
                                 shard_tokens=shard_tokens, overwrite=overwrite)  # fmt: skip
    except InputFormatError as exc:
        raise click.ClickException(f"{exc}") from exc
    elapsed = time.perf_counter() - start
    read = reader.summary
    if read.documents == 0 or info.n_tokens == 0:
        raise click.ClickException(f"no text in the input ({read.describe()}): check --input, --include and --format")
    summary = datastore_summary(open_datastore(out_dir))
    if as_json:
        click.echo(json.dumps(summary | {"input": read.__dict__, "seconds": round(elapsed, 3)}, indent=2))
        return
    click.echo(f"built {info.n_tokens:,} tokens from {read.describe()} in {elapsed:.1f}s "
               f"({info.n_tokens / max(elapsed, 1e-9):,.0f} tokens/s)", err=True)
    print_datastore(summary)


# ----------------------------------------------------------------------------------------------
# info, verify


@datastore.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and shard sizes as JSON.")
def info_command(path, as_json):
    """Show a datastore: tokens, tokenizer, shards and their sizes on disk."""
    summary = datastore_summary(open_datastore(path))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        print_datastore(summary)


@datastore.command("verify")
@click.argument("path")
def verify_command(path):
    """The slow full check: checksums and suffix-array structure of every shard."""
    from rest.datastore import DatastoreError

    start = time.perf_counter()
    ds = open_datastore(path)
    try:
        ds.verify()
    except DatastoreError as exc:
        raise click.ClickException(f"{path} failed verification: {exc}; build it again (rest datastore build --overwrite)") from exc
    click.echo(f"ok: {ds.info().n_tokens:,} tokens in {len(ds.shard_names)} shard(s) verified "
               f"in {time.perf_counter() - start:.2f}s")


# ----------------------------------------------------------------------------------------------
# query


def datastore_codec(ds: Any, tokenizer_id: str | None, required: bool) -> Any:
    """The datastore's tokenizer (or ``--tokenizer``) as a ``TextCodec``; None when it is not
    ``required`` and cannot be had without ``transformers``."""
    from rest.tokenizer import load_codec, tokenizer_source

    info = ds.info()
    source = tokenizer_id or tokenizer_source(info.tokenizer_name)
    if source is None:
        if not required:
            return None
        raise click.UsageError(f"the datastore does not say where its tokenizer is ({info.tokenizer_name!r}): give --tokenizer")
    if not required:
        from rest.tokenizer import fast_codec

        return fast_codec(source, info.tokenizer_fingerprint)
    try:
        return load_codec(source, info.tokenizer_fingerprint)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise click.ClickException(f"cannot load the tokenizer {source!r} ({first}): give --tokenizer") from exc


def parse_tokens(tokens: str) -> list[int]:
    try:
        return [int(t) for t in tokens.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter("must be comma-separated integers, e.g. 12,345,6", param_hint="--tokens") from None


def leaf_paths(result: Any) -> list[tuple[tuple[int, ...], int]]:
    """The tree's root-to-leaf paths with their counts, most frequent first (ties: tree order)."""
    parents = set(result.parents)
    paths = result.paths()
    leaves = [(paths[i], result.counts[i]) for i in range(len(result.tokens)) if i not in parents]
    return sorted(leaves, key=lambda leaf: -leaf[1])


def print_query(out: dict[str, Any], result: Any, codec: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True)
    shown = repr(codec.decode(out["context"])) if codec is not None else str(out["context"])
    console.print(f"context      {shown} ({len(out['context'])} tokens)", markup=False)
    if result.match_length == 0:
        console.print("match        none: no suffix of the context occurs in the datastore (try a lower --min-span)")
        return
    matched = out["context"][-result.match_length:]
    suffix = repr(codec.decode(matched)) if codec is not None else str(matched)
    console.print(f"match        the last {result.match_length} tokens {suffix}, {result.occurrences:,} occurrences",
                  markup=False)
    console.print(f"tree         {len(result.tokens)} nodes in {out['latency_us']:.0f} µs")
    table = Table(box=None, pad_edge=False)
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    table.add_column("continuation")
    for path, count in leaf_paths(result):
        text = repr(codec.decode(list(path))) if codec is not None else str(list(path))
        table.add_row(f"{count:,}", f"{count / max(result.occurrences, 1):.0%}", text)
    console.print(table)


@datastore.command("query")
@click.argument("path")
@click.option("--tokens", help="Comma-separated context token ids.")
@click.option("--text", help="Context text (tokenized with --tokenizer, or the datastore's tokenizer).")
@click.option("--tokenizer", "tokenizer_id", help="Tokenizer directory or hub id for --text.")
@click.option("--min-span", default=2, show_default=True, type=click.IntRange(1, 256))
@click.option("--max-span", default=16, show_default=True, type=click.IntRange(1, 256))
@click.option("--budget", default=64, show_default=True, type=click.IntRange(0, 4096))
@click.option("--max-depth", default=10, show_default=True, type=click.IntRange(1, 256))
@click.option("--policy", default="exact", show_default=True, type=click.Choice(POLICIES))
@click.option("--json", "as_json", is_flag=True, help="Print the match and the tree's nodes as JSON.")
def query_command(path, tokens, text, tokenizer_id, min_span, max_span, budget, max_depth, policy, as_json):
    """Search a context and show its continuations, most frequent first."""
    if bool(tokens) == bool(text):
        raise click.UsageError("give exactly one of --tokens and --text")
    if max_span < min_span:
        raise click.BadParameter(f"must be >= --min-span ({min_span}), got {max_span}", param_hint="--max-span")
    ds = open_datastore(path)
    if text:
        codec = datastore_codec(ds, tokenizer_id, required=True)
        context = codec.encode(text)
        if not context:
            raise click.UsageError("--text gives no tokens")
    else:
        context = parse_tokens(tokens)
        codec = datastore_codec(ds, tokenizer_id, required=False)
    params = SearchParams(min_span=min_span, max_span=max_span, budget=budget, max_depth=max_depth, policy=policy)
    start = time.perf_counter()
    try:
        result = ds.search(context, params)
    except ValueError as exc:
        raise click.ClickException(f"{exc}") from exc
    out: dict[str, Any] = {
        "context": context,
        "match_length": result.match_length,
        "occurrences": result.occurrences,
        "latency_us": round((time.perf_counter() - start) * 1e6, 1),
        "nodes": [{"token": t, "parent": p, "count": c} for t, p, c in zip(result.tokens, result.parents, result.counts)],
    }
    if codec is not None:
        out["paths"] = [codec.decode(list(p)) for p in result.paths()]
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        print_query(out, result, codec)


def main() -> None:
    run(cli, "rest")


if __name__ == "__main__":
    main()
