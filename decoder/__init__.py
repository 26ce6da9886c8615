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
- budget: the number of draft nodes one step verifies, fixed or chosen per step ("auto").
- step: one forward pass over a draft tree; M = new tokens / steps.
"""

from decoder.config import DecodingConfig
from decoder.draft_sources import ContextDraftSource, DraftSource, RetrieverDraftSource
from decoder.draft_tree import Draft, DraftTree
from decoder.errors import DecoderError, TokenizerMismatchError, UnsupportedModelError
from decoder.generator import (
    GenerationResult,
    GenerationStats,
    GenerationStream,
    RestGenerator,
    StreamChunk,
)
from decoder.model_support import load_model

__all__ = [
    "ContextDraftSource",
    "DecoderError",
    "DecodingConfig",
    "Draft",
    "DraftSource",
    "DraftTree",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "RestGenerator",
    "RetrieverDraftSource",
    "StreamChunk",
    "TokenizerMismatchError",
    "UnsupportedModelError",
    "load_model",
]
