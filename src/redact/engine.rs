//! The scan behind every surface: finds what to redact in a buffer and, for streams, how much
//! of the buffer is already final.
//!
//! One function serves whole buffers (`eof = true`) and stream prefixes (`eof = false`). For a
//! prefix it returns `safe`: the findings before `safe` are exactly those that `redact(whole
//! input)` makes there, whatever bytes follow, and no finding crosses it. The stream redactor
//! emits `buf[..safe]` and rescans the rest with the next chunk. `safe` is the largest offset
//! that satisfies all of:
//!
//! 1. no suffix starting before it is a proper prefix of a known pattern or of a detector
//!    anchor (`Prefixes::tail_start`), so every match that starts earlier is complete;
//! 2. every detector anchored before it has a final verdict (`Detectors::eval`);
//! 3. no known-value match and no detector extent (anchor to end of value) crosses it: the
//!    leftmost-longest automaton is then at rest there, and restarting it there reproduces the
//!    whole-buffer matches.

use super::detectors::{self, DetectorSet, Detectors, Eval, Wake};
use super::json_view::Escapes;
use super::known::{self, Prefixes};
use super::search::Searcher;
use std::sync::Arc;

// No Debug here or below: the automaton and prefixes hold every secret's spellings.
pub(crate) struct Engine {
    /// Shared by engines over the same held values (`with_detectors`).
    known: Option<Arc<Known>>,
    detectors: Option<(&'static Detectors, Prefixes, DetectorSet)>,
}

struct Known {
    automaton: Searcher,
    /// Pattern id -> index into `labels`.
    label_of: Vec<u32>,
    labels: Vec<String>,
    prefixes: Prefixes,
    /// The shortest pattern's length: a haystack shorter than it holds no match (most header
    /// names and values, the request path), so it is not walked at all.
    shortest: usize,
    /// Every spelling, ASCII-lower-cased, shortest first, for header names (which arrive
    /// lower-cased).
    lower: Vec<Vec<u8>>,
}

/// A byte range to replace, and with what label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) label: Label,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Label {
    Known(u32),
    Detector(usize),
}

pub(crate) struct Scan {
    /// Merged, sorted, non-overlapping; all end at or before `safe`.
    pub(crate) spans: Vec<Span>,
    pub(crate) safe: usize,
    /// Set when `safe` sits at a detector anchor whose verdict is pending: until a byte in
    /// `wake` arrives (or the buffer reaches its bound) a rescan cannot move `safe`.
    pub(crate) wake: Option<Wake>,
}

/// Which detector sets found a hit (known values count as the engine's own).
#[derive(Clone, Copy)]
struct Tier {
    own: bool,
    extra: bool,
}

#[derive(Clone, Copy)]
struct Hit {
    /// The offset whose finality decides this hit: its start for a known value, its anchor for
    /// a detector (whose value may start after a keyword).
    key: usize,
    start: usize,
    end: usize,
    label: Label,
    priority: usize,
    /// How far the hits folded into this one reach (see `push_merging`); `end` if none.
    reach: usize,
}

impl Engine {
    pub(crate) fn labels(&self) -> Vec<&str> {
        self.known
            .as_ref()
            .map(|k| k.labels.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    pub(crate) fn has_detectors(&self) -> bool {
        self.detectors.is_some()
    }

    /// An engine for every spelling of `held` (see `known.rs`), and the detectors if asked.
    pub(crate) fn new(held: Vec<(String, Vec<u8>)>, detectors: DetectorSet) -> Self {
        Self::with_spellings(held, detectors, known::spellings)
    }

    /// An engine for text that is already decoded (the joined deltas of an SSE stream): the raw
    /// values only, so that fewer endings of a delta look like the start of a secret.
    pub(crate) fn decoded(held: Vec<(String, Vec<u8>)>, detectors: DetectorSet) -> Self {
        Self::with_spellings(held, detectors, |v| vec![v.to_vec()])
    }

    fn with_spellings(
        held: Vec<(String, Vec<u8>)>,
        detectors: DetectorSet,
        spellings: fn(&[u8]) -> Vec<Vec<u8>>,
    ) -> Self {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut label_of = Vec::new();
        let mut labels = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (label, value) in held {
            let index = labels.len() as u32;
            let mut used = false;
            for p in spellings(&value) {
                // Two held secrets with one spelling: the first label wins.
                if seen.insert(p.clone()) {
                    patterns.push(p);
                    label_of.push(index);
                    used = true;
                }
            }
            if used {
                labels.push(label);
            }
        }
        let known = (!patterns.is_empty()).then(|| {
            let automaton = Searcher::new(&patterns);
            let shortest = patterns.iter().map(Vec::len).min().unwrap_or(0);
            let mut lower: Vec<Vec<u8>> = patterns.iter().map(|p| p.to_ascii_lowercase()).collect();
            lower.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
            lower.dedup();
            Arc::new(Known {
                automaton,
                label_of,
                labels,
                prefixes: Prefixes::new(patterns),
                shortest,
                lower,
            })
        });
        Engine {
            known,
            detectors: detector_parts(detectors),
        }
    }

    /// This engine's known values (shared, not rebuilt) with other detectors.
    pub(crate) fn with_detectors(&self, detectors: DetectorSet) -> Self {
        Engine {
            known: self.known.clone(),
            detectors: detector_parts(detectors),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.known.is_none() && self.detectors.is_none()
    }

    pub(crate) fn label(&self, label: Label) -> &str {
        match label {
            Label::Known(i) => self
                .known
                .as_ref()
                .map_or("known", |k| k.labels[i as usize].as_str()),
            // `find_with` may run detectors this engine does not.
            Label::Detector(d) => detectors::get().name(d),
        }
    }

    /// Whether a held secret occurs in `name` regardless of ASCII case. For short inputs only
    /// (header names): one search per spelling.
    pub(crate) fn holds_ignoring_case(&self, name: &[u8]) -> bool {
        let Some(k) = &self.known else {
            return false;
        };
        // Sorted by length: a name (usually a dozen bytes) is shorter than every spelling of a
        // held value (at least `MIN_KNOWN_LEN` bytes, usually far more), so this usually
        // compares no bytes at all.
        let fits = k.lower.partition_point(|p| p.len() <= name.len());
        if fits == 0 {
            return false;
        }
        let lowered;
        let name = if name.iter().any(u8::is_ascii_uppercase) {
            lowered = name.to_ascii_lowercase();
            &lowered[..]
        } else {
            name
        };
        k.lower[..fits]
            .iter()
            .any(|p| memchr::memmem::find(name, p).is_some())
    }

    /// The longest known pattern: one term of the stream hold-back bound.
    pub(crate) fn longest_known(&self) -> usize {
        self.known
            .as_ref()
            .map_or(0, |k| k.automaton.max_pattern_len())
    }

    /// Scans `buf`, whose first byte follows `prev` (nearest first) in the input. See the
    /// module doc.
    pub(crate) fn scan(&self, buf: &[u8], prev: [Option<u8>; 2], eof: bool) -> Scan {
        if eof && self.nothing_fits(buf, DetectorSet::NONE) {
            // What `collect` and `settle` make of it: no hit, all of it final.
            return Scan {
                spans: Vec::new(),
                safe: buf.len(),
                wake: None,
            };
        }
        self.scan_collected(buf, prev, eof)
    }

    /// [`Engine::scan`] without the short-buffer shortcut.
    fn scan_collected(&self, buf: &[u8], prev: [Option<u8>; 2], eof: bool) -> Scan {
        let mut safe = buf.len();
        let mut hits = Vec::new();
        let (escapes, pending) =
            self.collect(buf, prev, eof, DetectorSet::NONE, &mut safe, &mut |h, _| {
                hits.push(h)
            });
        settle(hits, safe, escapes, pending)
    }

    /// A whole buffer's findings in one pass: this engine's, and, merged apart, those of the
    /// detectors in `extra` (whether or not this engine runs them too). Equal to `scan` of an
    /// engine for each set: a whole buffer's findings are its hits merged, and a verdict does
    /// not depend on which other detectors ran (the request scan splits strong from generic
    /// findings this way instead of scanning twice).
    pub(crate) fn find_with(&self, buf: &[u8], extra: DetectorSet) -> (Vec<Span>, Vec<Span>) {
        if self.nothing_fits(buf, extra) {
            return (Vec::new(), Vec::new());
        }
        self.find_with_collected(buf, extra)
    }

    /// [`Engine::find_with`] without the short-buffer shortcut.
    fn find_with_collected(&self, buf: &[u8], extra: DetectorSet) -> (Vec<Span>, Vec<Span>) {
        let mut safe = buf.len();
        let mut own = Vec::new();
        let mut other = Vec::new();
        self.collect(buf, [None; 2], true, extra, &mut safe, &mut |h, tier| {
            if tier.extra {
                push_merging(&mut other, h);
            }
            if tier.own {
                push_merging(&mut own, h);
            }
        });
        (merge(own), merge(other))
    }

    /// Whether a whole buffer (`eof`) is certain to hold no finding of this engine's nor of the
    /// detectors in `extra`: shorter than every held spelling (so no known value fits, and
    /// its JSON view, no longer than it, is not looked at) and without a detector anchor
    /// (every detector verdict is made at one). `collect` would then hand out no hit and leave
    /// `safe` at the end; this answers without its set-up, for the short buffers that are
    /// most of what is scanned (header names and values, the request path).
    fn nothing_fits(&self, buf: &[u8], extra: DetectorSet) -> bool {
        if buf.len() >= super::search::SHORT_HAY
            || self.known.as_ref().is_some_and(|k| buf.len() >= k.shortest)
        {
            return false;
        }
        let own = self.detectors.as_ref().map_or(DetectorSet::NONE, |d| d.2);
        if own.union(extra).is_empty() {
            return true;
        }
        let d = self.detectors.as_ref().map_or_else(detectors::get, |d| d.0);
        !d.any_anchor(buf)
    }

    /// Every hit in `buf`, with the detectors of this engine and of `extra`, handed to `out`
    /// with which of the two sets found it; lowers `safe` for what a stream must hold back.
    /// Returns the JSON escapes of `buf` and the first anchor whose verdict is pending.
    fn collect(
        &self,
        buf: &[u8],
        prev: [Option<u8>; 2],
        eof: bool,
        extra: DetectorSet,
        safe: &mut usize,
        out: &mut dyn FnMut(Hit, Tier),
    ) -> (Option<Escapes>, Option<(usize, Wake)>) {
        let known_tier = Tier {
            own: true,
            extra: false,
        };
        // JSON escapes are only looked at for known values: a detector's formats have no
        // characters that JSON escapes.
        // A whole buffer shorter than every spelling needs none either: its view is no longer
        // than it, and at its end every escape is complete, so they cannot move `safe`.
        let escapes = self
            .known
            .as_ref()
            .filter(|k| !eof || buf.len() >= k.shortest)
            .and_then(|_| Escapes::of(buf, eof));
        if let Some(k) = &self.known {
            if !eof {
                *safe = (*safe).min(k.prefixes.tail_start(buf));
            }
            k.search(buf, &mut |pattern, start, end| {
                out(
                    Hit {
                        key: start,
                        start,
                        end,
                        label: Label::Known(k.label_of[pattern]),
                        priority: 0,
                        reach: end,
                    },
                    known_tier,
                );
            });
            if let Some(esc) = &escapes {
                if let Some(at) = esc.incomplete.filter(|_| !eof) {
                    *safe = (*safe).min(at);
                }
                if let Some(view) = esc.view(buf) {
                    if !eof {
                        *safe = (*safe).min(view.start_of(k.prefixes.tail_start(&view.bytes)));
                    }
                    k.search(&view.bytes, &mut |pattern, start, end| {
                        let start = view.start_of(start);
                        out(
                            Hit {
                                key: start,
                                start,
                                end: view.end_of(end),
                                label: Label::Known(k.label_of[pattern]),
                                priority: 0,
                                reach: view.end_of(end),
                            },
                            known_tier,
                        );
                    });
                }
            }
        }
        // The first anchor whose verdict is pending, and what could change it.
        let mut pending: Option<(usize, Wake)> = None;
        let own = self.detectors.as_ref().map_or(DetectorSet::NONE, |d| d.2);
        let set = own.union(extra);
        if set.is_empty() {
            return (escapes, pending);
        }
        let d = self.detectors.as_ref().map_or_else(detectors::get, |d| d.0);
        if let (Some((_, prefixes, _)), false) = (&self.detectors, eof) {
            *safe = (*safe).min(prefixes.tail_start(buf));
        }
        // Made at the first anchor: most buffers (header names and values, ordinary bodies)
        // have none, and the state is a few KiB to allocate and clear.
        let mut st = None;
        for (at, dets) in d.anchors(buf) {
            if at >= *safe {
                // Rescanned with the next chunk.
                break;
            }
            for &det in dets {
                if !set.has(det) {
                    continue;
                }
                match d.eval(st.get_or_insert_with(|| d.state()), det, buf, at, prev, eof) {
                    Eval::Pending(wake) => {
                        *safe = (*safe).min(at);
                        pending = Some(match pending {
                            Some((p, w)) if p == at => (p, w.merge(wake)),
                            Some(earlier) => earlier,
                            None => (at, wake),
                        });
                    }
                    Eval::Miss => {}
                    Eval::Hit(start, end) => out(
                        Hit {
                            key: at,
                            start,
                            end,
                            label: Label::Detector(det),
                            priority: 1 + d.priority(det),
                            reach: end,
                        },
                        Tier {
                            own: own.has(det),
                            extra: extra.has(det),
                        },
                    ),
                }
            }
        }
        (escapes, pending)
    }
}

impl Known {
    /// Every match in `hay` (see `Searcher::for_each`); none without a walk when `hay` is
    /// shorter than every pattern.
    fn search(&self, hay: &[u8], out: &mut dyn FnMut(usize, usize, usize)) {
        if hay.len() >= self.shortest {
            self.automaton.for_each(hay, out);
        }
    }
}

fn detector_parts(set: DetectorSet) -> Option<(&'static Detectors, Prefixes, DetectorSet)> {
    (!set.is_empty()).then(|| {
        let d = detectors::get();
        (d, Prefixes::new(d.literals.iter().cloned()), set)
    })
}

/// Settles `safe` and the spans of one scan (see the module doc).
fn settle(
    mut hits: Vec<Hit>,
    mut safe: usize,
    escapes: Option<Escapes>,
    pending: Option<(usize, Wake)>,
) -> Scan {
    // Where a pending verdict stopped the anchors: if only it (not a trailing prefix)
    // limited `safe`, a rescan cannot move `safe` until that verdict can change, whatever
    // earlier hits crossing it pulled `safe` back to.
    let limited_by_pending = pending.filter(|(at, _)| *at == safe);
    // Pull `safe` back until nothing crosses it and it falls between JSON escapes (so the
    // next scan tokenizes as this one did); it only moves left, so this ends.
    loop {
        if let Some(esc) = &escapes {
            safe = esc.boundary_at_or_before(safe);
        }
        let uncrossed = uncrossed(&mut hits, safe);
        if uncrossed == safe {
            break;
        }
        safe = uncrossed;
    }
    hits.retain(|h| h.key < safe);
    let wake = limited_by_pending.map(|(_, w)| w);
    Scan {
        spans: merge(hits),
        safe,
        wake,
    }
}

/// The largest offset `<= safe` that no hit keyed before it crosses (ends after it). Pulling
/// `safe` back to the earliest crossing key until nothing crosses reaches the same point (no
/// offset between a crossing key and `safe` can be free of it), but costs a pass per step;
/// this is one sort and one pass.
fn uncrossed(hits: &mut [Hit], safe: usize) -> usize {
    hits.sort_unstable_by_key(|h| h.key);
    let below = hits.partition_point(|h| h.key < safe);
    if hits[..below].iter().all(|h| h.end <= safe) {
        return safe;
    }
    // Otherwise the answer is the largest key that no earlier-keyed hit reaches past.
    let mut furthest = 0;
    let mut best = 0;
    let mut i = 0;
    while i < below {
        let key = hits[i].key;
        if furthest <= key {
            best = key;
        }
        while i < below && hits[i].key == key {
            furthest = furthest.max(hits[i].end);
            i += 1;
        }
    }
    best
}

/// Adds `h` to hits bound for `merge`, folded into the last one when it starts inside that
/// one's reach and after its start: `merge` would then put it in that one's span (every hit
/// sorted between them starts before `h`, so inside the span too) and never let it label the
/// span (it sorts later), so only its reach counts. Dense overlapping finds (a JWT every 12
/// bytes) then cost no memory and no sort.
fn push_merging(hits: &mut Vec<Hit>, h: Hit) {
    if let Some(last) = hits.last_mut() {
        if last.start < h.start && h.start < last.reach {
            last.reach = last.reach.max(h.reach);
            return;
        }
    }
    hits.push(h);
}

/// Overlapping findings become one span (a secret must not leak through the gap between two
/// partial redactions), labelled by the earliest, then longest, then highest-priority finding.
fn merge(mut hits: Vec<Hit>) -> Vec<Span> {
    // The usual case (a header, an ordinary body): no sort, no allocation.
    if hits.is_empty() {
        return Vec::new();
    }
    hits.sort_by(|a, b| {
        a.start
            .cmp(&b.start)
            .then(b.end.cmp(&a.end))
            .then(a.priority.cmp(&b.priority))
    });
    let mut spans: Vec<Span> = Vec::with_capacity(hits.len());
    for h in hits {
        match spans.last_mut() {
            Some(last) if h.start < last.end => last.end = last.end.max(h.reach),
            _ => spans.push(Span {
                start: h.start,
                end: h.reach,
                label: h.label,
            }),
        }
    }
    spans
}

#[cfg(test)]
mod uncrossed_tests {
    use super::*;

    fn hit(key: usize, end: usize) -> Hit {
        Hit {
            key,
            start: key,
            end,
            label: Label::Known(0),
            priority: 0,
            reach: end,
        }
    }

    /// The loop this replaced, kept as the definition.
    fn by_loop(hits: &[Hit], mut safe: usize) -> usize {
        loop {
            match hits
                .iter()
                .filter(|h| h.key < safe && h.end > safe)
                .map(|h| h.key)
                .min()
            {
                Some(k) => safe = k,
                None => return safe,
            }
        }
    }

    #[test]
    fn folding_hits_as_they_arrive_merges_as_merging_them_all() {
        let mut x: u64 = 11;
        let mut next = |m: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % m) as usize
        };
        for _ in 0..3000 {
            let n = next(12);
            let mut all = Vec::new();
            let mut folded = Vec::new();
            for _ in 0..n {
                let start = next(40);
                let end = start + next(15) + 1;
                let h = Hit {
                    key: start,
                    start,
                    end,
                    label: Label::Detector(next(4)),
                    priority: next(3),
                    reach: end,
                };
                all.push(h);
                push_merging(&mut folded, h);
            }
            assert_eq!(merge(folded), merge(all));
        }
    }

    #[test]
    fn uncrossed_agrees_with_the_pull_back_loop() {
        let mut x: u64 = 7;
        for _ in 0..2000 {
            let n = (x % 6) as usize;
            let mut hits = Vec::new();
            for _ in 0..n {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let key = (x >> 33) as usize % 40;
                let len = (x >> 20) as usize % 15 + 1;
                hits.push(hit(key, key + len));
            }
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let safe = (x >> 33) as usize % 50;
            let want = by_loop(&hits, safe);
            assert_eq!(uncrossed(&mut hits, safe), want);
        }
    }
}

#[cfg(test)]
mod short_tests {
    use super::*;
    use crate::redact::detectors::Class;

    /// Pieces of short buffers: every anchor literal and parts of them, keyword assignments,
    /// the held value and parts of it, token bytes and stop bytes.
    fn pieces(held: &[u8]) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = Vec::new();
        for l in &detectors::get().literals {
            out.push(l.clone());
            out.push(l[..l.len() / 2].to_vec());
            out.push(l[l.len() / 2..].to_vec());
        }
        for p in [
            "=", ":", ": ", "\"", " ", "\n", "-", "_", "/", "a1B2c3D4", "Zq9", "0", "x", "%2F",
            "\\u0041", "&amp;",
        ] {
            out.push(p.as_bytes().to_vec());
        }
        for p in known::spellings(held) {
            out.push(p[..p.len().min(12)].to_vec());
            out.push(p);
        }
        out
    }

    proptest::proptest! {
        /// The shortcut for short buffers answers exactly what the whole scan finds, in every
        /// set, with and without held values: whatever it calls empty is.
        #[test]
        fn short_buffers_find_what_the_whole_scan_finds(
            picks in proptest::collection::vec(proptest::num::usize::ANY, 0..8),
            with_held in proptest::bool::ANY,
            own_strong in proptest::bool::ANY,
        ) {
            let held = b"Hv7-qK2m".to_vec();
            let ps = pieces(&held);
            let mut buf = Vec::new();
            for p in picks {
                buf.extend_from_slice(&ps[p % ps.len()]);
            }
            let held = if with_held { vec![("k".to_string(), held)] } else { Vec::new() };
            let own = if own_strong { DetectorSet::class(Class::Strong) } else { DetectorSet::NONE };
            let engine = Engine::new(held, own);
            for extra in [
                DetectorSet::NONE,
                DetectorSet::class(Class::Generic),
                DetectorSet::class(Class::Strong),
                DetectorSet::ALL,
            ] {
                proptest::prop_assert_eq!(
                    engine.find_with(&buf, extra),
                    engine.find_with_collected(&buf, extra)
                );
            }
            let short = engine.scan(&buf, [None; 2], true);
            let whole = engine.scan_collected(&buf, [None; 2], true);
            proptest::prop_assert_eq!(
                (short.spans, short.safe, short.wake),
                (whole.spans, whole.safe, whole.wake)
            );
        }
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    proptest::proptest! {
        /// Header names: a held spelling found in any ASCII case, in names shorter and longer
        /// than the spellings, as lower-casing the name and searching every spelling finds it.
        #[test]
        fn holds_ignoring_case_agrees_with_searching_every_spelling(
            value in proptest::collection::vec(proptest::sample::select(&b"aB3-x_Z/+="[..]), 8..24),
            pieces in proptest::collection::vec((0usize..3, 0usize..30, proptest::bool::ANY), 0..6),
        ) {
            let engine = Engine::new(vec![("k".into(), value.clone())], DetectorSet::NONE);
            let spellings = known::spellings(&value);
            let mut name = Vec::new();
            for (kind, n, upper) in pieces {
                let piece: Vec<u8> = match kind {
                    0 => b"x-header-".iter().copied().cycle().take(n).collect(),
                    1 => spellings[n % spellings.len()].clone(),
                    _ => spellings[n % spellings.len()][..n % 8].to_vec(),
                };
                name.extend(piece.iter().map(|b| if upper { b.to_ascii_uppercase() } else { *b }));
            }
            let lowered = name.to_ascii_lowercase();
            let want = spellings.iter().any(|p| {
                memchr::memmem::find(&lowered, &p.to_ascii_lowercase()).is_some()
            });
            proptest::prop_assert_eq!(engine.holds_ignoring_case(&name), want);
        }
    }
}
