//! A request record's JSON, written field by field: the same bytes as `serde_json::to_writer` of
//! the derived `Serialize` (a proptest holds them equal), without the serializer's per-field
//! machinery, and with each string copied whole when it needs no escape (almost every field of
//! almost every record: names, ids, codes, paths).
//!
//! The hash chain is over these bytes, so a change here must keep them equal to serde's: the
//! derive stays the definition, for the record's other readers (the metrics observer, tests).

use serde_json::ser::{CompactFormatter, Formatter as _};

use super::{PeerRecord, Reason, Record};
use crate::error::Blame;

/// Appends `r` as one JSON object (no `prev_hash`/`hash`, no newline).
pub(super) fn write_record(out: &mut Vec<u8>, r: &Record) {
    out.extend_from_slice(b"{\"time\":\"");
    // RFC 3339 is digits, `-`, `:`, `.`, `T` and `Z`: nothing to escape.
    rfc3339_millis(out, r.time.0);
    out.extend_from_slice(b"\",\"request_id\":");
    string(out, &r.request_id);
    field(out, "agent");
    opt_string(out, r.agent.as_deref());
    field(out, "person");
    opt_string(out, r.person.as_deref());
    field(out, "route");
    opt_string(out, r.route.as_deref());
    field(out, "destination");
    opt_string(out, r.destination.as_deref());
    field(out, "method");
    string(out, r.method.as_str());
    field(out, "path");
    string(out, &r.path);
    if r.path_truncated {
        out.extend_from_slice(b",\"path_truncated\":true");
    }
    if let Some(t) = &r.target_sha256 {
        field(out, "target_sha256");
        string(out, t);
    }
    if !r.query_params.is_empty() {
        field(out, "query_params");
        strings(out, &r.query_params);
    }
    field(out, "classification");
    opt_string(out, r.classification.as_deref());
    field(out, "policy_version");
    string(out, &r.policy_version);
    field(out, "decision");
    string(out, r.decision.as_str());
    field(out, "reason");
    reason(out, &r.reason);
    field(out, "status");
    number(out, u64::from(r.status));
    field(out, "key_id");
    opt_string(out, r.key_id.as_deref());
    field(out, "latency_ms");
    float(out, r.latency_ms);
    field(out, "bytes_in");
    number(out, r.bytes_in);
    field(out, "bytes_out");
    number(out, r.bytes_out);
    if let Some(t) = r.tokens {
        field(out, "tokens");
        number(out, t);
    }
    field(out, "listener");
    string(out, &r.listener);
    if let Some(p) = &r.peer {
        field(out, "peer");
        peer(out, p);
    }
    if let Some(b) = r.blame {
        field(out, "blame");
        string(out, blame(b));
    }
    for (name, value) in [
        ("token_id", r.token_id.as_deref()),
        ("run_id", r.run_id.as_deref()),
        ("approval_id", r.approval_id.as_deref()),
        ("approved_by", r.approved_by.as_deref()),
    ] {
        if let Some(v) = value {
            field(out, name);
            string(out, v);
        }
    }
    if !r.scan_findings.is_empty() {
        field(out, "scan_findings");
        strings(out, &r.scan_findings);
    }
    if let Some(i) = &r.instance {
        field(out, "instance");
        string(out, i);
    }
    if let Some(s) = r.state {
        field(out, "state");
        string(out, s);
    }
    out.push(b'}');
}

/// What `humantime::format_rfc3339_millis(t)` displays (`2026-12-08T00:44:17.123Z`), written
/// digit by digit: through `write!` the formatting machinery cost more than the date. A clock
/// outside what RFC 3339 can say (before 1970 here, after 9999) is written as the nearest end
/// of that range: humantime panics on the one and fails on the other, and a record is never
/// lost to a wrong clock.
fn rfc3339_millis(out: &mut Vec<u8>, t: std::time::SystemTime) {
    const LAST: u64 = 253_402_300_800;
    let d = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) if d.as_secs() < LAST => d,
        Ok(_) => std::time::Duration::new(LAST - 1, 999_000_000),
        Err(_) => std::time::Duration::ZERO,
    };
    let secs = d.as_secs();
    let (days, of_day) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (H. Hinnant's `civil_from_days`, for days >= 0).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let millis = u64::from(d.subsec_millis());
    let mut buf = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut n: u64| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3_600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    put(20, 3, millis);
    out.extend_from_slice(&buf);
}

/// `,"name":` (every name here is a plain identifier).
fn field(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn strings(out: &mut Vec<u8>, items: &[String]) {
    out.push(b'[');
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        string(out, s);
    }
    out.push(b']');
}

fn number(out: &mut Vec<u8>, n: u64) {
    let _ = CompactFormatter.write_u64(out, n);
}

/// As serde_json writes an `f64`: its own formatting, and `null` for what JSON cannot spell.
fn float(out: &mut Vec<u8>, f: f64) {
    if f.is_finite() {
        let _ = CompactFormatter.write_f64(out, f);
    } else {
        out.extend_from_slice(b"null");
    }
}

fn peer(out: &mut Vec<u8>, p: &PeerRecord) {
    out.extend_from_slice(b"{\"uid\":");
    number(out, u64::from(p.uid));
    out.extend_from_slice(b",\"pid\":");
    match p.pid {
        Some(pid) => {
            let _ = CompactFormatter.write_i32(out, pid);
        }
        None => out.extend_from_slice(b"null"),
    }
    out.push(b'}');
}

fn blame(b: Blame) -> &'static str {
    match b {
        Blame::Agent => "agent",
        Blame::Upstream => "upstream",
        Blame::Keygate => "keygate",
    }
}

fn reason(out: &mut Vec<u8>, r: &Reason) {
    match r {
        Reason::Aborted(before) if **before != Reason::Unset => {
            let mut s = String::with_capacity(48);
            s.push_str(before.as_str());
            s.push_str(" (aborted)");
            string(out, &s);
        }
        other => string(out, other.as_str()),
    }
}

/// A JSON string as serde_json escapes it: `"` and `\`, the control characters (`\b`, `\t`,
/// `\n`, `\f`, `\r` by name, the rest as `\u00xx`); everything else as it is, UTF-8 included.
fn string(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    out.push(b'"');
    if !any_needs_escape(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut at = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if !needs_escape(b) {
            continue;
        }
        out.extend_from_slice(&bytes[at..i]);
        at = i + 1;
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
    }
    out.extend_from_slice(&bytes[at..]);
    out.push(b'"');
}

fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Whether any byte of `bytes` needs an escape, eight bytes per step: a byte below 0x20, or
/// equal to `"` or `\`, sets its lane's high bit in one of the three masks (the classic "has a
/// byte less than n" and "has a zero byte" tests, exact as a yes/no answer for the word).
fn any_needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let mut lanes = [0u8; 8];
        lanes.copy_from_slice(w);
        let x = u64::from_le_bytes(lanes);
        let control = x.wrapping_sub(0x20 * ONES);
        let quote =
            (x ^ (u64::from(b'"') * ONES)).wrapping_sub(ONES) & !(x ^ (u64::from(b'"') * ONES));
        let backslash =
            (x ^ (u64::from(b'\\') * ONES)).wrapping_sub(ONES) & !(x ^ (u64::from(b'\\') * ONES));
        if ((control & !x) | quote | backslash) & HIGH != 0 {
            return true;
        }
    }
    words.remainder().iter().any(|&b| needs_escape(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Decision, Stamp};
    use crate::error::Code;
    use proptest::prelude::*;
    use std::io::Write as _;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    fn serde(r: &Record) -> Vec<u8> {
        serde_json::to_vec(r).unwrap()
    }

    fn ours(r: &Record) -> Vec<u8> {
        let mut v = Vec::new();
        write_record(&mut v, r);
        v
    }

    proptest! {
        /// The record's time, as humantime displays it, from 1970 to the end of 9999 (outside
        /// it humantime displays nothing: see the clamp's test).
        #[test]
        fn time_is_written_as_humantime_displays_it(
            secs in prop_oneof![0u64..4_102_444_800, 0u64..253_402_300_800, 253_402_300_000u64..253_402_300_800],
            nanos in 0u32..1_000_000_000,
        ) {
            let t = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
            let mut ours = Vec::new();
            rfc3339_millis(&mut ours, t);
            let mut theirs = Vec::new();
            let _ = write!(theirs, "{}", humantime::format_rfc3339_millis(t));
            prop_assert_eq!(String::from_utf8(ours).unwrap(), String::from_utf8(theirs).unwrap());
        }
    }

    #[test]
    fn a_clock_outside_rfc3339_is_written_as_the_nearest_end_not_a_panic() {
        let cases = [
            (
                SystemTime::UNIX_EPOCH - Duration::from_secs(1),
                "1970-01-01T00:00:00.000Z",
            ),
            (
                SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800),
                "9999-12-31T23:59:59.999Z",
            ),
            (
                SystemTime::UNIX_EPOCH + Duration::from_secs(400_000_000_000),
                "9999-12-31T23:59:59.999Z",
            ),
        ];
        for (t, want) in cases {
            let mut out = Vec::new();
            rfc3339_millis(&mut out, t);
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    #[test]
    fn a_default_record_is_written_as_serde_writes_it() {
        // Also fails when a field is added to `Record` but not here.
        let r = Record::default();
        assert_eq!(
            String::from_utf8(ours(&r)).unwrap(),
            String::from_utf8(serde(&r)).unwrap()
        );
    }

    /// Text with every kind of byte a record's strings may carry: plain, JSON's escapes,
    /// control characters, multi-byte UTF-8.
    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                4 => proptest::char::range('a', 'z'),
                1 => proptest::sample::select(vec!['"', '\\', '/', '\n', '\r', '\t', '\u{8}',
                    '\u{c}', '\u{0}', '\u{1f}', '\u{7f}', 'é', '€', '😀', ' ', '#', '-']),
            ],
            0..24,
        )
        .prop_map(|c| c.into_iter().collect())
    }

    fn opt_arc() -> impl Strategy<Value = Option<Arc<str>>> {
        proptest::option::of(text().prop_map(Arc::from))
    }

    fn reason() -> impl Strategy<Value = Reason> {
        prop_oneof![
            Just(Reason::Unset),
            Just(Reason::Allowed),
            Just(Reason::ClientDisconnected),
            Just(Reason::Refused(Code::SecretInRequest)),
            Just(Reason::Aborted(Box::new(Reason::Unset))),
            Just(Reason::Aborted(Box::new(Reason::Allowed))),
            Just(Reason::Aborted(Box::new(Reason::Refused(
                Code::AuditUnavailable
            )))),
        ]
    }

    fn float() -> impl Strategy<Value = f64> {
        prop_oneof![
            proptest::num::f64::ANY,
            (0u64..10_000_000).prop_map(|us| us as f64 / 1e3),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(0.0),
            Just(-0.0),
        ]
    }

    prop_compose! {
        fn record()(
            (ms, request_id, agent, person, route, destination) in
                (0u64..4_000_000_000_000, text(), opt_arc(), opt_arc(), opt_arc(), opt_arc()),
            (method, path, path_truncated, target_sha256, query_params) in (
                proptest::sample::select(vec!["GET", "POST", "DELETE", "PROPFIND"]),
                text(), any::<bool>(), proptest::option::of(text()),
                proptest::collection::vec(text(), 0..3)),
            (classification, policy_version, decision, reason, status, key_id) in (
                opt_arc(), text(),
                proptest::sample::select(vec![Decision::Allow, Decision::Deny, Decision::DryRun, Decision::Error]),
                reason(), any::<u16>(), opt_arc()),
            (latency_ms, bytes_in, bytes_out, tokens, listener) in
                (float(), any::<u64>(), any::<u64>(), proptest::option::of(any::<u64>()), text()),
            (peer, blame) in (
                proptest::option::of((any::<u32>(), proptest::option::of(any::<i32>()))),
                proptest::option::of(proptest::sample::select(vec![Blame::Agent, Blame::Upstream, Blame::Keygate]))),
            (token_id, run_id, approval_id, approved_by, scan_findings, instance, state) in (
                proptest::option::of(text()), proptest::option::of(text()),
                proptest::option::of(text()), proptest::option::of(text()),
                proptest::collection::vec(text(), 0..3), proptest::option::of(text()),
                proptest::option::of(Just("rate_fail_open"))),
        ) -> Record {
            Record {
                time: Stamp(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
                request_id,
                agent,
                person,
                route,
                destination,
                method: method.parse().unwrap(),
                path,
                path_truncated,
                target_sha256,
                query_params,
                classification,
                policy_version: policy_version.into(),
                decision,
                reason,
                status,
                key_id,
                latency_ms,
                bytes_in,
                bytes_out,
                tokens,
                listener: listener.into(),
                peer: peer.map(|(uid, pid)| PeerRecord { uid, pid }),
                blame,
                token_id: token_id.map(Into::into),
                run_id,
                approval_id,
                approved_by,
                scan_findings,
                instance,
                state,
            }
        }
    }

    proptest! {
        /// The word-at-a-time test answers as testing every byte does.
        #[test]
        fn escape_test_by_words_agrees_with_the_byte_test(
            bytes in proptest::collection::vec(
                prop_oneof![any::<u8>(), proptest::sample::select(vec![0x1f, 0x20, 0x21, 0x22, 0x23, 0x5b, 0x5c, 0x5d, 0x00, 0x80, 0xa2, 0xdc, 0xff])],
                0..40),
        ) {
            prop_assert_eq!(any_needs_escape(&bytes), bytes.iter().any(|&b| needs_escape(b)));
        }

        /// The chain hashes these bytes and readers parse them: they are serde_json's, for
        /// any record.
        #[test]
        fn records_are_written_as_serde_json_writes_them(r in record()) {
            prop_assert_eq!(
                String::from_utf8(ours(&r)).unwrap(),
                String::from_utf8(serde(&r)).unwrap()
            );
        }
    }
}
