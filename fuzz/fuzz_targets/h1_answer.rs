//! keygate's own HTTP/1.1 client reads any upstream byte sequence, in any pieces, without a
//! panic, and to the same outcome whole or cut: the first bytes choose the cuts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let head_request = n & 0x80 != 0;
    let cuts = usize::from(n % 8);
    if rest.len() < cuts {
        return;
    }
    let (sizes, bytes) = rest.split_at(cuts);
    let mut pieces = Vec::new();
    let mut left = bytes;
    for &s in sizes {
        let at = usize::from(s).min(left.len());
        let (a, b) = left.split_at(at);
        pieces.push(a);
        left = b;
    }
    pieces.push(left);
    let whole = keygate::forward::read_h1_answer([bytes], head_request);
    let cut = keygate::forward::read_h1_answer(pieces.iter().copied(), head_request);
    match (&whole, &cut) {
        (Ok((sw, bw, _)), Ok((sc, bc, _))) => {
            assert_eq!(sw, sc);
            assert_eq!(bw, bc);
        }
        (Err(_), Err(_)) => {}
        _ => panic!("whole {whole:?} vs cut {cut:?}"),
    }
    if let Ok((_, body, _)) = &whole {
        assert!(body.len() <= bytes.len());
    }
});
