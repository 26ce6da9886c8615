"""Lossless retrieval-based speculative decoding (REST) for Hugging Face causal LMs.

Terms, used with these meanings throughout the package:

- context: the prompt plus the tokens generated so far.
- root: the last token of the context. The model chose it (or it ends the prompt), but it has
  not been fed to the model yet: the KV cache holds the context minus the root.
- draft node: a proposed token that follows the root through a path of other draft nodes. Its
  score estimates the probability that the model produces that whole path.
- draft tree: the root and the draft nodes of one step, verified by one forward pass with tree
  attention (each node sees the prefix, its ancestors and itself).
- accepted path: the longest root-to-node path of draft nodes whose tokens are the model's own
  choices (greedy: argmax; sampling: the token drawn at each node in turn).
- bonus token: the model's choice after the accepted path. Every step emits the accepted path and
  the bonus token (at least one token), and the bonus token becomes the next root.
- level: one draft source's continuations of one matched suffix of the context, counted (match
  length, occurrences, and how many occurrences continue with each path); a scorer turns the
  levels of every source into one draft tree (``decoder.draft_tree``).
- served outputs: the outputs of a generator's earlier calls, a draft source for later ones.
- budget: the number of draft nodes one step verifies, fixed or chosen per step ("auto").
- step: one forward pass over a draft tree (or over every running sequence's tree, in a batch);
  the prefill, which chooses the first token, counts as a step; M = new tokens / steps.
"""

from decoder.batch import BatchDecoder, SequenceRequest, SequenceUpdate, StepStats
from decoder.config import DecodingConfig, NgramParams
from decoder.draft_sources import (
    ContextDraftSource,
    DraftSource,
    RetrieverDraftSource,
    ServedDraftSource,
)
from decoder.draft_tree import DraftTree, Level
from decoder.errors import DecoderError, TokenizerMismatchError, UnsupportedModelError
from decoder.generator import GenerationResult, GenerationStream, RestGenerator, StreamChunk
from decoder.model_support import load_model
from decoder.ngram_index import ServedOutputs
from decoder.settings import UnsupportedGenerationError
from decoder.stats import GenerationStats

__all__ = [
    "BatchDecoder",
    "ContextDraftSource",
    "DecoderError",
    "DecodingConfig",
    "DraftSource",
    "DraftTree",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "Level",
    "NgramParams",
    "RestGenerator",
    "RetrieverDraftSource",
    "ServedDraftSource",
    "SequenceRequest",
    "SequenceUpdate",
    "ServedOutputs",
    "StepStats",
    "StreamChunk",
    "TokenizerMismatchError",
    "UnsupportedGenerationError",
    "UnsupportedModelError",
    "load_model",
]
