//! rest-retriever: the suffix-array datastore of retrieval-based speculative decoding.
//!
//! Given a context, which continuations follow its longest matching suffix, and how often?
//! `build` writes datastores, `Datastore::open` maps them, `Datastore::search` answers;
//! `SearchSession` answers the searches of one decoding session, whose contexts extend each other.

pub mod build;
pub mod cancel;
pub mod datastore;
pub mod draft;
pub mod error;
pub mod format;
mod mmap;
pub mod rest_policy;
pub mod scrub;
pub mod search;
pub mod search_index;
pub mod session;
pub mod shard;
pub mod watch;

pub use build::{BuildOptions, Builder};
pub use cancel::Cancel;
pub use datastore::{Datastore, Found, FoundLevels, OpenOptions, Policy, Query};
pub use error::{Error, Result};
pub use search::Tree;
pub use session::SearchSession;
pub use watch::{ShardChange, Watching};
