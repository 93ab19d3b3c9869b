//! The order in which the detectors' anchor literals are given to aho-corasick, chosen for its
//! Teddy prefilter (issue 13: the anchor search is most of the redaction time).
//!
//! Teddy puts each pattern in one of 16 buckets and reports a candidate wherever the first
//! three bytes pass a bucket's masks: per position, the set of low nybbles and the set of high
//! nybbles of that bucket's patterns. Two unrelated prefixes in one bucket let through every
//! mix of their nybbles (`---` with `pwd` passes a space, `pas` with `xox` most lower-case
//! words), and each candidate is verified against every pattern of its bucket. aho-corasick
//! 1.1 groups patterns with the same low-nybble prefix and gives each new group the bucket
//! `15 - id % 16` of its first pattern: with the literals in sorted order that left three
//! buckets empty and put the keyword prefixes with others. Here the groups are placed on
//! buckets by a static estimate of how often ordinary text passes a bucket's masks (lower-case
//! letters and spaces are frequent), and the literals are ordered so that aho-corasick makes
//! that placement. The order does not change the anchors found (no literal is a prefix of
//! another, so at most one starts at each position); with another aho-corasick placement
//! rule only the speed would change.

/// Buckets of fat Teddy; the mask covers this many leading bytes at most.
const BUCKETS: usize = 16;
const MASK_LEN: usize = 3;

/// A permutation of `0..literals.len()`: the order to build the automaton in.
pub(crate) fn order(literals: &[Vec<u8>]) -> Vec<usize> {
    let mask = literals
        .iter()
        .map(Vec::len)
        .min()
        .unwrap_or(0)
        .min(MASK_LEN);
    if mask == 0 {
        return (0..literals.len()).collect();
    }
    // Groups of literals with the same low-nybble prefix (aho-corasick's unit of placement),
    // in order of first appearance.
    let mut groups: Vec<(Vec<u8>, Vec<usize>)> = Vec::new();
    for (i, l) in literals.iter().enumerate() {
        let key: Vec<u8> = l[..mask].iter().map(|b| b & 15).collect();
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    let masks_of = |members: &[usize]| {
        let mut m = Masks::default();
        for &i in members {
            m.add(&literals[i][..mask]);
        }
        m
    };
    // Costliest first, each to the bucket whose cost it raises least (in practice an empty
    // one while any is left); a bucket takes no more groups than ids with its residue exist.
    let mut by_cost: Vec<usize> = (0..groups.len()).collect();
    let alone: Vec<f64> = groups.iter().map(|(_, m)| masks_of(m).cost()).collect();
    by_cost.sort_by(|&a, &b| alone[b].total_cmp(&alone[a]).then(a.cmp(&b)));
    let mut buckets: Vec<Vec<usize>> = vec![Vec::new(); BUCKETS];
    let room = |bucket: usize| {
        let residue = BUCKETS - 1 - bucket;
        (residue..literals.len()).step_by(BUCKETS).count()
    };
    for g in by_cost {
        let mut best: Option<(f64, usize)> = None;
        for (k, held) in buckets.iter().enumerate() {
            if held.len() >= room(k) {
                continue;
            }
            let members: Vec<usize> = held
                .iter()
                .flat_map(|&h| groups[h].1.iter().copied())
                .collect();
            let before = if held.is_empty() {
                0.0
            } else {
                masks_of(&members).cost()
            };
            let mut with = members;
            with.extend(groups[g].1.iter().copied());
            let raise = masks_of(&with).cost() - before;
            if best.is_none_or(|(r, _)| raise < r) {
                best = Some((raise, k));
            }
        }
        let Some((_, k)) = best else {
            return (0..literals.len()).collect();
        };
        buckets[k].push(g);
    }
    // Lay the ids out: at id `i` the next group placed on bucket `15 - i % 16` starts (its
    // first literal), else a literal of a group already started.
    let mut next_group: Vec<std::collections::VecDeque<usize>> =
        buckets.into_iter().map(Into::into).collect();
    let mut started: Vec<usize> = Vec::new();
    let mut out = Vec::with_capacity(literals.len());
    let mut rest: Vec<std::collections::VecDeque<usize>> = groups
        .iter()
        .map(|(_, m)| m.iter().copied().collect())
        .collect();
    while out.len() < literals.len() {
        let bucket = BUCKETS - 1 - out.len() % BUCKETS;
        let pick = if let Some(g) = next_group[bucket].pop_front() {
            started.push(g);
            rest[g].pop_front()
        } else if let Some(&g) = started.iter().find(|&&g| !rest[g].is_empty()) {
            rest[g].pop_front()
        } else {
            // Nothing fits this id: the placement is only approximated from here on.
            let g = (0..groups.len()).find(|&g| !rest[g].is_empty());
            g.and_then(|g| {
                started.push(g);
                for q in &mut next_group {
                    q.retain(|&x| x != g);
                }
                rest[g].pop_front()
            })
        };
        match pick {
            Some(i) => out.push(i),
            None => return (0..literals.len()).collect(),
        }
    }
    // The caller keeps only the literals this names: an id missing or named twice would drop
    // an anchor and silence its detectors, so anything but a permutation falls back to the
    // given order (a slower search, never a weaker one).
    let mut seen = vec![false; literals.len()];
    for &i in &out {
        match seen.get_mut(i) {
            Some(s) if !*s => *s = true,
            _ => return (0..literals.len()).collect(),
        }
    }
    out
}

/// Per mask position, the low and high nybbles a bucket accepts (bit sets).
#[derive(Default, Clone, Copy)]
struct Masks {
    lo: [u16; MASK_LEN],
    hi: [u16; MASK_LEN],
    patterns: u32,
}

impl Masks {
    fn add(&mut self, prefix: &[u8]) {
        for (j, &b) in prefix.iter().enumerate() {
            self.lo[j] |= 1 << (b & 15);
            self.hi[j] |= 1 << (b >> 4);
        }
        self.patterns += 1;
    }

    /// About how often text passes these masks, times the verification per candidate.
    fn cost(&self) -> f64 {
        let mut passes = 1.0;
        for j in 0..MASK_LEN {
            if self.lo[j] == 0 {
                continue;
            }
            passes *= (0..=255u8)
                .filter(|&b| self.lo[j] & (1 << (b & 15)) != 0 && self.hi[j] & (1 << (b >> 4)) != 0)
                .map(frequency)
                .sum::<f64>();
        }
        passes * (1.0 + 0.5 * f64::from(self.patterns))
    }
}

/// A rough weight of a byte in the text keygate redacts (JSON and prose).
fn frequency(b: u8) -> f64 {
    match b {
        b'a'..=b'z' | b' ' => 1.0,
        b'"' => 0.5,
        b'A'..=b'Z' | b'0'..=b'9' => 0.1,
        0x21..=0x7e => 0.2,
        _ => 0.02,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// aho-corasick 1.1's placement (`packed/teddy/generic.rs`, `Teddy::new`).
    fn placement(literals: &[Vec<u8>], order: &[usize]) -> Vec<(Vec<u8>, usize)> {
        let mut placed: Vec<(Vec<u8>, usize)> = Vec::new();
        for (id, &i) in order.iter().enumerate() {
            let key: Vec<u8> = literals[i][..MASK_LEN].iter().map(|b| b & 15).collect();
            if !placed.iter().any(|(k, _)| *k == key) {
                placed.push((key, BUCKETS - 1 - id % BUCKETS));
            }
        }
        placed
    }

    fn words(list: &[&str]) -> Vec<Vec<u8>> {
        list.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    #[test]
    fn order_is_a_permutation_of_the_literals() {
        for list in [
            words(&["sk-", "ghp_", "token", "Token", "TOKEN", "pwd"]),
            words(&["abc"]),
            words(&[]),
            words(&["ab", "cd"]),
        ] {
            let mut o = order(&list);
            o.sort_unstable();
            assert_eq!(o, (0..list.len()).collect::<Vec<_>>());
        }
    }

    #[test]
    fn keyword_prefixes_never_share_a_bucket_and_none_is_left_empty() {
        let keywords = [
            "secret",
            "password",
            "pwd",
            "token",
            "apikey",
            "authorization",
        ];
        let mut list = Vec::new();
        for k in keywords {
            let lower = k.to_string();
            let mut title = lower.clone().into_bytes();
            title[0] = title[0].to_ascii_uppercase();
            list.push(lower.clone().into_bytes());
            list.push(title);
            list.push(lower.to_ascii_uppercase().into_bytes());
        }
        for t in [
            "sk-",
            "ghp_",
            "gho_",
            "ghs_",
            "ghu_",
            "ghr_",
            "github_pat_",
            "AKIA",
            "ASIA",
            "xoxb-",
            "xoxp-",
            "xapp-",
            "AIza",
            "sk_live_",
            "rk_live_",
            "kg_",
            "eyJ",
            "-----BEGIN",
        ] {
            list.push(t.as_bytes().to_vec());
        }
        list.sort();
        let placed = placement(&list, &order(&list));
        let bucket_of = |k: &str| {
            let key: Vec<u8> = k.bytes().take(MASK_LEN).map(|b| b & 15).collect();
            placed.iter().find(|(g, _)| *g == key).map(|p| p.1)
        };
        let mut keyword_buckets: Vec<usize> =
            keywords.iter().filter_map(|k| bucket_of(k)).collect();
        keyword_buckets.sort_unstable();
        keyword_buckets.dedup();
        assert_eq!(keyword_buckets.len(), keywords.len());
        assert!(placed.len() > BUCKETS);
        let mut used: Vec<usize> = placed.iter().map(|p| p.1).collect();
        used.sort_unstable();
        used.dedup();
        assert_eq!(used.len(), BUCKETS);
        // In sorted order (what aho-corasick saw before) some keywords did share.
        let sorted = placement(&list, &(0..list.len()).collect::<Vec<_>>());
        let shared = keywords.iter().any(|k| {
            let key: Vec<u8> = k.bytes().take(MASK_LEN).map(|b| b & 15).collect();
            let b = sorted.iter().find(|(g, _)| *g == key).map(|p| p.1);
            sorted.iter().filter(|p| Some(p.1) == b).count() > 1
        });
        assert!(shared);
    }
}
