//! The known-value search for many patterns: a skip-based multi-literal search (Wu–Manber).
//!
//! Past about a hundred patterns aho-corasick leaves its SIMD prefilter and every automaton
//! walks each byte (0.2–0.6 GiB/s here). Held spellings are long (at least
//! [`MIN_KNOWN_LEN`](super::known::MIN_KNOWN_LEN) bytes), which a skip search exploits: look
//! at a window of the `window` bytes where a match could start, hash its last [`BLOCK`]
//! bytes, and if no pattern has that block anywhere in its first `window` bytes, no match
//! starts at any offset whose window holds it, so the window moves by the precomputed
//! distance. On text unlike the held values (words, JSON punctuation) most blocks occur in no
//! pattern and the search reads one block every `window - BLOCK + 1` bytes. Where the shift is
//! zero, the patterns whose window ends in that block are checked at that offset, longest
//! first, with their first 8 bytes compared as one word before the rest.
//!
//! Probing window by window is a chain of dependent loads (the next probe's offset is this
//! probe's result), so a cheaper test runs first, with independent probes: every
//! `stride = window - BLOCK + 1` bytes, is the block there one of the blocks at any offset of
//! any pattern's window (a bit set)? A match's window always holds the block at the next
//! multiple of `stride` at or after its start, so where that block is in no window, no match
//! starts in the `stride` offsets before it, and only where it is do the window probes run, over
//! those offsets.
//!
//! Matches are reported as a leftmost-longest automaton reports them: offsets are visited in
//! order, the first offset where some pattern matches gives the match (the longest pattern
//! there; patterns are distinct, so it is unique), and the search resumes at its end.

/// Bytes hashed per probe. Four bytes of random base62 are rarely all in text, while a space,
/// a quote or a brace in the block (no held key has one) puts it in a slot no pattern fills.
const BLOCK: usize = 4;
/// log2 of the shift table's size (one byte per slot: 64 KiB, in L2).
const BITS: u32 = 16;
/// A longer window allows longer skips but puts more blocks in the tables, which then rule out
/// less; past this the second effect wins.
const MAX_WINDOW: usize = 32;
/// log2 of the block set's size in bits (32 KiB, in L1).
const SET_BITS: u32 = 18;

/// The searcher. No `Debug`: it holds every secret's spellings.
pub(crate) struct Many {
    patterns: Vec<Vec<u8>>,
    /// Bytes of each candidate start that the shift table covers: the shortest pattern, capped.
    window: usize,
    /// How far the window may move when its last block hashes to a slot.
    shift: Vec<u8>,
    /// A bit per hash of every block at any offset of any pattern's window.
    blocks: Vec<u64>,
    /// For each slot, where its candidates start in `entries` (`TABLE + 1` offsets).
    starts: Vec<u32>,
    /// Candidates (first 8 bytes, pattern id) of each slot, longest pattern first.
    entries: Vec<(u64, u32)>,
    longest: usize,
}

const TABLE: usize = 1 << BITS;

#[inline(always)]
fn slot(block: u32) -> usize {
    (block.wrapping_mul(0x9E37_79B1) >> (32 - BITS)) as usize
}

#[inline(always)]
fn set_slot(block: u32) -> usize {
    (block.wrapping_mul(0x85EB_CA6B) >> (32 - SET_BITS)) as usize
}

#[inline(always)]
fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

#[inline(always)]
fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

impl Many {
    /// A searcher for `patterns` (distinct), or `None` when one is shorter than 8 bytes (the
    /// word compare and the block need that much; held spellings always have it).
    pub(crate) fn new(patterns: &[Vec<u8>]) -> Option<Self> {
        let shortest = patterns.iter().map(Vec::len).min()?;
        if shortest < 8 {
            return None;
        }
        let window = shortest.min(MAX_WINDOW);
        let max_shift = u8::try_from(window - BLOCK + 1).ok()?;
        let mut shift = vec![max_shift; TABLE];
        let mut counts = vec![0u32; TABLE + 1];
        let mut blocks = vec![0u64; 1 << (SET_BITS - 6)];
        for p in patterns {
            for end in BLOCK..=window {
                let b = set_slot(read_u32(p, end - BLOCK));
                blocks[b / 64] |= 1 << (b % 64);
                let s = slot(read_u32(p, end - BLOCK));
                // Distance from this block's end to the window's end.
                let d = (window - end) as u8;
                shift[s] = shift[s].min(d);
            }
            counts[slot(read_u32(p, window - BLOCK))] += 1;
        }
        let mut starts = vec![0u32; TABLE + 1];
        let mut total = 0u32;
        for (i, c) in counts.iter().enumerate().take(TABLE) {
            starts[i] = total;
            total += c;
        }
        starts[TABLE] = total;
        let mut order: Vec<usize> = (0..patterns.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(patterns[i].len()));
        let mut fill = starts.clone();
        let mut entries = vec![(0u64, 0u32); total as usize];
        for i in order {
            let p = &patterns[i];
            let s = slot(read_u32(p, window - BLOCK));
            entries[fill[s] as usize] = (read_u64(p, 0), i as u32);
            fill[s] += 1;
        }
        Some(Many {
            patterns: patterns.to_vec(),
            window,
            shift,
            blocks,
            starts,
            entries,
            longest: patterns.iter().map(Vec::len).max().unwrap_or(0),
        })
    }

    pub(crate) fn max_pattern_len(&self) -> usize {
        self.longest
    }

    #[inline(always)]
    fn in_some_window(&self, hay: &[u8], at: usize) -> bool {
        let b = set_slot(read_u32(hay, at));
        self.blocks[b / 64] & (1 << (b % 64)) != 0
    }

    /// Every leftmost-longest match in `hay`, in order: (pattern id, start, end).
    pub(crate) fn for_each(&self, hay: &[u8], out: &mut dyn FnMut(usize, usize, usize)) {
        let w = self.window;
        if hay.len() < w {
            return;
        }
        // The last offset whose window fits; every pattern is at least `w` long.
        let last = hay.len() - w;
        let stride = w - BLOCK + 1;
        // The block at `q` decides the starts `q + 1 - stride ..= q`; the last start needs
        // `q <= last + stride - 1 = hay.len() - BLOCK`, so every block read is in bounds.
        let end = hay.len() - BLOCK;
        // No match may start before `at` (the end of the last one).
        let mut at = 0;
        let mut q = 0;
        while q <= end {
            // Four independent probes at a time: the loads overlap.
            if q + 3 * stride <= end
                && !(self.in_some_window(hay, q)
                    | self.in_some_window(hay, q + stride)
                    | self.in_some_window(hay, q + 2 * stride)
                    | self.in_some_window(hay, q + 3 * stride))
            {
                q += 4 * stride;
                continue;
            }
            if self.in_some_window(hay, q) {
                let lo = at.max(q.saturating_sub(stride - 1));
                at = self.walk(hay, lo, q.min(last), at, out);
            }
            q += stride;
        }
    }

    /// The window walk over the starts `lo..=hi`; returns where the next match may start.
    fn walk(
        &self,
        hay: &[u8],
        lo: usize,
        hi: usize,
        mut at: usize,
        out: &mut dyn FnMut(usize, usize, usize),
    ) -> usize {
        let w = self.window;
        let mut p = lo;
        while p <= hi {
            let s = slot(read_u32(hay, p + w - BLOCK));
            let d = self.shift[s];
            if d != 0 {
                p += usize::from(d);
                continue;
            }
            match self.verify(hay, p, s) {
                Some((id, len)) => {
                    out(id, p, p + len);
                    p += len;
                    at = p;
                }
                None => p += 1,
            }
        }
        at
    }

    /// The longest pattern of slot `s` that starts at `at`.
    #[inline]
    fn verify(&self, hay: &[u8], at: usize, s: usize) -> Option<(usize, usize)> {
        let head = read_u64(hay, at);
        let (from, to) = (self.starts[s] as usize, self.starts[s + 1] as usize);
        for &(first, id) in &self.entries[from..to] {
            if first != head {
                continue;
            }
            let p = &self.patterns[id as usize];
            if hay[at..].starts_with(p) {
                return Some((id as usize, p.len()));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: at each offset in order, the longest pattern there; resume at its end.
    fn naive(patterns: &[Vec<u8>], hay: &[u8]) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < hay.len() {
            let best = patterns
                .iter()
                .enumerate()
                .filter(|(_, p)| hay[at..].starts_with(p))
                .max_by_key(|(_, p)| p.len());
            match best {
                Some((id, p)) => {
                    out.push((id, at, at + p.len()));
                    at += p.len();
                }
                None => at += 1,
            }
        }
        out
    }

    fn library(patterns: &[Vec<u8>], hay: &[u8]) -> Vec<(usize, usize, usize)> {
        aho_corasick::AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(patterns)
            .unwrap()
            .find_iter(hay)
            .map(|m| (m.pattern().as_usize(), m.start(), m.end()))
            .collect()
    }

    fn distinct(mut v: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let mut seen = std::collections::HashSet::new();
        v.retain(|p| seen.insert(p.clone()));
        v
    }

    #[test]
    fn short_patterns_are_left_to_the_automaton() {
        assert!(Many::new(&[b"abcdefg".to_vec(), b"abcdefghij".to_vec()]).is_none());
        assert!(Many::new(&[]).is_none());
    }

    #[test]
    fn prefix_patterns_report_the_longest_and_resume_after_it() {
        let pats = vec![
            b"abcdefgh".to_vec(),
            b"abcdefghijkl".to_vec(),
            b"ijklmnopqr".to_vec(),
        ];
        let m = Many::new(&pats).unwrap();
        let hay = b"xxabcdefghijklmnopqr abcdefghij ijklmnopqr";
        let mut got = Vec::new();
        m.for_each(hay, &mut |p, a, b| got.push((p, a, b)));
        assert_eq!(got, naive(&pats, hay));
        assert_eq!(got, vec![(1, 2, 14), (0, 21, 29), (2, 32, 42)]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(120))]
        /// Random literal sets over a small alphabet (so they share prefixes, overlap and
        /// contain each other) find what the naive definition and the library find.
        #[test]
        fn skip_search_finds_what_leftmost_longest_finds(
            seeds in proptest::collection::vec(
                proptest::collection::vec(proptest::sample::select(&b"abcZ9"[..]), 8..24), 1..40),
            derived in proptest::collection::vec((0usize..40, 0usize..6, 0usize..6), 0..40),
            pieces in proptest::collection::vec((0usize..80, 0usize..40, 0usize..3), 0..60),
        ) {
            // Derived patterns: prefixes, suffix-extensions and shifted cuts of the seeds.
            let mut pats = seeds.clone();
            for (i, cut, ext) in derived {
                let s = &seeds[i % seeds.len()];
                let mut p = s[cut.min(s.len() - 8)..].to_vec();
                p.extend(s.iter().take(ext));
                pats.push(p);
            }
            let pats = distinct(pats);
            let mut hay = Vec::new();
            for (i, gap, how) in pieces {
                let fill: &[u8] = if how == 0 { b"abc Z9 " } else { b"cab9Zc" };
                hay.extend(fill.iter().cycle().take(gap));
                if let Some(p) = pats.get(i) {
                    let cut = if how == 2 { p.len() / 2 } else { p.len() };
                    hay.extend_from_slice(&p[..cut]);
                }
            }
            let m = Many::new(&pats).unwrap();
            let mut got = Vec::new();
            m.for_each(&hay, &mut |p, a, b| got.push((p, a, b)));
            let want = naive(&pats, &hay);
            proptest::prop_assert_eq!(&got, &want);
            proptest::prop_assert_eq!(got, library(&pats, &hay));
        }
    }
}
