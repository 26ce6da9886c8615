//! Drafting: one decoding step's draft tree, from every source's levels, in one call.
//!
//! The decoder's draft sources (the sequence's own context, the outputs served before, the
//! datastore) each answer with *levels*: for a suffix of the context that they matched, the
//! continuations that followed it, counted. `score` merges a step's levels into one trie and
//! scores every node by chain back-off; `ngram` keeps the n-gram indexes of the context and of the
//! served outputs, extended as tokens arrive instead of rebuilt; `drafter` does a whole step (the
//! context source, the served outputs, the datastore's back-off levels, levels given from outside,
//! the scoring and the budget cut) for one generation.
//!
//! The Python package keeps the reference implementation of the same rules
//! (`decoder.draft_tree`, `decoder.draft_sources`, `decoder.ngram_index`); property tests compare
//! the two.

pub mod drafter;
pub mod ngram;
pub mod score;

pub use drafter::{Drafter, NgramParams, RetrievalParams};
pub use ngram::{NgramIndex, ServedOutputs};
pub use score::{DraftTree, Level, LevelCounts, Scorer};
