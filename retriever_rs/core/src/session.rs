//! Search sessions: one per decoding session, for searches whose contexts extend each other.
//!
//! A decoder searches once per step, and each step's context is the last one plus the tokens
//! the step accepted. A `SearchSession` keeps a remembering `Searcher` (see `search`): the
//! patterns the last search probed, with their suffix-array intervals, so that the next search
//! narrows those intervals by the new tokens instead of searching the whole suffix array again.
//! Its answers are exactly the stateless `Datastore::search_levels` answers for every context,
//! extended or not; only their cost differs.
//!
//! Remembered intervals belong to the mappings of the shards they were found in: a search that
//! covers other shards (another selection, a shard gone out of service or reopened) starts
//! afresh (`Searcher::bind`).

use crate::cancel::Cancel;
use crate::datastore::{Datastore, FoundLevels, Query};
use crate::error::Result;
use crate::search::{Searcher, Tree};

/// The searches of one decoding session, on any datastore (a session searching another one
/// starts afresh). Not for sharing between threads: one per session.
pub struct SearchSession {
    searcher: Searcher,
}

impl Default for SearchSession {
    fn default() -> Self {
        Self::new()
    }
}

impl SearchSession {
    pub fn new() -> Self {
        SearchSession { searcher: Searcher::remembering() }
    }

    /// `ds.search_levels(...)`, answered with what this session remembers.
    pub fn search_levels(
        &mut self,
        ds: &Datastore,
        context: &[i64],
        q: &Query,
        levels: usize,
        only: Option<&[String]>,
    ) -> Result<Vec<Tree>> {
        let found = self.search_levels_cancellable(ds, context, q, levels, only, &Cancel::never())?;
        Ok(found.expect("a search that cannot be cancelled always finishes").trees)
    }

    /// `ds.search_levels_cancellable(...)`, answered with what this session remembers.
    pub fn search_levels_cancellable(
        &mut self,
        ds: &Datastore,
        context: &[i64],
        q: &Query,
        levels: usize,
        only: Option<&[String]>,
        cancel: &Cancel,
    ) -> Result<Option<FoundLevels>> {
        let result = ds.search_with(&mut self.searcher, context, q, levels, only, cancel);
        if result.is_err() {
            self.searcher.forget();
        }
        result
    }

    /// Forgets what the session remembers (the next search starts afresh).
    pub fn forget(&mut self) {
        self.searcher.forget();
    }
}
