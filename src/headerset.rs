//! Which of a fixed list of header names a request or answer holds, found in one pass over its
//! names. A `HeaderMap` lookup hashes the name first (byte by byte for names `http` has no
//! constant for), and a miss costs as much as a hit; the stages look for a dozen names that
//! nearly no request carries (caller credentials, hop-by-hop, method overrides, ranges), so they
//! ask here first and look up, read or remove only what is there.

use http::{HeaderMap, HeaderName};

/// A bit per entry of `names` (at most 32) that `headers` holds, in one pass over its names.
pub fn present<T>(headers: &HeaderMap<T>, names: &[HeaderName]) -> u32 {
    debug_assert!(names.len() <= 32);
    let mut found = 0u32;
    for key in headers.keys() {
        if let Some(i) = names.iter().position(|n| n == key) {
            found |= 1 << i;
        }
    }
    found
}

/// The entries of `names` that `headers` holds, in the order of `names`.
pub fn held<'a, T>(
    headers: &HeaderMap<T>,
    names: &'a [HeaderName],
) -> impl Iterator<Item = &'a HeaderName> + 'a {
    let found = present(headers, names);
    names
        .iter()
        .enumerate()
        .filter(move |(i, _)| found & (1 << i) != 0)
        .map(|(_, n)| n)
}

/// Removes every instance of every header in `names`.
pub fn remove_all<T>(headers: &mut HeaderMap<T>, names: &[HeaderName]) {
    let found = present(headers, names);
    if found == 0 {
        return;
    }
    for (i, name) in names.iter().enumerate() {
        if found & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POOL: [&str; 8] = [
        "authorization",
        "x-api-key",
        "connection",
        "keep-alive",
        "content-type",
        "x-other",
        "te",
        "host",
    ];

    fn names() -> Vec<HeaderName> {
        [
            "x-api-key",
            "authorization",
            "keep-alive",
            "te",
            "x-missing",
        ]
        .iter()
        .map(|n| HeaderName::from_static(n))
        .collect()
    }

    proptest! {
        /// `present`, `held` and `remove_all` agree with looking each name up, for any map.
        #[test]
        fn one_pass_agrees_with_a_lookup_per_name(
            picks in proptest::collection::vec((0..POOL.len(), "[a-z]{0,6}"), 0..12),
        ) {
            let mut headers = HeaderMap::new();
            for (i, v) in &picks {
                headers.append(HeaderName::from_static(POOL[*i]), v.parse().unwrap());
            }
            let names = names();
            let by_lookup: Vec<&HeaderName> =
                names.iter().filter(|n| headers.contains_key(*n)).collect();
            prop_assert_eq!(held(&headers, &names).collect::<Vec<_>>(), by_lookup.clone());
            let mask = present(&headers, &names);
            prop_assert_eq!(mask.count_ones() as usize, by_lookup.len());
            let mut expected = headers.clone();
            for n in &names {
                expected.remove(n);
            }
            remove_all(&mut headers, &names);
            prop_assert_eq!(headers, expected);
        }
    }
}
