//! Cooperative cancellation of a search: a deadline, a flag the caller may set, or both.
//!
//! The engine's loops (the best-first growth of the exact policy, the occurrence walk of the
//! REST policy) ask `is_cancelled` every so often and give the search up when it says yes, so a
//! search whose deadline passed or whose caller went away stops costing CPU within a fraction of
//! a millisecond.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug, Default)]
pub struct Cancel {
    deadline: Option<Instant>,
    flag: Option<Arc<AtomicBool>>,
}

impl Cancel {
    /// Never cancelled.
    pub fn never() -> Self {
        Cancel::default()
    }

    /// Cancelled from `deadline` on (none: never).
    pub fn at(deadline: Option<Instant>) -> Self {
        Cancel { deadline, flag: None }
    }

    /// Also cancelled once `flag` is set.
    pub fn with_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.flag = Some(flag);
        self
    }

    /// Whether the search should stop now (reads the clock when there is a deadline).
    #[inline]
    pub fn is_cancelled(&self) -> bool {
        self.flag.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
            || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    pub fn can_cancel(&self) -> bool {
        self.deadline.is_some() || self.flag.is_some()
    }
}
