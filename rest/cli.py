"""The ``rest`` command line: datastores, the retrieval server, generation, the demo, benchmarks.

Subcommands living in other packages are imported only when used, so ``rest datastore ...`` starts
without importing torch.
"""

from __future__ import annotations

import importlib
import json
import sys
import time

import click

from rest.types import POLICIES, SearchParams


class LazyGroup(click.Group):
    """A group whose subcommands are ``"module:attribute"`` strings imported on first use."""

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(
    cls=LazyGroup,
    lazy={
        "serve": "retriever_service.server:serve_command",
        "generate": "decoder.cli:generate",
        "chat": "decoder.cli:chat",
        "demo": "rest.demo:demo_command",
        "bench": "bench.suite:bench_command",
    },
)
def main() -> None:
    """Retrieval-based speculative decoding (REST)."""


@main.group()
def datastore() -> None:
    """Build, inspect, verify and query suffix-array datastores."""


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@datastore.command("build")
@click.option("--tokenizer", "tokenizer_id", required=True, help="Tokenizer directory or hub id (loaded with AutoTokenizer).")
@click.option("--input", "inputs", multiple=True, help="Input files or directories (repeatable).")
@click.option("--corpus", type=click.Choice(["stdlib", "site-packages"]), help="A corpus found on this machine instead of --input.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "text", "jsonl", "json", "parquet", "sharegpt", "ultrachat"]))
@click.option("--field", default="text", show_default=True, help="JSON field or Parquet column holding the text.")
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Datastore directory to create.")
@click.option("--shard-tokens", type=int, default=None, help="Tokens per shard (default 2^28).")
@click.option("--overwrite", is_flag=True, help="Replace an existing datastore.")
@click.argument("files", nargs=-1)
def build_command(tokenizer_id, inputs, corpus, fmt, field, out_dir, shard_tokens, overwrite, files):
    """Tokenize documents and build a datastore at --out."""
    from rest.datastore import build_datastore
    from rest.documents import read_documents
    from rest.tokenizer import load_tokenizer, tokenizer_fingerprint, tokenizer_name, vocab_size_of

    paths = list(inputs) + list(files)
    if bool(paths) == bool(corpus):
        raise click.UsageError("give input files (--input FILE...) or --corpus, not both and not neither")
    tokenizer = load_tokenizer(tokenizer_id)
    if corpus == "stdlib":
        from rest.corpus import stdlib_documents as texts
        texts = texts()
    elif corpus == "site-packages":
        from rest.corpus import site_packages_documents
        texts = site_packages_documents()
    else:
        texts = read_documents(paths, fmt, field)

    def documents():
        batch = []
        for text in texts:
            batch.append(text)
            if len(batch) == 64:
                yield from _tokenize(tokenizer, batch)
                batch = []
        if batch:
            yield from _tokenize(tokenizer, batch)

    info = build_datastore(
        out_dir,
        documents(),
        vocab_size=vocab_size_of(tokenizer),
        tokenizer_name=tokenizer_name(tokenizer),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        shard_tokens=shard_tokens,
        overwrite=overwrite,
        progress=True,
    )
    click.echo(json.dumps(info.__dict__, indent=2))


@datastore.command("info")
@click.argument("path", type=click.Path())
def info_command(path):
    """Print the manifest and shard headers of a datastore."""
    from rest.datastore import Datastore

    ds = Datastore.open(path)
    click.echo(json.dumps({"info": ds.info().__dict__, "manifest": ds.manifest()}, indent=2))


@datastore.command("verify")
@click.argument("path", type=click.Path())
def verify_command(path):
    """The slow full check: checksums and suffix-array structure of every shard."""
    from rest.datastore import Datastore

    start = time.perf_counter()
    ds = Datastore.open(path)
    ds.verify()
    click.echo(f"ok: {ds.info().n_tokens:,} tokens in {len(ds.shard_names)} shard(s) verified "
               f"in {time.perf_counter() - start:.2f}s")


@datastore.command("query")
@click.argument("path", type=click.Path())
@click.option("--tokens", help="Comma-separated context token ids.")
@click.option("--text", help="Context text (tokenized with --tokenizer, or the datastore's tokenizer).")
@click.option("--tokenizer", "tokenizer_id", help="Tokenizer directory or hub id for --text.")
@click.option("--min-span", default=2, show_default=True)
@click.option("--max-span", default=16, show_default=True)
@click.option("--budget", default=64, show_default=True)
@click.option("--max-depth", default=10, show_default=True)
@click.option("--policy", default="exact", show_default=True, type=click.Choice(POLICIES))
def query_command(path, tokens, text, tokenizer_id, min_span, max_span, budget, max_depth, policy):
    """Search a context and print the continuation tree as JSON."""
    from rest.datastore import Datastore

    ds = Datastore.open(path)
    if bool(tokens) == bool(text):
        raise click.UsageError("give exactly one of --tokens and --text")
    tokenizer = None
    if text:
        from rest.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_id or ds.info().tokenizer_name.split(":", 1)[-1])
        context = _tokenize(tokenizer, [text])[0]
    else:
        try:
            context = [int(t) for t in tokens.split(",") if t.strip()]
        except ValueError:
            raise click.BadParameter("--tokens must be comma-separated integers") from None
    params = SearchParams(min_span=min_span, max_span=max_span, budget=budget, max_depth=max_depth, policy=policy)
    start = time.perf_counter()
    result = ds.search(context, params)
    elapsed_us = (time.perf_counter() - start) * 1e6
    out = {
        "context": context,
        "match_length": result.match_length,
        "occurrences": result.occurrences,
        "latency_us": round(elapsed_us, 1),
        "nodes": [{"token": t, "parent": p, "count": c} for t, p, c in zip(result.tokens, result.parents, result.counts)],
    }
    if tokenizer is not None:
        out["paths"] = [tokenizer.decode(list(path)) for path in result.paths()]
    click.echo(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
