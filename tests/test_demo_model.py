"""The demo model's training recipe, at toy size (seconds, not minutes)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rest import demo_model  # noqa: E402
from rest.corpus import stdlib_documents  # noqa: E402
from rest.demo_model import (  # noqa: E402
    EOS_TOKEN,
    describe,
    ensure_demo_model,
    is_complete_model_dir,
    train_demo_model,
    train_tokenizer,
)

TINY = dict(
    steps=40,
    seq_len=64,
    batch_size=8,
    vocab_size=400,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
    lr=1e-2,
    warmup_steps=4,
    val_fraction=0.05,
    num_threads=1,  # tiny ops: a second thread only adds synchronization (and suffers on a busy machine)
)

UNICODE_CODE = (
    'def grüße(name: str) -> str:\n    """Say hello — 你好, 🙂."""\n'
    "\treturn f'Ünïcödé {name!r}'  # tabs\tand  two  spaces\r\n"
    "x = 'µ' * 3\n\n\n" + EOS_TOKEN + "   trailing   \n"
)


@pytest.fixture(scope="module")
def documents() -> list[str]:
    # Small stdlib modules: a few hundred KB of real code, enough for a toy tokenizer and model.
    docs = [d for d in itertools.islice(stdlib_documents(), 200) if 2_000 < len(d) < 20_000]
    return docs[:30]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, documents: list[str]) -> Path:
    out = tmp_path_factory.mktemp("demo") / "model"
    path = train_demo_model(out, documents=documents, seed=0, progress=False, **TINY)
    assert path == out
    return out


def test_directory_is_complete_and_loads(trained: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert is_complete_model_dir(trained)
    # Nothing temporary is left beside it.
    assert [p.name for p in trained.parent.iterdir() if p.is_dir()] == ["model"]
    model = AutoModelForCausalLM.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == EOS_TOKEN
    assert tokenizer.eos_token_id == model.config.eos_token_id == 0
    assert tokenizer.pad_token_id == tokenizer.bos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == 0

    ids = tokenizer("def f(x):\n    return", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape[1] <= ids.shape[1] + 8
    assert torch.equal(out[0, : ids.shape[1]], ids[0])


def test_tokenizer_round_trips(trained: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained)
    for text in (UNICODE_CODE, "", " ", "\n\n", "    leading spaces", "emoji only 🙂🙂"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        # add_special_tokens has nothing to add.
        assert tokenizer.encode(text) == ids
    ids = tokenizer.encode(UNICODE_CODE)
    assert ids.count(tokenizer.eos_token_id) == 1  # the literal special token maps to its id
    # The saved tokenizer behaves exactly like the raw tokenizer.json.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(trained / "tokenizer.json"))
    assert raw.encode(UNICODE_CODE, add_special_tokens=False).ids == ids


def test_train_tokenizer_directly(documents: list[str]) -> None:
    tok = train_tokenizer(documents[:5], vocab_size=300)
    assert len(tok) <= 300
    assert tok.convert_tokens_to_ids(EOS_TOKEN) == 0 == tok.eos_token_id
    assert tok.decode(tok.encode(UNICODE_CODE)) == UNICODE_CODE
    with pytest.raises(ValueError):
        train_tokenizer(documents[:1], vocab_size=100)


def test_training_json_and_loss_decreased(trained: Path, documents: list[str]) -> None:
    info = describe(trained)
    assert info["complete"] is True
    assert info["steps"] == TINY["steps"]
    assert info["recipe"]["hidden_size"] == TINY["hidden_size"]
    assert info["recipe_id"] == demo_model.recipe_id(info["recipe"])
    assert info["corpus"]["documents"] == len(documents)
    assert info["corpus"]["tokens"] > info["corpus"]["train_tokens"] > 0
    assert info["num_parameters"] > 0
    assert info["wall_time_s"] > 0 and info["tokens_per_s"] > 0
    assert info["save_dtype"] == "float32"
    # log(vocab) at the start; clearly lower at the end.
    assert info["initial_loss"] == pytest.approx(
        torch.log(torch.tensor(float(info["corpus"]["vocab_size"]))).item(), abs=0.5
    )
    assert info["smoothed_loss"] < info["initial_loss"] - 0.5
    assert info["loss_curve"][-1][1] < info["loss_curve"][0][1]
    assert info["val_loss"] is not None and info["val_loss"] < info["initial_loss"]
    with pytest.raises(FileNotFoundError):
        describe(trained.parent)


def test_deterministic_with_seed(tmp_path: Path, trained: Path, documents: list[str]) -> None:
    from safetensors.torch import load_file

    kw = {**TINY, "steps": 5}
    a = train_demo_model(tmp_path / "a", documents=documents, seed=0, progress=False, **kw)
    b = train_demo_model(tmp_path / "b", documents=documents, seed=0, progress=False, **kw)
    c = train_demo_model(tmp_path / "c", documents=documents, seed=1, progress=False, **kw)
    assert (a / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()
    wa, wb, wc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert describe(a)["loss_curve"] == describe(b)["loss_curve"]


def test_partial_directories_are_not_complete(tmp_path: Path, trained: Path) -> None:
    import shutil

    # A model directory missing training.json (as an interrupted save would leave it) ...
    partial = tmp_path / "partial"
    shutil.copytree(trained, partial)
    assert is_complete_model_dir(partial)
    (partial / "training.json").unlink()
    assert not is_complete_model_dir(partial)
    # ... or with one not marked complete, or missing weights.
    shutil.copy(trained / "training.json", partial / "training.json")
    info = json.loads((partial / "training.json").read_text())
    (partial / "training.json").write_text(json.dumps({**info, "complete": False}))
    assert not is_complete_model_dir(partial)
    (partial / "training.json").write_text("{truncated")
    assert not is_complete_model_dir(partial)
    shutil.copy(trained / "training.json", partial / "training.json")
    (partial / "model.safetensors").unlink()
    assert not is_complete_model_dir(partial)
    assert not is_complete_model_dir(tmp_path / "missing")


def test_interrupted_training_leaves_nothing_complete(
    tmp_path: Path, documents: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model"
    calls = []

    def boom(tmp_dir: Path, out_dir: Path) -> None:  # the process dies just before the rename
        calls.append(tmp_dir)
        assert tmp_dir.parent == out_dir.parent and tmp_dir.name.startswith(".model.tmp-")
        assert is_complete_model_dir(tmp_dir)  # fully written, but not at the final path
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_model, "_install", boom)
    with pytest.raises(KeyboardInterrupt):
        train_demo_model(out, documents=documents, progress=False, **{**TINY, "steps": 2})
    assert calls
    assert not out.exists() and not is_complete_model_dir(out)
    assert list(tmp_path.iterdir()) == []  # the temporary directory was cleaned up


def test_ensure_demo_model_uses_cache_and_ignores_partial(
    tmp_path: Path, trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    trainings: list[Path] = []

    def fake_train(out_dir: Path, **recipe: object) -> Path:
        assert recipe == demo_model.DEFAULT_RECIPE
        trainings.append(Path(out_dir))
        tmp = Path(out_dir).parent / f".{Path(out_dir).name}.tmp-999999999-x"
        shutil.copytree(trained, tmp)
        info = json.loads((tmp / "training.json").read_text())
        info["recipe_id"] = demo_model.recipe_id(demo_model.DEFAULT_RECIPE)
        (tmp / "training.json").write_text(json.dumps(info))
        demo_model._install(tmp, Path(out_dir))
        return Path(out_dir)

    monkeypatch.setattr(demo_model, "train_demo_model", fake_train)
    cache = tmp_path / "cache" / "demo-model"
    # Left by an interrupted run (dead pid): looks like a model but is only a temp dir.
    stale = cache.parent / ".demo-model.tmp-999999998-dead"
    shutil.copytree(trained, stale)
    # A partial directory at the final path (no training.json) is replaced, not used.
    cache.mkdir(parents=True)
    shutil.copy(trained / "config.json", cache / "config.json")

    assert ensure_demo_model(cache) == cache
    assert trainings == [cache] and is_complete_model_dir(cache)
    assert not stale.exists()
    assert ensure_demo_model(cache) == cache  # cached: no second training
    assert len(trainings) == 1

    # Environment override of the default location.
    other = tmp_path / "env-model"
    monkeypatch.setenv("REST_DEMO_MODEL_DIR", str(other))
    assert demo_model.default_cache_dir() == other
    assert ensure_demo_model() == other and len(trainings) == 2
    monkeypatch.delenv("REST_DEMO_MODEL_DIR")
    assert demo_model.default_cache_dir() == Path(demo_model.__file__).resolve().parent.parent / (
        ".cache/demo-model"
    )

    # A cached model of another recipe is retrained.
    info = describe(cache)
    (cache / "training.json").write_text(json.dumps({**info, "recipe_id": "old"}))
    assert ensure_demo_model(cache) == cache and len(trainings) == 3
    assert describe(cache)["recipe_id"] == demo_model.recipe_id(demo_model.DEFAULT_RECIPE)

    # A directory that is not ours is never deleted.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        ensure_demo_model(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert len(trainings) == 3
    assert os.listdir(foreign) == ["notes.txt"]
