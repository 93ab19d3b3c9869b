//! The known-value search: every leftmost-longest match, as `AhoCorasick::find_iter` reports
//! them, but with the prefilter consulted only where its candidates are sparse.
//!
//! The prefilter (rare bytes of the held values' spellings) is what keeps an ordinary body at
//! several GiB/s. Where its candidates are dense (the bytes it looks for are everywhere, as in
//! `token: Zx9!` repeated against held values full of `Zq9`), every candidate costs a prefilter
//! call that skips a few bytes, which is slower than walking the DFA byte by byte. So after a
//! short hop the search walks without it for [`WALK`] bytes, then asks it again. Either way the
//! automaton decides every match, so what is found does not depend on the mode (a prefilter
//! only skips bytes where no match can start).

use aho_corasick::automaton::{Automaton, Candidate, StateID};
use aho_corasick::{dfa, AhoCorasick, Anchored, MatchKind, Span};

use super::many::Many;

/// From this many patterns on, aho-corasick's SIMD prefilter (Teddy) is gone and the skip
/// search (`many.rs`) is faster; below, Teddy is several times faster than it.
const MANY_FROM: usize = 64;

/// A prefilter hop shorter than this costs more than walking the bytes it skips.
const SHORT_HOP: usize = 32;
/// Bytes walked without the prefilter after a short hop.
const WALK: usize = 256;
/// Fewer bytes than this are walked without the prefilter: below its SIMD minimum (19 bytes
/// for Fat Teddy) the library's prefilter falls back on Rabin-Karp, which costs more per byte
/// than the walk (header names and values, the end of every buffer).
pub(crate) const SHORT_HAY: usize = 32;

/// A leftmost-longest searcher over a set of patterns.
pub(crate) enum Searcher {
    /// The common case: a DFA whose transitions this module walks itself, and its unanchored
    /// start state.
    Dfa(Box<dfa::DFA>, StateID),
    /// Many long patterns: the skip search.
    Many(Box<Many>),
    /// Pattern sets too large for a DFA: the library's own search.
    Other(AhoCorasick),
}

impl Searcher {
    /// A DFA when it stays small: with many patterns the SIMD prefilter drops out and the DFA
    /// is then several times faster than the NFA on the no-match path.
    pub(crate) fn new(patterns: &[Vec<u8>]) -> Self {
        // Invariant: patterns are non-empty and bounded (every held value is at most 64 KiB,
        // `secret::source`), so the default automaton, which has no size limit short of
        // memory, always builds; only the DFA can refuse, and then it is skipped.
        if patterns.len() >= MANY_FROM {
            if let Some(m) = Many::new(patterns) {
                return Searcher::Many(Box::new(m));
            }
        }
        let total: usize = patterns.iter().map(Vec::len).sum();
        if total <= 256 * 1024 {
            if let Ok(d) = dfa::DFA::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(patterns)
            {
                if let Ok(start) = d.start_state(Anchored::No) {
                    return Searcher::Dfa(Box::new(d), start);
                }
            }
        }
        Searcher::Other(
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(patterns)
                .expect("known-value automaton from bounded patterns"),
        )
    }

    pub(crate) fn max_pattern_len(&self) -> usize {
        match self {
            Searcher::Dfa(d, _) => d.max_pattern_len(),
            Searcher::Many(m) => m.max_pattern_len(),
            Searcher::Other(a) => a.max_pattern_len(),
        }
    }

    /// Every match in `hay`, in order: (pattern id, start, end).
    pub(crate) fn for_each(&self, hay: &[u8], out: &mut dyn FnMut(usize, usize, usize)) {
        match self {
            Searcher::Dfa(d, start) => walk(d, *start, hay, out),
            Searcher::Many(m) => m.for_each(hay, out),
            Searcher::Other(a) => {
                for m in a.find_iter(hay) {
                    out(m.pattern().as_usize(), m.start(), m.end());
                }
            }
        }
    }
}

/// `find_iter` of a leftmost-longest DFA (the loop of the library's `try_find_fwd`, restarted
/// at each match's end), with the prefilter skipped inside a dense stretch.
fn walk(aut: &dfa::DFA, start: StateID, hay: &[u8], out: &mut dyn FnMut(usize, usize, usize)) {
    let pre = aut.prefilter();
    // Below this offset the prefilter is not asked (a dense stretch).
    let mut quiet_until = 0;
    // Asks the prefilter for the first candidate at or after `from`; notes a short hop.
    let ask = |from: usize, quiet_until: &mut usize| -> Candidate {
        match pre {
            Some(pre) if from >= *quiet_until && hay.len() - from >= SHORT_HAY => {
                let c = pre.find_in(hay, Span::from(from..hay.len()));
                if let Candidate::PossibleStartOfMatch(i) = c {
                    if i - from < SHORT_HOP {
                        *quiet_until = i + WALK;
                    }
                }
                c
            }
            _ => Candidate::PossibleStartOfMatch(from),
        }
    };
    let mut at = 0;
    while at < hay.len() {
        // One leftmost-longest search from `at`.
        match ask(at, &mut quiet_until) {
            Candidate::None => return,
            Candidate::Match(m) => {
                out(m.pattern().as_usize(), m.start(), m.end());
                at = m.end();
                continue;
            }
            Candidate::PossibleStartOfMatch(i) => at = i,
        }
        let mut sid = start;
        let mut found: Option<(usize, usize, usize)> = None;
        while at < hay.len() {
            sid = aut.next_state(Anchored::No, sid, hay[at]);
            at += 1;
            if aut.is_special(sid) {
                if aut.is_dead(sid) {
                    break;
                } else if aut.is_match(sid) {
                    let pid = aut.match_pattern(sid, 0);
                    found = Some((pid.as_usize(), at - aut.pattern_len(pid), at));
                } else {
                    // The start state (special only when there is a prefilter): no match
                    // in progress, so skipping to the next candidate loses nothing.
                    match ask(at, &mut quiet_until).into_option() {
                        None => return,
                        Some(i) => at = i,
                    }
                }
            }
        }
        match found {
            Some((pid, s, e)) => {
                out(pid, s, e);
                at = e;
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn library(patterns: &[Vec<u8>], hay: &[u8]) -> Vec<(usize, usize, usize)> {
        AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(patterns)
            .unwrap()
            .find_iter(hay)
            .map(|m| (m.pattern().as_usize(), m.start(), m.end()))
            .collect()
    }

    #[test]
    fn many_long_patterns_take_the_skip_search_and_short_ones_the_automaton() {
        let long: Vec<Vec<u8>> = (0..MANY_FROM)
            .map(|i| format!("held-value-{i:04}-xyz").into_bytes())
            .collect();
        assert!(matches!(Searcher::new(&long), Searcher::Many(_)));
        let mut short = long.clone();
        short.push(b"seven77".to_vec());
        assert!(matches!(Searcher::new(&short), Searcher::Dfa(..)));
        assert!(matches!(Searcher::new(&long[..3]), Searcher::Dfa(..)));
    }

    proptest::proptest! {
        /// The walk finds exactly what the library's `find_iter` finds, on haystacks where
        /// prefilter candidates are dense, sparse, and both in turn.
        #[test]
        fn walk_finds_what_find_iter_finds(
            patterns in proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(&b"abcZq9-"[..]), 1..8), 1..6),
            pieces in proptest::collection::vec((0usize..8, 0usize..120), 0..40),
        ) {
            let mut hay = Vec::new();
            for (p, gap) in pieces {
                let fill: &[u8] = if gap % 3 == 0 { b"Zx9q" } else { b"......." };
                hay.extend(fill.iter().cycle().take(gap));
                if let Some(pat) = patterns.get(p) {
                    let cut = if gap % 4 == 0 { pat.len() - 1 } else { pat.len() };
                    hay.extend_from_slice(&pat[..cut]);
                }
            }
            let s = Searcher::new(&patterns);
            let mut got = Vec::new();
            s.for_each(&hay, &mut |p, a, b| got.push((p, a, b)));
            proptest::prop_assert_eq!(got, library(&patterns, &hay));
        }
    }
}
