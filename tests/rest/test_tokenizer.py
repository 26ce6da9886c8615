"""rest/tokenizer.py: fingerprints follow behaviour, not files."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rest.tokenizer import tokenizer_fingerprint, vocab_size_of


def make(pre_tokenizer):
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3, " ": 4, "Ġ": 5}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_same_behaviour_same_fingerprint_after_save_and_load(tmp_path):
    tok = make(pre_tokenizers.Whitespace())
    tok.save_pretrained(tmp_path)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path)) == tokenizer_fingerprint(tok)
    assert vocab_size_of(tok) == 6


def test_same_vocabulary_other_pre_tokenization_differs():
    a = make(pre_tokenizers.Whitespace())
    b = make(pre_tokenizers.WhitespaceSplit())
    assert a.get_vocab() == b.get_vocab()
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(b)


def test_bare_tokenizers_object_is_fingerprinted_too():
    tok = make(pre_tokenizers.Whitespace())
    assert len(tokenizer_fingerprint(tok.backend_tokenizer)) == 32
