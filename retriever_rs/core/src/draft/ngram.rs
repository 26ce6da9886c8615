//! Incremental n-gram indexes: where did the context's last n tokens occur before, and what came
//! after them? (The reference: `decoder.ngram_index`.)
//!
//! `NgramIndex` holds a growing buffer of documents and, for every n-gram of 1..`max_n` tokens,
//! the positions right after its occurrences. The n-grams are kept as a trie of reversed
//! n-grams: the node of `(a, b, c)` is reached from the root by `c`, then `b`, then `a`, so one
//! walk back from the end of a context finds the occurrences of all its suffixes at once, and
//! appending a token adds its position to the nodes of the n-grams it ends (one walk back too).
//! `ServedOutputs` is a few such indexes over the outputs served before, bounded in tokens.

use rustc_hash::FxHashMap;

/// Separator between documents, and what reads past the end: no token.
pub const PAD: i64 = -1;

/// Where each n-gram of 1..`max_n` tokens occurs in a growing buffer of documents.
///
/// An occurrence is recorded as the position right after the n-gram, once a token is there: the
/// n-gram that ends the buffer has nothing to continue yet. N-grams never span two documents.
#[derive(Clone, Debug)]
pub struct NgramIndex {
    max_n: usize,
    buffer: Vec<i64>,
    /// (node, token) -> child: node 0 is the root (the empty n-gram).
    children: FxHashMap<(u32, i64), u32>,
    /// positions[node - 1]: the positions after the node's n-gram, oldest first.
    positions: Vec<Vec<u32>>,
    /// Where the current document starts.
    document_start: usize,
}

impl NgramIndex {
    pub fn new(max_n: usize) -> Self {
        assert!(max_n >= 1, "max_n must be >= 1");
        NgramIndex {
            max_n,
            buffer: Vec::new(),
            children: FxHashMap::default(),
            positions: Vec::new(),
            document_start: 0,
        }
    }

    pub fn max_n(&self) -> usize {
        self.max_n
    }

    /// Tokens held, document separators included.
    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffer.is_empty()
    }

    /// The tokens held (separators are `PAD`).
    pub fn buffer(&self) -> &[i64] {
        &self.buffer
    }

    /// Append `tokens` to the current document.
    pub fn extend(&mut self, tokens: &[i64]) {
        self.buffer.reserve(tokens.len());
        for &token in tokens {
            let position = self.buffer.len();
            // The n-grams ending just before `position`, inside the current document, now have
            // a continuation: `token`.
            let start = position.saturating_sub(self.max_n).max(self.document_start);
            let mut node = 0u32;
            for back in (start..position).rev() {
                node = self.child_or_new(node, self.buffer[back]);
                self.positions[node as usize - 1].push(position as u32);
            }
            self.buffer.push(token);
        }
    }

    /// Close the current document: what is appended next starts a new one.
    pub fn end_document(&mut self) {
        self.buffer.push(PAD);
        self.document_start = self.buffer.len();
    }

    fn child_or_new(&mut self, node: u32, token: i64) -> u32 {
        let next = self.positions.len() as u32 + 1;
        let child = *self.children.entry((node, token)).or_insert(next);
        if child == next {
            self.positions.push(Vec::new());
        }
        child
    }

    /// The occurrences of each suffix of `context` up to `max_n` tokens: `out[n - 1]` holds the
    /// positions after the n-token suffix, oldest first (empty when it never occurred); shorter
    /// than `max_n` when a suffix of that length never occurred (nor can a longer one).
    pub fn suffix_positions<'a>(&'a self, context: &[i64], out: &mut Vec<&'a [u32]>) {
        out.clear();
        let mut node = 0u32;
        for &token in context.iter().rev().take(self.max_n) {
            match self.children.get(&(node, token)) {
                Some(&child) => {
                    node = child;
                    out.push(&self.positions[node as usize - 1]);
                }
                None => break,
            }
        }
    }

    /// Up to `depth` tokens from `position` on (fewer at the end of the buffer; a row ends at its
    /// document's end, where the buffer holds `PAD`).
    pub fn row(&self, position: u32, depth: usize) -> &[i64] {
        let start = (position as usize).min(self.buffer.len());
        let end = start.saturating_add(depth).min(self.buffer.len());
        &self.buffer[start..end]
    }
}

/// The outputs a generator has served, as n-gram indexes holding at most `max_tokens` tokens: a
/// new output goes to the newest of a few segments, and once the total passes the cap the oldest
/// segment is dropped whole (an output longer than the cap keeps its end).
#[derive(Clone, Debug)]
pub struct ServedOutputs {
    max_n: usize,
    max_tokens: usize,
    segment_tokens: usize,
    /// Oldest first.
    segments: Vec<NgramIndex>,
}

impl ServedOutputs {
    pub fn new(max_n: usize, max_tokens: usize, segments: usize) -> Self {
        assert!(max_tokens >= 1 && segments >= 1, "max_tokens and segments must be >= 1");
        ServedOutputs { max_n, max_tokens, segment_tokens: (max_tokens / segments).max(1), segments: Vec::new() }
    }

    pub fn max_n(&self) -> usize {
        self.max_n
    }

    /// Tokens held, document separators included.
    pub fn tokens(&self) -> usize {
        self.segments.iter().map(NgramIndex::len).sum()
    }

    /// Remember one served output (the prompt is not part of it).
    pub fn add(&mut self, output: &[i64]) {
        let output = &output[output.len().saturating_sub(self.max_tokens - 1)..];
        if output.is_empty() {
            return;
        }
        let full = self.segments.last().is_none_or(|s| s.len() + output.len() + 1 > self.segment_tokens);
        if full {
            self.segments.push(NgramIndex::new(self.max_n));
        }
        let newest = self.segments.last_mut().expect("a segment");
        newest.extend(output);
        newest.end_document();
        while self.tokens() > self.max_tokens {
            self.segments.remove(0);
        }
    }

    pub fn clear(&mut self) {
        self.segments.clear();
    }

    /// The segments, newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &NgramIndex> {
        self.segments.iter().rev()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn positions(index: &NgramIndex, context: &[i64]) -> Vec<Vec<u32>> {
        let mut out = Vec::new();
        index.suffix_positions(context, &mut out);
        out.iter().map(|p| p.to_vec()).collect()
    }

    #[test]
    fn occurrences_are_recorded_once_a_token_follows() {
        let mut index = NgramIndex::new(2);
        index.extend(&[1, 2, 1, 2]);
        // 2 is followed at position 2 only (the last 2 ends the buffer); 1 2 likewise.
        assert_eq!(positions(&index, &[1, 2]), vec![vec![2], vec![2]]);
        assert_eq!(positions(&index, &[9, 1]), vec![vec![1, 3]]);
        index.extend(&[5]);
        assert_eq!(positions(&index, &[1, 2]), vec![vec![2, 4], vec![2, 4]]);
        assert_eq!(index.row(2, 10), &[1, 2, 5]);
    }

    #[test]
    fn ngrams_never_span_two_documents() {
        let mut index = NgramIndex::new(3);
        index.extend(&[1, 2]);
        index.end_document();
        index.extend(&[3, 4]);
        assert_eq!(positions(&index, &[2, 3]), vec![vec![4]]); // 3 -> 4; 2 3 never occurred
        assert_eq!(positions(&index, &[1, 2]), Vec::<Vec<u32>>::new()); // 2 ended its document
        assert_eq!(index.row(1, 5), &[2, PAD, 3, 4]);
    }

    #[test]
    fn served_outputs_drop_the_oldest_segment_past_the_cap() {
        let mut served = ServedOutputs::new(2, 8, 2);
        served.add(&[1, 2, 3]);
        served.add(&[4, 5, 6]); // a segment holds 4 tokens: a second one
        assert_eq!(served.tokens(), 8);
        served.add(&[7, 8]); // 11 > 8: the oldest segment goes
        assert_eq!(served.tokens(), 7);
        let newest: Vec<&[i64]> = served.newest_first().map(|s| s.buffer()).collect();
        assert_eq!(newest, vec![&[7, 8, PAD][..], &[4, 5, 6, PAD][..]]);
        served.add(&(0..20).collect::<Vec<i64>>()); // longer than the cap: its end
        assert_eq!(served.tokens(), 8);
    }
}
