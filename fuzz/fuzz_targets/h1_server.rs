//! keygate's own HTTP/1.1 server (`listen/h1.rs`): whatever bytes a local process sends, the
//! request head parser and the chunked body decoder never panic, and they read the same however
//! the bytes are cut into reads (the first byte picks the cut).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    keygate::listen::h1::fuzz_one(data);
});
