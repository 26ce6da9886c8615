"""A small causal LM that exists offline, for the demo: trained here, on the CPython stdlib.

No model can be downloaded, so the demo trains its own: a byte-level BPE tokenizer and a tiny
Llama (``LlamaForCausalLM``), both trained on the standard library's source
(:func:`rest.corpus.stdlib_documents`). The result is an ordinary Hugging Face model directory::

    model = AutoModelForCausalLM.from_pretrained(path)   # float32, ready for CPU inference
    tokenizer = AutoTokenizer.from_pretrained(path)      # PreTrainedTokenizerFast

plus a ``training.json`` (recipe, losses, timings, corpus statistics; see :func:`describe`).

It is a weak model -- a few minutes of training on two CPU cores -- whose greedy output on Python
prompts looks like Python. It exists to demonstrate speculative decoding, not to solve tasks. It is
trained on 512-token windows: longer contexts (prompt + output) are out of its distribution.

Choices worth knowing:

- Weights are saved in **float32** (``model.safetensors``, ~5.5 MB with the default recipe).
  float32 is what CPU inference wants, and storing it means every way of loading
  (``from_pretrained(path)``, ``dtype="auto"``, transformers 5's "auto" default) gives the exact
  weights that were trained and evaluated, with no rounding.
- The tokenizer has one special token, ``<|endoftext|>`` (id 0): it is the eos, bos and pad
  token, and it separates documents in the training stream. The tokenizer adds no special tokens
  when encoding (``add_special_tokens`` has nothing to add), and decoding round-trips any text.
- Determinism: the same documents, recipe and seed give the same tokenizer and, on the same
  machine type with the same thread count, the same weights. (The stdlib differs between Python
  versions, so a model trained under another Python is a different, equally valid, model.)
- A model directory is written to a temporary sibling (``.NAME.tmp-PID-RANDOM``) and renamed into
  place when complete; a directory is complete only if it holds every file and a
  ``training.json`` saying ``"complete": true`` (:func:`is_complete_model_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

EOS_TOKEN = "<|endoftext|>"
FORMAT_VERSION = 1
ENV_VAR = "REST_DEMO_MODEL_DIR"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
TRAINING_JSON = "training.json"
# What save_pretrained writes for the model and the tokenizer: an incomplete directory holding
# nothing else may be replaced; anything else is left alone.
_OWN_FILES = frozenset(
    REQUIRED_FILES
    + (TRAINING_JSON, "generation_config.json", "special_tokens_map.json", "chat_template.jinja")
)

# The recipe of the cached demo model. Sized so that the whole first run (tokenizer, encoding,
# training, saving) takes about 5 minutes on two idle CPU cores (AVX2, no GPU); measured there:
# ~0.19 s per step. Tuned on short runs: in this budget training is limited by the number of
# updates, so a small model (1.4M parameters, H=128) with small batches (2 x 512 tokens) beat a
# wider one (H=192, fewer steps) and bigger batches at the same tokens; lr 3e-3..5e-3 beat 8e-3.
DEFAULT_RECIPE: dict[str, Any] = {
    "vocab_size": 4096,
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 384,
    "max_position_embeddings": 1024,
    "seq_len": 512,
    "batch_size": 2,
    "steps": 1300,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 50,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "val_fraction": 0.01,
    "seed": 0,
    "save_dtype": "float32",
}


# --------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(documents: Iterable[str], vocab_size: int = 4096) -> Any:
    """A byte-level BPE tokenizer trained on ``documents``, as a ``PreTrainedTokenizerFast``.

    ``<|endoftext|>`` is id 0 and is the eos, bos and pad token. ``vocab_size`` counts it. No
    normalizer and no prefix space: ``decode(encode(text)) == text`` for any text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # Every newline is a token of its own. (GPT-2's pre-tokenization glues a newline to the next
    # line's indentation, "\n   " + " return", so a prompt ending in "\n" -- every HumanEval
    # prompt -- would end in a token the model has almost only seen before blank lines, and the
    # model would continue it with newlines.)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=DEFAULT_RECIPE["max_position_embeddings"],
        padding_side="left",  # what batched generation with a causal LM wants
    )


# --------------------------------------------------------------------------------------------
# Model directories


def default_cache_dir() -> Path:
    """``$REST_DEMO_MODEL_DIR`` if set, else ``<repo>/.cache/demo-model``."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / ".cache" / "demo-model"


def is_complete_model_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a finished model directory (every file, and a completed training.json)."""
    path = Path(path)
    if not path.is_dir() or not all((path / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        info = json.loads((path / TRAINING_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("complete") is True


def describe(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``training.json`` of a model directory: recipe, model size, losses, timings, corpus.

    Keys include ``recipe``, ``recipe_id``, ``num_parameters``, ``steps``, ``tokens_seen``,
    ``initial_loss``, ``final_loss``, ``smoothed_loss``, ``val_loss``, ``loss_curve``,
    ``wall_time_s``, ``train_time_s``, ``tokens_per_s``, ``corpus``, ``save_dtype``, ``versions``.
    """
    path = Path(model_dir) / TRAINING_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no {TRAINING_JSON}: not a demo model directory")
    return json.loads(path.read_text())


def recipe_id(recipe: dict[str, Any]) -> str:
    """A short digest of a recipe (plus the format version): the cache key of a demo model."""
    blob = json.dumps({"format": FORMAT_VERSION, **recipe}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _tmp_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_tmp_dirs(out_dir: Path) -> None:
    """Remove temporary directories left by interrupted runs (their process is gone)."""
    prefix = _tmp_prefix(out_dir)
    if not out_dir.parent.is_dir():
        return
    for entry in out_dir.parent.iterdir():
        if not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        pid_text = entry.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
            continue
        shutil.rmtree(entry, ignore_errors=True)


def _replaceable(path: Path) -> bool:
    """An existing directory we may replace: empty, or holding only files a model dir holds."""
    if path.is_symlink() or not path.is_dir():
        return False
    return all(entry.is_file() and entry.name in _OWN_FILES for entry in path.iterdir())


@contextlib.contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    """An exclusive lock beside ``out_dir`` (processes training the same model wait in turn)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(out_dir.parent / f".{out_dir.name}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _install(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished ``tmp_dir`` to ``out_dir``, replacing an old model directory there."""
    if out_dir.exists() or out_dir.is_symlink():
        if not (is_complete_model_dir(out_dir) or _replaceable(out_dir)):
            raise FileExistsError(
                f"{out_dir} exists and is not a demo model directory; remove it or choose another"
            )
        old = out_dir.parent / f"{_tmp_prefix(out_dir)}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


# --------------------------------------------------------------------------------------------
# Training


def _corpus_stats(documents: list[str]) -> dict[str, Any]:
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.encode("utf-8", errors="surrogatepass"))
        digest.update(b"\0")
    return {
        "documents": len(documents),
        "chars": sum(len(d) for d in documents),
        "sha256": digest.hexdigest()[:16],
    }


def _lr_at(step: int, *, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_ratio`` at the last step."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_demo_model(
    out_dir: str | os.PathLike[str],
    *,
    steps: int = DEFAULT_RECIPE["steps"],
    seq_len: int = DEFAULT_RECIPE["seq_len"],
    batch_size: int = DEFAULT_RECIPE["batch_size"],
    vocab_size: int = DEFAULT_RECIPE["vocab_size"],
    hidden_size: int = DEFAULT_RECIPE["hidden_size"],
    num_layers: int = DEFAULT_RECIPE["num_layers"],
    num_heads: int = DEFAULT_RECIPE["num_heads"],
    intermediate_size: int = DEFAULT_RECIPE["intermediate_size"],
    max_position_embeddings: int = DEFAULT_RECIPE["max_position_embeddings"],
    lr: float = DEFAULT_RECIPE["lr"],
    min_lr_ratio: float = DEFAULT_RECIPE["min_lr_ratio"],
    warmup_steps: int = DEFAULT_RECIPE["warmup_steps"],
    weight_decay: float = DEFAULT_RECIPE["weight_decay"],
    grad_clip: float = DEFAULT_RECIPE["grad_clip"],
    val_fraction: float = DEFAULT_RECIPE["val_fraction"],
    save_dtype: str = DEFAULT_RECIPE["save_dtype"],
    documents: Iterable[str] | None = None,
    num_threads: int | None = 2,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train the tokenizer and a tiny Llama on ``documents`` (default: the CPython stdlib).

    The documents are tokenized and joined with ``<|endoftext|>`` into one stream (which also
    starts with it); the last ``val_fraction`` of it is held out for a validation loss. Each step
    takes ``batch_size`` random ``seq_len``-token windows of the rest. AdamW (betas 0.9/0.95,
    weight decay on matrices only), linear warmup then cosine decay to ``lr * min_lr_ratio``,
    gradient clipping at ``grad_clip``. ``num_threads`` (default 2) sets torch's intra-op threads
    for the run and is restored afterwards (None: leave as is).

    Writes the model (safetensors, ``save_dtype``), the tokenizer and ``training.json`` to a
    temporary sibling of ``out_dir`` and renames it to ``out_dir`` when complete, replacing a
    previous model directory there. Returns ``out_dir``.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    if steps < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError("steps, batch_size must be >= 1 and seq_len >= 2")
    if seq_len > max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} > max_position_embeddings {max_position_embeddings}")
    if save_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"save_dtype must be float32, bfloat16 or float16, got {save_dtype!r}")
    recipe = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "steps": steps,
        "lr": lr,
        "min_lr_ratio": min_lr_ratio,
        "warmup_steps": warmup_steps,
        "weight_decay": weight_decay,
        "grad_clip": grad_clip,
        "val_fraction": val_fraction,
        "seed": seed,
        "save_dtype": save_dtype,
    }
    corpus_name = "custom" if documents is not None else "cpython-stdlib"
    log = _Log(progress)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    load_start = _loadavg()

    # Corpus and tokenizer.
    if documents is None:
        from rest.corpus import stdlib_documents

        documents = stdlib_documents()
    docs = [d for d in documents if d]
    if not docs:
        raise ValueError("no documents to train on")
    corpus = _corpus_stats(docs)
    log(f"corpus: {corpus['documents']} documents, {corpus['chars']:,} chars ({corpus_name})")
    tokenizer = train_tokenizer(docs, vocab_size=vocab_size)
    tokenizer.model_max_length = max_position_embeddings
    eos_id = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer
    encoded = backend.encode_batch(docs, add_special_tokens=False)
    stream: list[int] = [eos_id]
    for enc in encoded:
        stream.extend(enc.ids)
        stream.append(eos_id)
    del encoded
    data = torch.tensor(stream, dtype=torch.long)
    del stream
    n_val = int(len(data) * val_fraction)
    if n_val < seq_len + 1:
        n_val = 0  # too little to hold out a single window
    train_data = data[: len(data) - n_val]
    val_data = data[len(data) - n_val :]
    if len(train_data) < seq_len + 1:
        raise ValueError(f"corpus has {len(train_data)} tokens, fewer than seq_len + 1")
    corpus.update(
        {
            "source": corpus_name,
            "python": platform.python_version(),
            "tokens": len(data),
            "train_tokens": len(train_data),
            "val_tokens": len(val_data),
            "chars_per_token": round(corpus["chars"] / max(1, len(data)), 3),
            "vocab_size": len(tokenizer),
        }
    )
    log(
        f"tokenizer: {len(tokenizer)} tokens, {len(data):,} tokens in the stream "
        f"({corpus['chars_per_token']} chars/token), {time.perf_counter() - t_start:.1f}s"
    )

    # Model.
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            attn_implementation="sdpa",
        )
        model = LlamaForCausalLM(config)
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"model: Llama, {n_params:,} parameters (hidden {hidden_size}, {num_layers} layers, "
            f"{num_heads} heads, intermediate {intermediate_size}, vocab {len(tokenizer)})"
        )
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=lr,
            betas=(0.9, 0.95),
            eps=1e-8,
        )
        gen = torch.Generator().manual_seed(seed)
        offsets = torch.arange(seq_len + 1)
        losses: list[float] = []
        t_train = time.perf_counter()
        bar = _progress_bar(steps, progress)
        try:
            for step in range(steps):
                step_lr = _lr_at(
                    step, steps=steps, lr=lr, warmup=warmup_steps, min_ratio=min_lr_ratio
                )
                for group in optimizer.param_groups:
                    group["lr"] = step_lr
                starts = torch.randint(0, len(train_data) - seq_len, (batch_size,), generator=gen)
                window = train_data[starts[:, None] + offsets]
                loss = _lm_loss(model, window)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                losses.append(loss.item())
                if bar is not None:
                    elapsed = time.perf_counter() - t_train
                    bar.set_postfix(
                        loss=f"{losses[-1]:.3f}",
                        tok_s=f"{(step + 1) * batch_size * seq_len / elapsed:,.0f}",
                        lr=f"{step_lr:.1e}",
                        refresh=False,
                    )
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        train_time = time.perf_counter() - t_train

        model.eval()
        val_loss = _eval_loss(model, val_data, seq_len) if len(val_data) else None
    finally:
        torch.set_num_threads(old_threads)

    tail = max(1, steps // 10)
    smoothed = sum(losses[-tail:]) / tail
    tokens_seen = steps * batch_size * seq_len
    log(
        f"trained {steps} steps in {train_time:.1f}s ({tokens_seen / train_time:,.0f} tokens/s): "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (last {tail} steps: {smoothed:.3f})"
        + (f", validation loss {val_loss:.3f}" if val_loss is not None else "")
    )

    # Save: temporary sibling, then rename.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f"{_tmp_prefix(out_dir)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        dtype = getattr(torch, save_dtype)
        model.to(dtype)
        model.config.use_cache = True
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        curve = _loss_curve(losses, window=tail)
        info = {
            "format_version": FORMAT_VERSION,
            "complete": True,
            "recipe": recipe,
            "recipe_id": recipe_id(recipe),
            "architecture": "LlamaForCausalLM",
            "num_parameters": n_params,
            "steps": steps,
            "tokens_seen": tokens_seen,
            "initial_loss": round(losses[0], 4),
            "final_loss": round(losses[-1], 4),
            "smoothed_loss": round(smoothed, 4),
            "smoothed_over_steps": tail,
            "val_loss": None if val_loss is None else round(val_loss, 4),
            "loss_curve": curve,
            "train_time_s": round(train_time, 2),
            "tokens_per_s": round(tokens_seen / train_time, 1),
            "wall_time_s": round(time.perf_counter() - t_start, 2),
            "cpu_time_s": round(time.process_time() - cpu_start, 2),
            # Wall times are only comparable on an otherwise idle machine: the load averages
            # show whether it was.
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "loadavg_start": load_start,
                "loadavg_end": _loadavg(),
            },
            "num_threads": num_threads if num_threads is not None else old_threads,
            "corpus": corpus,
            "save_dtype": save_dtype,
            "load_dtype": "float32",
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp_dir / TRAINING_JSON).write_text(json.dumps(info, indent=2) + "\n")
        _install(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log(f"saved {out_dir} ({_dir_size(out_dir) / 1e6:.1f} MB) in {info['wall_time_s']:.0f}s total")
    return out_dir


def ensure_demo_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The demo model's directory, training it (about 5 minutes on 2 cores) if not cached.

    ``cache_dir`` defaults to :func:`default_cache_dir` (``$REST_DEMO_MODEL_DIR`` or
    ``<repo>/.cache/demo-model``). A cached model trained with another recipe is retrained.
    Concurrent callers are serialized by a lock file beside the directory; temporary directories
    of interrupted runs are removed.
    """
    out_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    wanted = recipe_id(DEFAULT_RECIPE)
    if _is_current(out_dir, wanted):
        return out_dir
    with _locked(out_dir):
        if _is_current(out_dir, wanted):  # trained by another process while we waited
            return out_dir
        _remove_stale_tmp_dirs(out_dir)
        if out_dir.exists() and not (is_complete_model_dir(out_dir) or _replaceable(out_dir)):
            raise FileExistsError(
                f"{out_dir} exists and is not a demo model directory; remove it or set {ENV_VAR}"
            )
        print(
            f"Training the demo model into {out_dir} (first run only; about 5 minutes)...",
            file=sys.stderr,
            flush=True,
        )
        train_demo_model(out_dir, **DEFAULT_RECIPE)
    return out_dir


def _is_current(out_dir: Path, wanted: str) -> bool:
    if not is_complete_model_dir(out_dir):
        return False
    try:
        return describe(out_dir).get("recipe_id") == wanted
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Helpers


def _lm_loss(model: Any, window: Any) -> Any:
    """Next-token cross entropy of ``window[:, :-1]`` predicting ``window[:, 1:]``."""
    import torch.nn.functional as F

    logits = model(input_ids=window[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1))


def _eval_loss(model: Any, data: Any, seq_len: int, max_windows: int = 16) -> float:
    """Mean loss over up to ``max_windows`` evenly spaced, non-overlapping windows of ``data``."""
    import torch

    n = (len(data) - 1) // seq_len
    picks = sorted({round(k * (n - 1) / max(1, max_windows - 1)) for k in range(min(n, max_windows))})
    total = 0.0
    with torch.no_grad():
        for i in picks:
            window = data[i * seq_len : (i + 1) * seq_len + 1][None]
            total += float(_lm_loss(model, window))
    return total / len(picks)


def _loss_curve(losses: list[float], window: int, points: int = 100) -> list[list[float]]:
    """``[step, mean loss of the ``window`` steps ending there]`` at up to ``points`` steps."""
    n = len(losses)
    picks = sorted({round(k * (n - 1) / max(1, points - 1)) for k in range(min(n, points))})
    curve = []
    for i in picks:
        seg = losses[max(0, i - window + 1) : i + 1]
        curve.append([i + 1, round(sum(seg) / len(seg), 4)])
    return curve


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class _Log:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[demo-model] {message}", file=sys.stderr, flush=True)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="[demo-model] training", unit="step", mininterval=1.0)
