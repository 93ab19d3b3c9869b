//! Credential-format detectors: what a key looks like when keygate does not hold it.
//!
//! Every detector hangs off one or more literal *anchors* (`sk-`, `ghp_`, `AKIA`, `password`, …).
//! One Aho-Corasick pass finds the anchors; only then is the detector's shape checked, on a
//! window that starts at the anchor. That keeps the no-match path at memchr-like speed and,
//! because a verdict depends only on bytes inside a bounded window, it is what lets the stream
//! redactor decide when a verdict is final (see [`Detectors::eval`]).
//!
//! Linear time: a shape is a short head and then the longest run of value bytes; runs, line
//! ends and character classes are looked up through [`Next`], which remembers its answer across
//! the anchors of one scan, and `password_assignment`'s entropy comes from byte counts that move
//! with the anchors ([`Window`]). So the cost per anchor is constant (amortized), however dense
//! the anchors and however far their windows reach. Heads are matched byte by byte (a regex call
//! per anchor was most of a dense scan's cost); each one's regex stays in `SPECS` as its
//! definition, and a proptest checks that the two agree.
//!
//! Patterns are written as regexes, never as example keys, so this file does not trip
//! `keygate redact --check` on itself.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::{dfa, AhoCorasick, AhoCorasickKind, Anchored, Input, MatchKind, PatternID};
use base64::Engine as _;
use regex::bytes::{Regex, RegexBuilder};

/// The longest window any detector reads after its anchor: a PEM block without an END line is
/// redacted up to here.
pub(crate) const PEM_MAX: usize = 16 * 1024;

/// How sure a finding is. The request scan refuses `Strong` findings by default and only
/// reports `Generic` ones (a `password = …` line in code an agent sends is usually not a leak);
/// every surface that redacts treats both alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A provider format with a distinctive prefix, a valid checksum, or a private key block.
    Strong,
    /// A keyword assignment, an `Authorization:` value, a JWT, or a prefix without its checksum.
    Generic,
}

/// Which detectors a redactor runs: one bit per entry of `SPECS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetectorSet(u32);

impl DetectorSet {
    /// No detector: only known values are redacted.
    pub const NONE: DetectorSet = DetectorSet(0);
    /// Every detector.
    pub const ALL: DetectorSet = DetectorSet(u32::MAX);

    /// Every detector of one class.
    pub fn class(class: Class) -> DetectorSet {
        let mut bits = 0;
        for (i, s) in SPECS.iter().enumerate() {
            if s.class == class {
                bits |= 1 << i;
            }
        }
        DetectorSet(bits)
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub(crate) fn union(self, other: DetectorSet) -> DetectorSet {
        DetectorSet(self.0 | other.0)
    }

    pub(crate) fn has(self, det: usize) -> bool {
        self.0 & (1 << det) != 0
    }
}

/// What must arrive before a `Pending` verdict can change: one of these bytes, or the buffer
/// reaching `bound`. The stream redactor skips rescanning a held tail until then, so a verdict
/// that waits for a line end costs one scan, not one per chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Wake {
    pub(crate) on: u8,
    pub(crate) bound: usize,
}

impl Wake {
    /// Any byte: the verdict depends on the next few bytes.
    pub(crate) const ANY: u8 = 1;
    /// A byte outside the token alphabet.
    pub(crate) const TOKEN: u8 = 2;
    pub(crate) const NEWLINE: u8 = 4;
    /// `-`, the last byte of a PEM END line.
    pub(crate) const DASH: u8 = 8;

    /// Whether `data` holds a byte that may change the verdict.
    pub(crate) fn woken_by(self, data: &[u8]) -> bool {
        if self.on & Wake::ANY != 0 && !data.is_empty() {
            return true;
        }
        (self.on & Wake::TOKEN != 0 && data.iter().any(|&b| !is_token(b)))
            || (self.on & Wake::NEWLINE != 0 && memchr::memchr(b'\n', data).is_some())
            || (self.on & Wake::DASH != 0 && memchr::memchr(b'-', data).is_some())
    }

    pub(crate) fn merge(self, other: Wake) -> Wake {
        Wake {
            on: self.on | other.on,
            bound: self.bound.min(other.bound),
        }
    }
}

/// A detector's verdict at one anchor.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Eval {
    /// More input could change the verdict.
    Pending(Wake),
    /// Final: nothing here.
    Miss,
    /// Final: redact `start..end` (absolute offsets in the buffer).
    Hit(usize, usize),
}

/// Where a detector's window ends early: its value cannot run across a stop byte, so once one
/// is seen the verdict no longer depends on what follows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Any byte outside the token alphabet `[A-Za-z0-9_.+/=-]`.
    Token,
    /// A line feed: keyword detectors (`password = …`) never span lines.
    Line,
    /// No stop byte: only the window bound ends it (PEM blocks).
    Window,
}

type ByteSet = [bool; 256];

/// Where a detector's head ends in a window, if it matches there.
type HeadParser = fn(&[u8]) -> Option<usize>;

const fn byte_set(ranges: &[(u8, u8)], extra: &[u8]) -> ByteSet {
    let mut set = [false; 256];
    let mut i = 0;
    while i < ranges.len() {
        let mut b = ranges[i].0;
        while b <= ranges[i].1 {
            set[b as usize] = true;
            b += 1;
        }
        i += 1;
    }
    let mut j = 0;
    while j < extra.len() {
        set[extra[j] as usize] = true;
        j += 1;
    }
    set
}

const AZ: (u8, u8) = (b'A', b'Z');
const LOWER: (u8, u8) = (b'a', b'z');
const DIGITS: (u8, u8) = (b'0', b'9');
static ALNUM_SET: ByteSet = byte_set(&[AZ, LOWER, DIGITS], b"");
static URLSAFE: ByteSet = byte_set(&[AZ, LOWER, DIGITS], b"_-");
static ALNUM_UNDERSCORE: ByteSet = byte_set(&[AZ, LOWER, DIGITS], b"_");
static ALNUM_DASH: ByteSet = byte_set(&[AZ, LOWER, DIGITS], b"-");
static UPPER_DIGIT: ByteSet = byte_set(&[AZ, DIGITS], b"");
static BASE64_BODY: ByteSet = byte_set(&[AZ, LOWER, DIGITS], b"/+");
static AUTH_VALUE: ByteSet = byte_set(&[AZ, LOWER, DIGITS], b"._~+/=-");
static PASSWORD_VALUE: ByteSet = byte_set(&[AZ, LOWER, DIGITS], b"!#%&*+-./=?@^_|~");
// Sets tested once per byte of a scan: a table lookup, where `b"…".contains(&b)` is a call.
static TOKEN: ByteSet = byte_set(&[AZ, LOWER, DIGITS], b"_.+/=-");
static IDENT_REST: ByteSet = byte_set(&[AZ, LOWER, DIGITS], b"_.-");
static ASSIGNED: ByteSet = byte_set(&[AZ, LOWER, DIGITS], b"!#%&*+-./=?@^_|~>");
static SYMBOL: ByteSet = byte_set(&[], b"._~+/=-");

/// What a detector's match looks like after its anchor.
enum Shape {
    /// `head` (a regex anchored at the anchor, at most `head_max` bytes), then a run of `value`
    /// bytes of `min..=max` (the longest run, cut at `max`).
    Run {
        #[cfg_attr(not(test), allow(dead_code))]
        head: &'static str,
        /// `head` matched by hand, byte by byte: a regex call per anchor was most of the cost
        /// when anchors are dense. `head` stays the definition (a test compares the two).
        parse: Option<HeadParser>,
        /// Instead of `head`: the first of these literals the window starts with (longest
        /// first). A literal compare per anchor instead of a regex call.
        literal_heads: &'static [&'static str],
        head_max: usize,
        value: &'static ByteSet,
        min: usize,
        max: usize,
        /// Redact from the anchor (a token), or only the value (after a keyword).
        with_head: bool,
        /// The byte right after the value must not be one of these (the token continues, or
        /// the "value" is really code such as `config.token(`).
        not_after: &'static [u8],
        plausible: Plausible,
    },
    /// `eyJ…` `.` `ey…` `.` signature.
    Jwt,
    /// A PEM private key block: BEGIN header to END line, or `PEM_MAX`.
    Pem,
}

#[derive(Clone, Copy)]
enum Plausible {
    Any,
    LetterAndDigit,
    /// Real keys are random base62: a kebab-case identifier after `sk-` (`sk-learn-…`) is not.
    MixedCaseAndDigit,
    /// GitHub's `gh?_` tokens end in a CRC32 of their random part.
    GithubChecksum,
    /// Scheme-aware: `Basic` must decode to `user:password`.
    Authorization,
    HighEntropy,
}

struct Spec {
    name: &'static str,
    class: Class,
    anchors: &'static [&'static str],
    /// Keyword anchors are case-insensitive words (expanded to lower/Title/UPPER) that may sit
    /// inside a longer identifier (`DB_PASSWORD`); token anchors must start a word.
    keyword: bool,
    shape: Shape,
    window: usize,
    stop: Stop,
}

#[allow(clippy::too_many_arguments)] // a table row: one argument per column
const fn token(
    name: &'static str,
    class: Class,
    anchors: &'static [&'static str],
    heads: &'static [&'static str],
    value: &'static ByteSet,
    min: usize,
    max: usize,
    not_after: &'static [u8],
    plausible: Plausible,
) -> Spec {
    Spec {
        name,
        class,
        anchors,
        keyword: false,
        shape: Shape::Run {
            head: "",
            parse: None,
            literal_heads: heads,
            head_max: 16,
            value,
            min,
            max,
            with_head: true,
            not_after,
            plausible,
        },
        window: max + 16,
        stop: Stop::Token,
    }
}

/// How many entries `SPECS` has: a scan's per-detector memory is an array of this length.
const SPEC_COUNT: usize = 16;

// Order matters: when two detectors redact the same span, the earlier name labels it.
static SPECS: [Spec; SPEC_COUNT] = [
    token(
        "anthropic_key",
        Class::Strong,
        &["sk-"],
        &["sk-ant-"],
        &URLSAFE,
        32,
        300,
        b"",
        Plausible::MixedCaseAndDigit,
    ),
    token(
        "openai_key",
        Class::Strong,
        &["sk-"],
        &["sk-proj-", "sk-svcacct-", "sk-admin-", "sk-"],
        &URLSAFE,
        20,
        300,
        b"",
        Plausible::MixedCaseAndDigit,
    ),
    // Classic tokens: 30 random base62 characters and a 6-character CRC32 of them.
    token(
        "github_token",
        Class::Strong,
        &["ghp_", "gho_", "ghs_", "ghu_", "ghr_"],
        &["ghp_", "gho_", "ghs_", "ghu_", "ghr_"],
        &ALNUM_SET,
        36,
        36,
        b"",
        Plausible::GithubChecksum,
    ),
    token(
        "github_token",
        Class::Strong,
        &["github_pat_"],
        &["github_pat_"],
        &ALNUM_UNDERSCORE,
        22,
        244,
        b"",
        Plausible::LetterAndDigit,
    ),
    // The same prefixes without a valid checksum: redacted, but only reported by the scan.
    token(
        "github_token",
        Class::Generic,
        &["ghp_", "gho_", "ghs_", "ghu_", "ghr_"],
        &["ghp_", "gho_", "ghs_", "ghu_", "ghr_"],
        &ALNUM_SET,
        36,
        251,
        b"",
        Plausible::LetterAndDigit,
    ),
    token(
        "aws_access_key_id",
        Class::Strong,
        &["AKIA", "ASIA"],
        &["AKIA", "ASIA"],
        &UPPER_DIGIT,
        16,
        16,
        ALNUM,
        Plausible::Any,
    ),
    // A secret key next to its key id on one line, as in the CSV the AWS console hands out.
    Spec {
        name: "aws_secret_access_key",
        class: Class::Strong,
        anchors: &["AKIA", "ASIA"],
        keyword: false,
        shape: Shape::Run {
            head: r#"^A[KS]IA[A-Z0-9]{16}(?:\\?["'])?[ \t]{0,16}[,:;|=\t][ \t]{0,16}(?:\\?["'])?"#,
            parse: Some(head_aws_id_pair),
            literal_heads: &[],
            head_max: 60,
            value: &BASE64_BODY,
            min: 40,
            max: 40,
            with_head: false,
            not_after: BASE64,
            plausible: Plausible::MixedCaseAndDigit,
        },
        window: 90,
        stop: Stop::Line,
    },
    Spec {
        name: "aws_secret_access_key",
        class: Class::Strong,
        anchors: &["secret"],
        keyword: true,
        shape: Shape::Run {
            head: r#"(?i)^secret[_-]?access[_-]?key(?:\\?["'])?[ \t]{0,16}(?::=|=>|=|:)[ \t]{0,16}(?:\\?["'])?"#,
            parse: Some(head_aws_secret_keyword),
            literal_heads: &[],
            head_max: 60,
            value: &BASE64_BODY,
            min: 40,
            max: 40,
            with_head: false,
            not_after: BASE64,
            plausible: Plausible::MixedCaseAndDigit,
        },
        window: 90,
        stop: Stop::Line,
    },
    token(
        "slack_token",
        Class::Strong,
        &[
            "xoxb-", "xoxp-", "xoxa-", "xoxr-", "xoxs-", "xoxe-", "xapp-",
        ],
        &[
            "xoxb-", "xoxp-", "xoxa-", "xoxr-", "xoxs-", "xoxe-", "xapp-",
        ],
        &ALNUM_DASH,
        10,
        250,
        b"",
        Plausible::LetterAndDigit,
    ),
    token(
        "google_api_key",
        Class::Strong,
        &["AIza"],
        &["AIza"],
        &URLSAFE,
        35,
        35,
        b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-",
        Plausible::Any,
    ),
    token(
        "stripe_live_key",
        Class::Strong,
        &["sk_live_", "rk_live_"],
        &["sk_live_", "rk_live_"],
        &ALNUM_SET,
        20,
        247,
        b"",
        Plausible::Any,
    ),
    token(
        "keygate_token",
        Class::Strong,
        &["kg_"],
        &["kg_"],
        &ALNUM_SET,
        32,
        250,
        b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_",
        Plausible::Any,
    ),
    // header.payload.signature; both JSON parts start with `{`, which base64url spells `ey`.
    // Generic: documentation and tests are full of sample and expired tokens.
    Spec {
        name: "jwt",
        class: Class::Generic,
        anchors: &["eyJ"],
        keyword: false,
        shape: Shape::Jwt,
        window: 10_260,
        stop: Stop::Token,
    },
    Spec {
        name: "private_key",
        class: Class::Strong,
        anchors: &["-----BEGIN"],
        keyword: false,
        shape: Shape::Pem,
        window: PEM_MAX,
        stop: Stop::Window,
    },
    // Keeps the scheme: `Authorization: Bearer [REDACTED:authorization_header]`.
    Spec {
        name: "authorization_header",
        class: Class::Generic,
        anchors: &["authorization"],
        keyword: true,
        shape: Shape::Run {
            head: r#"(?i)^authorization(?:\\?["'])?[ \t]{0,64}[:=][ \t]{0,64}(?:\\?["'])?(?:(?:bearer|basic|token|bot|apikey|sso-key)[ \t]{1,64})?"#,
            parse: Some(head_authorization),
            literal_heads: &[],
            head_max: 220,
            value: &AUTH_VALUE,
            min: 8,
            max: 4096,
            with_head: false,
            not_after: b"(:",
            plausible: Plausible::Authorization,
        },
        window: 4_340,
        stop: Stop::Line,
    },
    Spec {
        name: "password_assignment",
        class: Class::Generic,
        anchors: &[
            "password", "passwd", "pwd", "secret", "token", "api_key", "apikey", "api-key",
        ],
        keyword: true,
        shape: Shape::Run {
            head: r#"(?i)^(?:password|passwd|pwd|secret|token|api[_-]?key)[A-Za-z0-9_.-]{0,32}(?:\\?["'])?[ \t]{0,64}(?::=|=>|=|:)[ \t]{0,64}(?:\\?["'`])?"#,
            parse: Some(head_password),
            literal_heads: &[],
            head_max: 180,
            value: &PASSWORD_VALUE,
            min: 10,
            max: 128,
            with_head: false,
            not_after: b"(:[{$<",
            plausible: Plausible::HighEntropy,
        },
        window: 320,
        stop: Stop::Line,
    },
];

const ALNUM: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const BASE64: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+/=";

/// Camel-case spellings that the lower/Title/UPPER expansion misses.
const EXTRA_KEYWORD_ANCHORS: &[(&str, &str)] = &[
    ("apiKey", "password_assignment"),
    ("APIKey", "password_assignment"),
    ("ApiKey", "password_assignment"),
];

/// Keys that vendors print in their own documentation (AWS's `…EXAMPLE` pair, the jwt.io
/// sample, Stripe's docs keys): pasting a tutorial is not a leak. Compared whole, so a real key
/// with one of these inside is still found.
const DOCUMENTED_EXAMPLES: &[&str] = &[
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiYWRtaW4iOnRydWUsImlhdCI6MTUxNjIzOTAyMn0.KMUFsIDTnFmyG3nMiGM6H9FNFUROf3wh7SmqJp-QV30",
    "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
    "pk_test_TYooMQauvdEDq54NiTphI7jx",
    "AKIAIOSFODNN7EXAMPLE",
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "sk_test_BQokikJOvBiI2HlWgH4olfQ2",
];

/// Every detector name, in priority order, for documentation and tests.
pub(crate) fn names() -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for s in &SPECS {
        if !out.contains(&s.name) {
            out.push(s.name);
        }
    }
    out
}

pub(crate) struct Detectors {
    anchors: AhoCorasick,
    /// The same literals as an overlapping DFA walked byte by byte where anchors are dense:
    /// restarting a search one byte past each anchor cost more than the anchors' verdicts.
    dense: dfa::DFA,
    /// The longest anchor literal.
    longest: usize,
    /// Whether some literal occurs inside another. If none does, anchors end in the order they
    /// start, so the walk hands each out as soon as it ends.
    nested: bool,
    /// Anchor pattern id -> indices into `SPECS`.
    by_anchor: Vec<Vec<usize>>,
    /// Anchor literals, for the stream's "could this tail still start an anchor" question.
    pub(crate) literals: Vec<Vec<u8>>,
    /// Per entry of `SPECS`: its `literal_heads` as 16-byte masked compares.
    heads: Vec<Vec<Head>>,
    pem_header: Regex,
    pem_end: Regex,
}

impl std::fmt::Debug for Detectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detectors")
            .field("anchors", &self.literals.len())
            .finish()
    }
}

/// Compiled once per process: the table is constant, and building a `Redactor` on every key
/// rotation should not recompile a dozen regexes.
pub(crate) fn get() -> &'static Detectors {
    static DETECTORS: OnceLock<Detectors> = OnceLock::new();
    DETECTORS.get_or_init(Detectors::new)
}

fn compile(pattern: &str) -> Regex {
    RegexBuilder::new(pattern)
        .unicode(false)
        .build()
        .expect("detector patterns are constant and tested")
}

/// "First position at or after `from` whose byte satisfies a predicate", remembered across
/// the anchors of one scan. Anchors come in order, so each byte is looked at about once per
/// question; that is what keeps a scan linear when anchors are dense (`authorization=a1`
/// repeated) and every anchor's window reaches far.
#[derive(Clone, Copy, Default)]
struct Next {
    /// No byte in `lo..next` satisfies the predicate; `next` does, or is the buffer's end.
    lo: usize,
    next: usize,
    used: bool,
}

impl Next {
    fn find(&mut self, buf: &[u8], from: usize, pred: impl Fn(u8) -> bool) -> usize {
        // Dense anchors' answers are usually within a few bytes: those stay inline; a longer
        // scan (the first of each question in a scan may read the whole buffer) goes by blocks.
        let scan = |a: usize, b: usize| {
            let s = &buf[a..b];
            let near = s.len().min(8);
            match s[..near].iter().position(|&x| pred(x)) {
                Some(k) => a + k,
                None => a + near + scan_blocks(&s[near..], &pred),
            }
        };
        if self.used && from >= self.lo && from <= self.next {
            return self.next;
        }
        if self.used && from < self.lo {
            let hit = scan(from, self.lo);
            if hit < self.lo {
                return hit;
            }
            self.lo = from;
            return self.next;
        }
        let next = scan(from, buf.len());
        *self = Next {
            lo: from,
            next,
            used: true,
        };
        next
    }
}

/// The first index of `s` whose byte satisfies `pred`, or `s.len()`: 16 bytes are tested per
/// branch, then the block that has it is searched byte by byte.
#[inline(never)]
fn scan_blocks(s: &[u8], pred: &impl Fn(u8) -> bool) -> usize {
    let mut i = 0;
    for block in s.chunks_exact(16) {
        if block.iter().fold(false, |any, &x| any | pred(x)) {
            break;
        }
        i += 16;
    }
    s[i..]
        .iter()
        .position(|&x| pred(x))
        .map_or(s.len(), |k| i + k)
}

/// Per-detector memory of one scan.
#[derive(Clone, Copy, Default)]
struct Memo {
    run_end: Next,
    digit: Next,
    upper: Next,
    lower: Next,
    symbol: Next,
    /// Not a letter or digit (`high_entropy`'s fourth class).
    other: Next,
    /// `&`, where a query parameter may start (`query_cut`).
    amp: Next,
}

/// What one scan of a buffer remembers between anchors (see [`Next`]).
pub(crate) struct ScanState {
    newline: Next,
    non_token: Next,
    /// An array, not a `Vec`: a scan that meets an anchor (every body with `"…_tokens":`)
    /// then allocates nothing.
    memo: [Memo; SPEC_COUNT],
    jwt: [Next; 3],
    /// The first END line at or after `.0`, if any.
    pem_end: Option<(usize, Option<(usize, usize)>)>,
    entropy: Window,
    /// `assignment_reads` at the last keyword anchor: (anchor, verdict, extent).
    assignment: Option<(usize, Option<bool>, usize)>,
}

/// The byte counts of the last value judged by `high_entropy`, moved along with the anchors:
/// dense `password=` anchors judge overlapping values of up to 128 bytes each, and counting
/// each afresh cost more than everything else in a scan.
struct Window {
    lo: usize,
    hi: usize,
    counts: [u16; 256],
    /// The sum of `c * log2(c)` over `counts`, in fixed point (see [`clogc_table`]).
    sum: i64,
    clogc: &'static [i64; 257],
}

impl Default for Window {
    fn default() -> Self {
        Window {
            lo: 0,
            hi: 0,
            counts: [0; 256],
            sum: 0,
            clogc: clogc_table(),
        }
    }
}

#[cfg(test)]
fn class_of(b: u8) -> usize {
    match b {
        b'a'..=b'z' => 0,
        b'A'..=b'Z' => 1,
        b'0'..=b'9' => 2,
        _ => 3,
    }
}

/// `c * log2(c)` scaled by 2^32 and rounded, for `c` up to 256: a fixed-point sum of these
/// has no drift however often the window moves.
fn clogc_table() -> &'static [i64; 257] {
    static TABLE: OnceLock<[i64; 257]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [0; 257];
        for (c, slot) in t.iter_mut().enumerate().skip(1) {
            let c = c as f64;
            *slot = (c * c.log2() * 4_294_967_296.0).round() as i64;
        }
        t
    })
}

impl Window {
    fn add(&mut self, b: u8) {
        let c = &mut self.counts[usize::from(b)];
        self.sum += self.clogc[usize::from(*c) + 1] - self.clogc[usize::from(*c)];
        *c += 1;
    }

    fn remove(&mut self, b: u8) {
        let c = &mut self.counts[usize::from(b)];
        self.sum += self.clogc[usize::from(*c) - 1] - self.clogc[usize::from(*c)];
        *c -= 1;
    }

    /// Moves the window to `buf[vs..ve]` (the same `buf` on every call).
    fn set(&mut self, buf: &[u8], vs: usize, ve: usize) {
        if vs < self.lo || ve < self.hi || vs > self.hi || ve - vs > 256 {
            for &b in &buf[self.lo..self.hi] {
                self.remove(b);
            }
            self.lo = vs;
            self.hi = vs;
        }
        while self.lo < vs {
            self.remove(buf[self.lo]);
            self.lo += 1;
        }
        while self.hi < ve {
            self.add(buf[self.hi]);
            self.hi += 1;
        }
    }

    /// Whether the counts hold the values they can (at most 256 bytes, `password_assignment`
    /// judges at most 128).
    fn fits(vs: usize, ve: usize) -> bool {
        ve - vs <= 256
    }

    /// `high_entropy(v)` for the window's bytes `v`, the entropy from the counts.
    #[cfg(test)]
    fn high_entropy(&self, v: &[u8]) -> bool {
        let mut classes = [false; 4];
        for &b in v {
            classes[class_of(b)] = true;
        }
        let digits = classes[2];
        let classes = classes.iter().filter(|&&c| c).count();
        if classes < 2 || (classes == 2 && (v.len() < 20 || !digits)) {
            return false;
        }
        self.enough_bits(v)
    }

    /// `shannon_bits(v) >= 3.0` for the window's bytes `v` (at most 256 of them), from the
    /// counts: H = (n log2 n - sum c log2 c) / n, both terms from the fixed-point table.
    fn enough_bits(&self, v: &[u8]) -> bool {
        if v.is_empty() {
            return shannon_bits(v) >= 3.0;
        }
        let n = v.len() as f64;
        let bits = (self.clogc[v.len()] - self.sum) as f64 / 4_294_967_296.0 / n;
        // Within rounding of the threshold the direct count decides, so that the verdict is
        // exactly `high_entropy`'s.
        if (bits - 3.0).abs() < 1e-6 {
            return shannon_bits(v) >= 3.0;
        }
        bits >= 3.0
    }
}

/// The anchor iterator of [`Detectors::anchors`].
struct Anchors<'a> {
    d: &'a Detectors,
    buf: &'a [u8],
    /// One past the last anchor handed out: every anchor before it has been.
    from: usize,
    /// Dense mode: the DFA state, the next byte to read, and the end of the last hit.
    walk: Option<(StateID, usize, usize)>,
    /// Anchors the walk found and has not handed out, in order of their starts.
    found: Queue,
    /// `Detectors::nested`, or true to test the queue with the real literals.
    nested: bool,
}

/// A queue kept in order of starts: a vector read from `head` (a `VecDeque`'s insert cost a
/// tenth of a dense walk). Anchors usually arrive in order, so an insert is usually a push.
#[derive(Default)]
struct Queue {
    items: Vec<(usize, PatternID)>,
    head: usize,
}

impl Queue {
    fn front(&self) -> Option<&(usize, PatternID)> {
        self.items.get(self.head)
    }

    fn pop_front(&mut self) {
        self.head += 1;
        if self.head == self.items.len() {
            self.items.clear();
            self.head = 0;
        } else if self.head >= 64 {
            // Dense anchors may never let it run dry: keep it small.
            self.items.drain(..self.head);
            self.head = 0;
        }
    }

    fn insert(&mut self, item: (usize, PatternID)) {
        let slot = self.items[self.head..]
            .iter()
            .rposition(|&(a, _)| a < item.0)
            .map_or(self.head, |k| self.head + k + 1);
        self.items.insert(slot, item);
    }
}

/// Bytes the walk goes without a hit before it hands back to the prefiltered search.
const DENSE_GAP: usize = 64;

impl Iterator for Anchors<'_> {
    type Item = (usize, PatternID);

    fn next(&mut self) -> Option<(usize, PatternID)> {
        let buf = self.buf;
        let longest = self.d.longest;
        let Some((mut sid, mut pos, mut last_end)) = self.walk else {
            if self.from >= buf.len() {
                return None;
            }
            if buf.len() - self.from < super::search::SHORT_HAY {
                // Too short for the SIMD prefilter (see `SHORT_HAY`): walk the rest. Every
                // anchor before `from` is handed out, so the walk starts there.
                let start = self.d.dense.start_state(Anchored::No).ok()?;
                self.walk = Some((start, self.from, self.from));
                return self.next();
            }
            let m = self.d.anchors.find(Input::new(buf).range(self.from..))?;
            if m.start() - self.from < 32 {
                // Every anchor starting after this one is still to be found: walk from here.
                let start = self.d.dense.start_state(Anchored::No).ok()?;
                self.walk = Some((start, m.start() + 1, m.start() + 1));
            }
            self.from = m.start() + 1;
            return Some((m.start(), m.pattern()));
        };
        let dense = &self.d.dense;
        if !self.nested {
            // An anchor that ends here starts after every anchor that ended earlier (else one
            // would hold the other), and before every one that ends later (likewise).
            loop {
                let stop = (last_end + DENSE_GAP + 1).min(buf.len());
                while pos < stop {
                    sid = dense.next_state(Anchored::No, sid, buf[pos]);
                    pos += 1;
                    if dense.is_match(sid) {
                        break;
                    }
                }
                if dense.is_match(sid) && pos > last_end {
                    // One pattern per match state: two ending together would be nested.
                    let pid = dense.match_pattern(sid, 0);
                    let at = pos - dense.pattern_len(pid);
                    self.walk = Some((sid, pos, pos));
                    self.from = at + 1;
                    return Some((at, pid));
                }
                if pos >= buf.len() {
                    self.walk = Some((sid, pos, last_end));
                    self.from = buf.len();
                    return None;
                }
                if pos - last_end > DENSE_GAP {
                    self.walk = None;
                    self.from = self.from.max(pos + 1 - longest);
                    return self.next();
                }
            }
        }
        loop {
            // An anchor is final once no anchor still unfound can start at or before it:
            // those end after `pos`, so start at or after `pos + 1 - longest`.
            if let Some(&(at, pid)) = self.found.front() {
                if at + longest <= pos || pos >= buf.len() {
                    self.found.pop_front();
                    self.walk = Some((sid, pos, last_end));
                    self.from = at + 1;
                    return Some((at, pid));
                }
            } else if pos >= buf.len() {
                self.walk = Some((sid, pos, last_end));
                self.from = buf.len();
                return None;
            } else if pos - last_end > DENSE_GAP {
                // Every anchor ending by `pos` is handed out, so one starting at or after
                // this `from` is still to be found.
                self.walk = None;
                self.from = self.from.max(pos + 1 - longest);
                return self.next();
            }
            // Walk to the next hit, or to where the front anchor is final, or to where the
            // gap hands back to the search, whichever comes first, testing only for hits.
            let stop = match self.found.front() {
                Some(&(at, _)) => at + longest,
                None => last_end + DENSE_GAP + 1,
            }
            .min(buf.len());
            while pos < stop {
                sid = dense.next_state(Anchored::No, sid, buf[pos]);
                pos += 1;
                if dense.is_match(sid) {
                    break;
                }
            }
            if dense.is_match(sid) && pos > last_end {
                last_end = pos;
                for i in 0..dense.match_len(sid) {
                    let pid = dense.match_pattern(sid, i);
                    let at = pos - dense.pattern_len(pid);
                    // Few anchors are pending at once (they all end within `longest` bytes).
                    self.found.insert((at, pid));
                }
            }
        }
    }
}

impl Detectors {
    fn new() -> Self {
        let mut map: BTreeMap<Vec<u8>, Vec<usize>> = BTreeMap::new();
        for (i, spec) in SPECS.iter().enumerate() {
            for anchor in spec.anchors {
                for literal in spellings(anchor, spec.keyword) {
                    map.entry(literal).or_default().push(i);
                }
            }
        }
        for (anchor, name) in EXTRA_KEYWORD_ANCHORS {
            for (i, spec) in SPECS.iter().enumerate() {
                if spec.name == *name {
                    map.entry(anchor.as_bytes().to_vec()).or_default().push(i);
                }
            }
        }
        let mut entries: Vec<Option<(Vec<u8>, Vec<usize>)>> = map.into_iter().map(Some).collect();
        let keys: Vec<Vec<u8>> = entries.iter().flatten().map(|e| e.0.clone()).collect();
        let (literals, by_anchor): (Vec<Vec<u8>>, Vec<Vec<usize>>) = super::buckets::order(&keys)
            .into_iter()
            .filter_map(|i| entries[i].take())
            .unzip();
        // Invariant: the literals are non-empty constants, so building cannot fail.
        // Leftmost-first, restarted one byte after each hit (see `anchors`): overlapping search
        // would find the same anchors but cannot use the SIMD prefilter, which is what keeps
        // the no-match path at several GiB/s.
        let anchors = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostFirst)
            .kind(Some(AhoCorasickKind::DFA))
            .build(&literals)
            .expect("anchor automaton from constant literals");
        let dense = dfa::DFA::builder()
            .match_kind(MatchKind::Standard)
            .build(&literals)
            .expect("anchor automaton from constant literals");
        let longest = literals.iter().map(Vec::len).max().unwrap_or(0);
        let nested = literals.iter().any(|a| {
            literals
                .iter()
                .any(|b| a != b && memchr::memmem::find(b, a).is_some())
        });
        Detectors {
            anchors,
            dense,
            longest,
            nested,
            by_anchor,
            literals,
            heads: SPECS
                .iter()
                .map(|s| match s.shape {
                    Shape::Run { literal_heads, .. } => literal_heads
                        .iter()
                        .map(|l| Head::new(l.as_bytes()))
                        .collect(),
                    _ => Vec::new(),
                })
                .collect(),
            pem_header: compile(r"^-{5}BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-{5}"),
            pem_end: compile(r"-{5}END[A-Z0-9 ]{0,40}-{5}"),
        }
    }

    /// Fresh memory for one scan of one buffer.
    pub(crate) fn state(&self) -> ScanState {
        ScanState {
            newline: Next::default(),
            non_token: Next::default(),
            memo: [Memo::default(); SPEC_COUNT],
            jwt: [Next::default(); 3],
            pem_end: None,
            entropy: Window::default(),
            assignment: None,
        }
    }

    /// Every anchor occurrence in `buf`, in order, with the detectors to run there.
    ///
    /// No literal is a prefix of another (checked by a test), so at most one anchor starts at
    /// each position. Where anchors are sparse a leftmost-first search (with its SIMD
    /// prefilter, which keeps the no-match path at several GiB/s) is restarted one byte past
    /// each hit; where they are dense an overlapping DFA walks on without restarting, and its
    /// hits (found in order of their ends) are handed out in order of their starts.
    pub(crate) fn anchors<'a>(
        &'a self,
        buf: &'a [u8],
    ) -> impl Iterator<Item = (usize, &'a [usize])> + 'a {
        Anchors {
            d: self,
            buf,
            from: 0,
            walk: None,
            found: Queue::default(),
            nested: self.nested,
        }
        .map(move |(at, pid)| (at, self.by_anchor[pid.as_usize()].as_slice()))
    }

    /// Whether some anchor literal occurs in `buf`; without one no detector can find anything
    /// there (every verdict is made at an anchor). For short buffers (header names and
    /// values): the overlapping DFA walked byte by byte, stopping at the first literal's end.
    pub(crate) fn any_anchor(&self, buf: &[u8]) -> bool {
        let Ok(mut sid) = self.dense.start_state(Anchored::No) else {
            // Cannot happen for an unanchored DFA; "maybe" sends the caller the whole way.
            return true;
        };
        for &b in buf {
            sid = self.dense.next_state(Anchored::No, sid, b);
            if self.dense.is_match(sid) {
                return true;
            }
        }
        false
    }

    /// `anchors` through the walk's queue, as if some literal were nested in another.
    #[cfg(test)]
    fn anchors_queued<'a>(&'a self, buf: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
        Anchors {
            d: self,
            buf,
            from: 0,
            walk: None,
            found: Queue::default(),
            nested: true,
        }
        .map(|(at, _)| at)
    }

    pub(crate) fn name(&self, det: usize) -> &'static str {
        SPECS[det].name
    }

    /// Priority when two detectors label the same span: lower wins.
    pub(crate) fn priority(&self, det: usize) -> usize {
        det
    }

    /// The verdict of detector `det` at anchor `at` in `buf`.
    ///
    /// The verdict reads only `buf[at - 1]` (word boundary, or `prev` when `at == 0`) and the
    /// window `buf[at..]` cut at the detector's bound and just after its first stop byte. When
    /// `eof` is false and that window is not complete yet the answer is `Pending`. The window is
    /// cut the same way whether `buf` is the whole input or a stream's prefix, which is why
    /// streamed and whole-buffer redaction agree. `st` must be fresh for each buffer and see
    /// the anchors in order; it only makes the answer cheaper, never different.
    pub(crate) fn eval(
        &self,
        st: &mut ScanState,
        det: usize,
        buf: &[u8],
        at: usize,
        prev: [Option<u8>; 2],
        eof: bool,
    ) -> Eval {
        let spec = &SPECS[det];
        if !spec.keyword {
            let byte = |back: usize| match at.checked_sub(back) {
                Some(i) => Some(buf[i]),
                None => prev[back - at - 1],
            };
            let before = byte(1);
            // `\n` before a token is a JSON-escaped line break, not the end of a word.
            let escaped = matches!(before, Some(b'n' | b't' | b'r')) && byte(2) == Some(b'\\');
            if before.is_some_and(|b| b.is_ascii_alphanumeric()) && !escaped {
                return Eval::Miss;
            }
        }
        let bound = at.saturating_add(spec.window);
        let limit = buf.len().min(bound);
        let complete = eof || buf.len() >= bound;
        if matches!(spec.shape, Shape::Pem) {
            return self.eval_pem(st, buf, at, limit, complete, bound);
        }
        if spec.keyword {
            // Most keyword hits are prose (`tokens are counted`) or JSON keys with short values
            // (`"prompt_tokens":12`); rule them out before looking for the end of the line.
            let (verdict, read) = match st.assignment {
                Some((a, verdict, read)) if a == at => (verdict, read),
                _ => {
                    let (verdict, read) = assignment_reads(&buf[at..]);
                    st.assignment = Some((at, verdict, read));
                    (verdict, read)
                }
            };
            match verdict.filter(|_| at + read <= limit) {
                Some(false) => return Eval::Miss,
                None if !complete => {
                    return Eval::Pending(Wake {
                        on: Wake::ANY,
                        bound,
                    })
                }
                _ => {}
            }
        }
        let stop = match spec.stop {
            Stop::Line => st.newline.find(buf, at, |b| b == b'\n'),
            _ => st.non_token.find(buf, at, |b| !is_token(b)),
        };
        if stop >= limit && !complete {
            let on = if spec.stop == Stop::Line {
                Wake::NEWLINE
            } else {
                Wake::TOKEN
            };
            return Eval::Pending(Wake { on, bound });
        }
        let end = if stop < limit { stop + 1 } else { limit };
        match &spec.shape {
            Shape::Jwt => self.eval_jwt(st, buf, at, end),
            Shape::Run {
                parse,
                head_max,
                value,
                min,
                max,
                with_head,
                not_after,
                plausible,
                ..
            } => {
                let window = &buf[at..end.min(at + head_max)];
                let head_len = match parse {
                    Some(parse) => parse(window),
                    None => {
                        let p = Head::prefix(window);
                        self.heads[det]
                            .iter()
                            .find(|h| h.starts(window, p))
                            .map(|h| h.len)
                    }
                };
                let Some(head_len) = head_len else {
                    return Eval::Miss;
                };
                let vs = at + head_len;
                let memo = &mut st.memo[det];
                let run_end = memo.run_end.find(buf, vs, |b| !value[usize::from(b)]);
                let run = run_end.min(end) - vs;
                if run < *min {
                    return Eval::Miss;
                }
                let mut ve = vs + run.min(*max);
                // `password_assignment`, the one detector judged by entropy.
                if matches!(plausible, Plausible::HighEntropy) {
                    // In a URL `&name=` starts the next parameter (`?page_token=…&limit=10`).
                    if memo.amp.find(buf, vs, |b| b == b'&') < ve {
                        ve = query_cut(buf, vs, ve);
                    }
                    if ve - vs < *min {
                        return Eval::Miss;
                    }
                }
                if ve < end && not_after.contains(&buf[ve]) {
                    return Eval::Miss;
                }
                let ok = match plausible {
                    Plausible::Any => true,
                    Plausible::LetterAndDigit => {
                        memo.has_digit(buf, vs, ve)
                            && (memo.has_upper(buf, vs, ve) || memo.has_lower(buf, vs, ve))
                    }
                    Plausible::MixedCaseAndDigit => {
                        memo.has_digit(buf, vs, ve)
                            && memo.has_upper(buf, vs, ve)
                            && memo.has_lower(buf, vs, ve)
                    }
                    Plausible::GithubChecksum => github_checksum_ok(&buf[vs..ve]),
                    Plausible::Authorization => {
                        if head_ends_with_basic(&buf[at..vs]) {
                            base64::engine::general_purpose::STANDARD
                                .decode(&buf[vs..ve])
                                .is_ok_and(|d| d.contains(&b':'))
                        } else {
                            (memo.has_upper(buf, vs, ve) || memo.has_lower(buf, vs, ve))
                                && (memo.has_digit(buf, vs, ve) || memo.has_symbol(buf, vs, ve))
                        }
                    }
                    Plausible::HighEntropy => {
                        let v = &buf[vs..ve];
                        // The window counts up to 256 bytes; this detector's values are
                        // at most 128. Classes first: they are looked up, not counted, and
                        // most dense values fail them.
                        let high = if Window::fits(vs, ve) {
                            memo.enough_classes(buf, vs, ve) && {
                                st.entropy.set(buf, vs, ve);
                                st.entropy.enough_bits(v)
                            }
                        } else {
                            high_entropy(v)
                        };
                        high && !is_code_reference(v) && !is_pagination_key(buf, at, vs)
                    }
                };
                if !ok {
                    return Eval::Miss;
                }
                let start = if *with_head { at } else { vs };
                // A keygate placeholder stands in for a key; it is not one (`crate::placeholder`).
                if documented_example(spec, &buf[start..ve])
                    || buf[vs..ve].starts_with(crate::placeholder::PREFIX.as_bytes())
                {
                    return Eval::Miss;
                }
                Eval::Hit(start, ve)
            }
            Shape::Pem => Eval::Miss,
        }
    }

    /// `eyJ` part `.` `ey` part `.` signature, with the regex bounds 8..=1024, 8..=8192 and
    /// 0..=1024; each part is the longest run of base64url bytes, so runs are looked up, not
    /// matched.
    fn eval_jwt(&self, st: &mut ScanState, buf: &[u8], at: usize, end: usize) -> Eval {
        let url = |b: u8| !URLSAFE[usize::from(b)];
        let p1 = at + 3;
        let r1 = st.jwt[0].find(buf, p1.min(buf.len()), url).min(end);
        if r1 < p1 || !(8..=1024).contains(&(r1 - p1)) || r1 >= end || buf[r1] != b'.' {
            return Eval::Miss;
        }
        let p2 = r1 + 1;
        if buf.get(p2..p2 + 2) != Some(b"ey".as_slice()) || p2 + 2 > end {
            return Eval::Miss;
        }
        let r2 = st.jwt[1].find(buf, p2 + 2, url).min(end);
        if !(8..=8192).contains(&(r2 - (p2 + 2))) || r2 >= end || buf[r2] != b'.' {
            return Eval::Miss;
        }
        let p3 = r2 + 1;
        let r3 = st.jwt[2].find(buf, p3.min(buf.len()), url).min(end);
        let ve = p3 + r3.saturating_sub(p3).min(1024);
        if DOCUMENTED_EXAMPLES
            .iter()
            .any(|e| e.as_bytes() == &buf[at..ve])
        {
            return Eval::Miss;
        }
        Eval::Hit(at, ve)
    }

    /// A PEM private key block: from BEGIN to the end of the END line, or, when no END line
    /// arrives within `PEM_MAX`, the whole window: a key body must not leak because its END
    /// line is missing or far away.
    fn eval_pem(
        &self,
        st: &mut ScanState,
        buf: &[u8],
        at: usize,
        limit: usize,
        complete: bool,
        bound: usize,
    ) -> Eval {
        const HEADER_MAX: usize = 80;
        let window = &buf[at..limit];
        let header_region = &window[..window.len().min(HEADER_MAX)];
        let Some(header) = self.pem_header.find(header_region) else {
            // The header is short and made of `[A-Z0-9 -]`; anything else ends it.
            let decided = complete
                || window.len() >= HEADER_MAX
                || window[10.min(window.len())..]
                    .iter()
                    .any(|b| !(b.is_ascii_uppercase() || b.is_ascii_digit() || b" -".contains(b)));
            return if decided {
                Eval::Miss
            } else {
                Eval::Pending(Wake {
                    on: Wake::ANY,
                    bound,
                })
            };
        };
        let from = at + header.end();
        // The first END line at or after `from`, remembered: a run of BEGIN lines without END
        // would otherwise search the same 16 KiB once per line.
        let found = match st.pem_end {
            Some((lo, f)) if lo <= from && f.is_none_or(|(s, _)| s >= from) => f,
            _ => {
                let f = self
                    .pem_end
                    .find_at(buf, from)
                    .map(|m| (m.start(), m.end()));
                st.pem_end = Some((from, f));
                f
            }
        };
        match found {
            Some((_, e)) if e <= limit => Eval::Hit(at, e),
            _ if complete => Eval::Hit(at, limit),
            _ => Eval::Pending(Wake {
                on: Wake::DASH,
                bound,
            }),
        }
    }
}

impl Memo {
    fn has_digit(&mut self, buf: &[u8], s: usize, e: usize) -> bool {
        self.digit.find(buf, s, |b| b.is_ascii_digit()) < e
    }
    fn has_upper(&mut self, buf: &[u8], s: usize, e: usize) -> bool {
        self.upper.find(buf, s, |b| b.is_ascii_uppercase()) < e
    }
    fn has_lower(&mut self, buf: &[u8], s: usize, e: usize) -> bool {
        self.lower.find(buf, s, |b| b.is_ascii_lowercase()) < e
    }
    fn has_other(&mut self, buf: &[u8], s: usize, e: usize) -> bool {
        self.other.find(buf, s, |b| !b.is_ascii_alphanumeric()) < e
    }
    /// The character classes of `buf[s..e]` pass `high_entropy`'s first rule.
    fn enough_classes(&mut self, buf: &[u8], s: usize, e: usize) -> bool {
        let digits = self.has_digit(buf, s, e);
        let classes = usize::from(self.has_lower(buf, s, e))
            + usize::from(self.has_upper(buf, s, e))
            + usize::from(digits)
            + usize::from(self.has_other(buf, s, e));
        !(classes < 2 || (classes == 2 && (e - s < 20 || !digits)))
    }
    fn has_symbol(&mut self, buf: &[u8], s: usize, e: usize) -> bool {
        self.symbol.find(buf, s, |b| SYMBOL[usize::from(b)]) < e
    }
}

fn documented_example(spec: &Spec, v: &[u8]) -> bool {
    // AWS's documentation marks every sample key with EXAMPLE (`AKIAIOSFODNN7EXAMPLE`).
    if spec.name.starts_with("aws_") && memchr::memmem::find(v, b"EXAMPLE").is_some() {
        return true;
    }
    DOCUMENTED_EXAMPLES.iter().any(|e| e.as_bytes() == v)
}

/// `ghp_` + 30 random base62 characters + their CRC32 in 6 base62 digits (0-9A-Za-z), the
/// format GitHub documents for its tokens.
fn github_checksum_ok(v: &[u8]) -> bool {
    if v.len() != 36 {
        return false;
    }
    let (body, check) = v.split_at(30);
    let mut n: u64 = 0;
    for &c in check {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'Z' => c - b'A' + 10,
            b'a'..=b'z' => c - b'a' + 36,
            _ => return false,
        };
        n = n * 62 + u64::from(d);
    }
    n == u64::from(crc32fast::hash(body))
}

/// Where a value ends when it runs into the next URL query parameter (`&name=`).
fn query_cut(buf: &[u8], vs: usize, ve: usize) -> usize {
    let mut from = vs;
    while let Some(p) = memchr::memchr(b'&', &buf[from..ve]) {
        let amp = from + p;
        let name = buf[amp + 1..]
            .iter()
            .take(64)
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
            .count();
        if name > 0 && buf.get(amp + 1 + name) == Some(&b'=') {
            return amp;
        }
        from = amp + 1;
    }
    ve
}

/// `\\?["']` (or with `quotes`): an optional quote, JSON-escaped or not; where it ends.
fn opt_quote(w: &[u8], i: usize, quotes: &[u8]) -> usize {
    match (w.get(i), w.get(i + 1)) {
        (Some(b'\\'), Some(q)) if quotes.contains(q) => i + 2,
        (Some(q), _) if quotes.contains(q) => i + 1,
        _ => i,
    }
}

/// The length of the run of blanks (`[ \t]`) at `i`.
fn blank_run(w: &[u8], i: usize) -> usize {
    w.get(i..).map_or(0, |t| {
        t.iter().take_while(|b| matches!(b, b' ' | b'\t')).count()
    })
}

/// `lit` at `i`, ignoring ASCII case; where it ends.
fn lit_ci(w: &[u8], i: usize, lit: &[u8]) -> Option<usize> {
    let e = i + lit.len();
    w.get(i..e)?.eq_ignore_ascii_case(lit).then_some(e)
}

/// `(?:\\?["'])?[ \t]{0,B}(?::=|=>|=|:)[ \t]{0,B}(?:\\?[Q])?` at `i`: the assignment after a
/// keyword. Every part but the operator is optional and the parts cannot start with one
/// another's bytes, so the greedy choice at each step is the regex's.
fn assignment(w: &[u8], i: usize, blanks: usize, quotes: &[u8]) -> Option<usize> {
    let i = opt_quote(w, i, b"\"'");
    let r = blank_run(w, i);
    if r > blanks {
        return None;
    }
    let i = i + r;
    let i = match (w.get(i)?, w.get(i + 1)) {
        (b':', Some(b'=')) | (b'=', Some(b'>')) => i + 2,
        (b':' | b'=', _) => i + 1,
        _ => return None,
    };
    let i = i + blank_run(w, i).min(blanks);
    Some(opt_quote(w, i, quotes))
}

/// `^A[KS]IA[A-Z0-9]{16}(?:\\?["'])?[ \t]{0,16}[,:;|=\t][ \t]{0,16}(?:\\?["'])?`
fn head_aws_id_pair(w: &[u8]) -> Option<usize> {
    let id = w.get(..20)?;
    if !(id[0] == b'A'
        && matches!(id[1], b'K' | b'S')
        && &id[2..4] == b"IA"
        && id[4..].iter().all(|b| UPPER_DIGIT[usize::from(*b)]))
    {
        return None;
    }
    let i = opt_quote(w, 20, b"\"'");
    // A tab is a blank and a separator: the regex gives blanks back until a separator follows.
    let r = blank_run(w, i);
    let k = (0..=r.min(16))
        .rev()
        .find(|&k| w.get(i + k).is_some_and(|b| b",:;|=\t".contains(b)))?;
    let i = i + k + 1;
    let i = i + blank_run(w, i).min(16);
    Some(opt_quote(w, i, b"\"'"))
}

/// `(?i)^secret[_-]?access[_-]?key` and an assignment (blanks up to 16, quotes `"'`).
fn head_aws_secret_keyword(w: &[u8]) -> Option<usize> {
    let sep = |i: usize| i + usize::from(matches!(w.get(i), Some(b'_' | b'-')));
    let i = lit_ci(w, 0, b"secret")?;
    let i = lit_ci(w, sep(i), b"access")?;
    let i = lit_ci(w, sep(i), b"key")?;
    assignment(w, i, 16, b"\"'")
}

/// `(?i)^authorization(?:\\?["'])?[ \t]{0,64}[:=][ \t]{0,64}(?:\\?["'])?` and an optional
/// scheme word followed by 1 to 64 blanks.
fn head_authorization(w: &[u8]) -> Option<usize> {
    let i = lit_ci(w, 0, b"authorization")?;
    let i = opt_quote(w, i, b"\"'");
    let r = blank_run(w, i);
    if r > 64 {
        return None;
    }
    let i = i + r;
    if !matches!(w.get(i)?, b':' | b'=') {
        return None;
    }
    let i = i + 1;
    let i = i + blank_run(w, i).min(64);
    let i = opt_quote(w, i, b"\"'");
    // No scheme word is a prefix of another, so at most one matches here.
    let scheme = [
        &b"bearer"[..],
        b"basic",
        b"token",
        b"bot",
        b"apikey",
        b"sso-key",
    ]
    .iter()
    .find_map(|s| lit_ci(w, i, s));
    Some(match scheme {
        Some(j) if blank_run(w, j) > 0 => j + blank_run(w, j).min(64),
        _ => i,
    })
}

/// `(?i)^(?:password|passwd|pwd|secret|token|api[_-]?key)[A-Za-z0-9_.-]{0,32}` and an
/// assignment (blanks up to 64, quotes ``"'` ``).
fn head_password(w: &[u8]) -> Option<usize> {
    let i = [&b"password"[..], b"passwd", b"pwd", b"secret", b"token"]
        .iter()
        .find_map(|k| lit_ci(w, 0, k))
        .or_else(|| {
            let i = lit_ci(w, 0, b"api")?;
            lit_ci(
                w,
                i + usize::from(matches!(w.get(i), Some(b'_' | b'-'))),
                b"key",
            )
        })?;
    // An identifier longer than 32 leaves an identifier byte where the assignment must start.
    let n = w[i..]
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        .count();
    if n > 32 {
        return None;
    }
    assignment(w, i + n, 64, b"\"'`")
}

/// Whether the head (`Authorization: Basic `) names the Basic scheme.
fn head_ends_with_basic(head: &[u8]) -> bool {
    let t = head.trim_ascii_end();
    t.len() >= 5 && t[t.len() - 5..].eq_ignore_ascii_case(b"basic") && t.len() < head.len()
}

/// `process.env.OPENAI_API_KEY`, `settings.SECRET_KEY`, `self.config.token`: a dotted path of
/// identifiers is code that reads a secret, not a secret.
fn is_code_reference(v: &[u8]) -> bool {
    v.contains(&b'.')
        && v.split(|&b| b == b'.').all(|seg| {
            seg.first()
                .is_some_and(|&c| c.is_ascii_alphabetic() || c == b'_')
                && seg.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_')
        })
}

/// `page_token=…`, `nextPageToken: …`, `max_tokens=…`: pagination cursors and counters named
/// like secrets.
fn is_pagination_key(buf: &[u8], at: usize, value_start: usize) -> bool {
    let mut s = at;
    while s > 0 && at - s < 64 && (buf[s - 1].is_ascii_alphanumeric() || buf[s - 1] == b'_') {
        s -= 1;
    }
    let len = buf[s..value_start]
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_' || **b == b'-')
        .count();
    let name = &buf[s..s + len];
    [
        &b"page"[..],
        b"cursor",
        b"continuation",
        b"max_",
        b"next_token",
        b"nexttoken",
    ]
    .iter()
    .any(|w| name.windows(w.len()).any(|x| x.eq_ignore_ascii_case(w)))
}

/// Whether `w` (starting at a keyword) goes on like an assignment: the rest of an identifier,
/// an optional quote (JSON-escaped or not), blanks, `:` or `=`, then a run of 8 value bytes, with only blanks and
/// quotes (a scheme word at most) in between. `None` when `w` ends before that is decided.
/// It is a necessary condition for every keyword regex, so it never changes a verdict; it only
/// rules out prose (`tokens are counted`) and short JSON values (`"prompt_tokens":12`) before
/// the line end is looked for.
#[cfg(test)] // the scan calls `assignment_reads`, which shares the answer
fn assignment_follows(w: &[u8]) -> Option<bool> {
    assignment_reads(w).0
}

/// `assignment_follows(w)` and one past the last index it read. Indices are read in
/// non-decreasing order, so on `w[..n]` the answer is the same when `n` is at least that
/// extent and `None` otherwise: detectors with different windows at one anchor share one call.
fn assignment_reads(w: &[u8]) -> (Option<bool>, usize) {
    let read = std::cell::Cell::new(0);
    let verdict = assignment_verdict(w, &read);
    (verdict, read.get())
}

fn assignment_verdict(w: &[u8], read: &std::cell::Cell<usize>) -> Option<bool> {
    let at = |i: usize| {
        // Indices come in non-decreasing order: the last is the furthest.
        read.set(i + 1);
        w.get(i).copied()
    };
    let mut i = 0;
    while IDENT_REST[usize::from(at(i)?)] {
        i += 1;
        // No keyword head has a longer identifier (keyword + 32); bounded so that a long run
        // of letters costs the same at every anchor inside it.
        if i > 48 {
            return Some(false);
        }
    }
    if at(i)? == b'\\' {
        i += 1;
    }
    if matches!(at(i)?, b'"' | b'\'') {
        i += 1;
    }
    let blanks = i;
    while matches!(at(i)?, b' ' | b'\t') {
        i += 1;
        if i - blanks > 64 {
            return Some(false);
        }
    }
    if !matches!(at(i)?, b':' | b'=') {
        return Some(false);
    }
    let mut run = 0;
    for k in i + 1..i + 65 {
        let b = at(k)?;
        if ASSIGNED[usize::from(b)] {
            run += 1;
            if run >= 8 {
                return Some(true);
            }
        } else if matches!(b, b' ' | b'\t' | b'"' | b'\'' | b'`' | b'\\') {
            run = 0;
        } else {
            return Some(false);
        }
    }
    Some(true)
}

pub(crate) fn is_token(b: u8) -> bool {
    TOKEN[usize::from(b)]
}

/// A literal head of at most 16 bytes, compared with a window's first 16 bytes at once (a
/// `memcmp` call per literal was a tenth of a dense `sk-` scan).
struct Head {
    mask: u128,
    value: u128,
    len: usize,
}

impl Head {
    fn new(lit: &[u8]) -> Head {
        assert!(lit.len() <= 16, "literal heads are at most 16 bytes");
        let mask = if lit.len() == 16 {
            u128::MAX
        } else {
            (1u128 << (8 * lit.len())) - 1
        };
        Head {
            mask,
            value: Head::prefix(lit),
            len: lit.len(),
        }
    }

    /// The first 16 bytes of `w`, zero-padded, little-endian.
    fn prefix(w: &[u8]) -> u128 {
        if let Some(b) = w.first_chunk::<16>() {
            return u128::from_le_bytes(*b);
        }
        let mut b = [0u8; 16];
        b[..w.len()].copy_from_slice(w);
        u128::from_le_bytes(b)
    }

    /// Whether `w`, whose `prefix` is `p`, starts with this literal.
    fn starts(&self, w: &[u8], p: u128) -> bool {
        w.len() >= self.len && p & self.mask == self.value
    }
}

/// `password` -> `password`, `Password`, `PASSWORD`; token anchors are taken as written.
fn spellings(anchor: &str, keyword: bool) -> Vec<Vec<u8>> {
    if !keyword {
        return vec![anchor.as_bytes().to_vec()];
    }
    let lower = anchor.to_ascii_lowercase();
    let mut title = lower.clone().into_bytes();
    title[0] = title[0].to_ascii_uppercase();
    let mut out = vec![
        lower.clone().into_bytes(),
        title,
        lower.to_ascii_uppercase().into_bytes(),
    ];
    out.dedup();
    out
}

/// A password-like value: at least three character classes (or two, one of them digits, and
/// long), and at least
/// 3 bits of Shannon entropy per byte. Rejects `changeme`, `hunter2`, `${DB_PASSWORD}`,
/// `config.password_file` and most identifiers.
fn high_entropy(v: &[u8]) -> bool {
    let classes = [
        v.iter().any(u8::is_ascii_lowercase),
        v.iter().any(u8::is_ascii_uppercase),
        v.iter().any(u8::is_ascii_digit),
        v.iter().any(|b| !b.is_ascii_alphanumeric()),
    ]
    .iter()
    .filter(|&&c| c)
    .count();
    // Two classes pass only when one is digits and the value is long: `state_dir/tokens.json`
    // and `snake_case_identifiers` are prose and code, not passwords.
    let digits = v.iter().any(u8::is_ascii_digit);
    if classes < 2 || (classes == 2 && (v.len() < 20 || !digits)) {
        return false;
    }
    shannon_bits(v) >= 3.0
}

fn shannon_bits(v: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &b in v {
        counts[b as usize] += 1;
    }
    let n = v.len() as f64;
    let mut bits = 0.0;
    for &b in v {
        let c = std::mem::take(&mut counts[b as usize]);
        if c > 0 {
            let p = f64::from(c) / n;
            bits -= p * p.log2();
        }
    }
    bits
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Detectors::anchors` restarts one byte after each hit; that finds every anchor only if
    /// no literal is a prefix of another.
    #[test]
    fn no_anchor_literal_is_a_prefix_of_another() {
        let d = get();
        for a in &d.literals {
            for b in &d.literals {
                assert!(a == b || !b.starts_with(a), "{a:?} is a prefix of {b:?}");
            }
        }
    }

    /// The walk's fast path (anchors handed out as they end) needs this; with a nested literal
    /// the walk still works, through its queue, only slower.
    #[test]
    fn no_anchor_literal_occurs_inside_another() {
        assert!(!get().nested);
    }

    #[test]
    fn assignment_prefilter_decides_only_what_it_can() {
        assert_eq!(
            assignment_follows(b"tokens are counted per request"),
            Some(false)
        );
        assert_eq!(assignment_follows(b"tokens\":12,\"x\":1"), Some(false));
        assert_eq!(assignment_follows(b"token = Bearer abcdefgh1"), Some(true));
        assert_eq!(assignment_follows(b"token = "), None);
    }

    #[test]
    fn assignment_verdict_on_a_cut_window_follows_from_its_extent() {
        let samples: [&[u8]; 6] = [
            b"tokens are counted per request",
            b"tokens\":12,\"x\":1",
            b"token = Bearer abcdefgh1",
            b"secret_access_key = 'Zx9Zx9Zx9Zx9'",
            b"password:    \"  a b c d e f g h i j k l m n o p q r s t u v w x y z",
            b"token: Zx9!token: Zx9!token: Zx9!",
        ];
        for w in samples {
            let (verdict, read) = assignment_reads(w);
            for n in 0..=w.len() {
                let want = if n >= read { verdict } else { None };
                assert_eq!(assignment_follows(&w[..n]), want, "{w:?} cut at {n}");
            }
        }
    }

    fn found(text: &str, set: DetectorSet) -> Vec<&'static str> {
        let d = get();
        let buf = text.as_bytes();
        let mut st = d.state();
        let mut out = Vec::new();
        for (at, dets) in d.anchors(buf) {
            for &det in dets {
                if set.has(det) {
                    if let Eval::Hit(..) = d.eval(&mut st, det, buf, at, [None; 2], true) {
                        out.push(d.name(det));
                    }
                }
            }
        }
        out
    }

    fn base62_crc(body: &str) -> String {
        const B62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let mut n = crc32fast::hash(body.as_bytes());
        let mut out = vec![b'0'; 6];
        for slot in out.iter_mut().rev() {
            *slot = B62[(n % 62) as usize];
            n /= 62;
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn github_token_is_strong_only_with_its_checksum() {
        let body = "Zq9xK2mP7vL4wR8tY3nB6cJ1hG5dF0";
        let good = format!("ghp_{body}{}", base62_crc(body));
        let bad = format!("ghp_{body}000000");
        let strong = DetectorSet::class(Class::Strong);
        let generic = DetectorSet::class(Class::Generic);
        assert_eq!(found(&good, strong), vec!["github_token"]);
        assert!(found(&bad, strong).is_empty());
        assert_eq!(found(&bad, generic), vec!["github_token"]);
    }

    #[test]
    fn documented_example_keys_are_not_findings() {
        let id = ["AKIA", "IOSFODNN7", "EXAMPLE"].concat();
        let secret = ["wJalrXUtnFEMI/K7MDENG/", "bPxRfiCYEXAMPLEKEY"].concat();
        let text = format!(
            "AWS_ACCESS_KEY_ID={id}\naws_secret_access_key = {secret}\n{id},{secret}\njwt: {}\nstripe.api_key = \"{}\"\n",
            DOCUMENTED_EXAMPLES[0], DOCUMENTED_EXAMPLES[2]
        );
        assert_eq!(found(&text, DetectorSet::ALL), Vec::<&str>::new());
    }

    #[test]
    fn code_reading_a_secret_and_pagination_parameters_are_not_findings() {
        for text in [
            "const apiKey = process.env.OPENAI_API_KEY;",
            "secret_key = settings.SECRET_KEY_FROM_ENV",
            "GET /v1/files?page_token=CAUQAAabc&limit=10",
            "GET /v1/x?tokens=40&limit=10&after=abc123",
            "nextPageToken: CAUQAAabcDEF123xyz",
        ] {
            assert_eq!(found(text, DetectorSet::ALL), Vec::<&str>::new(), "{text}");
        }
    }

    #[test]
    fn a_token_after_a_json_escaped_line_break_is_found() {
        let key = format!("sk-proj-{}", "Zq9xK2mP7vL4wR8tY3nB6cJ1hG5dF0aa");
        let json = format!(r#"{{"content":"config:\n{key}\n"}}"#);
        assert_eq!(found(&json, DetectorSet::ALL), vec!["openai_key"]);
        let escaped = [r#"{"content":"db_password = \"Xk9#m"#, r#"P2!vL7qR4w\""}"#].concat();
        assert_eq!(
            found(&escaped, DetectorSet::ALL),
            vec!["password_assignment"]
        );
    }

    #[test]
    fn strong_and_generic_sets_split_every_detector() {
        let strong = DetectorSet::class(Class::Strong);
        let generic = DetectorSet::class(Class::Generic);
        for (det, spec) in SPECS.iter().enumerate() {
            assert!(strong.has(det) != generic.has(det), "{}", spec.name);
        }
        for name in ["password_assignment", "authorization_header", "jwt"] {
            assert!(SPECS
                .iter()
                .filter(|s| s.name == name)
                .all(|s| s.class == Class::Generic));
        }
    }

    proptest::proptest! {
        /// The moving window judges every value as `high_entropy` does on the value alone,
        /// whichever way the window moves.
        #[test]
        fn moving_entropy_window_agrees_with_a_fresh_count(
            buf in proptest::collection::vec(proptest::sample::select(&b"aB3!cD4?aaZ9._"[..]), 0..400),
            moves in proptest::collection::vec((0usize..400, 0usize..140), 1..40),
        ) {
            let mut w = Window::default();
            for (vs, len) in moves {
                let vs = vs.min(buf.len());
                let ve = (vs + len).min(buf.len());
                w.set(&buf, vs, ve);
                let v = &buf[vs..ve];
                proptest::prop_assert_eq!(w.high_entropy(v), high_entropy(v), "{:?}", v);
            }
        }
    }

    #[test]
    fn entropy_exactly_at_the_threshold_is_decided_as_by_a_fresh_count() {
        let buf = b"aB3!cD4?".repeat(3);
        let mut w = Window::default();
        w.set(&buf, 0, buf.len());
        assert!(high_entropy(&buf));
        assert!(w.high_entropy(&buf));
    }

    proptest::proptest! {
        /// The anchor iterator, switching between its prefiltered search and its walk, reports
        /// exactly the positions where an anchor literal starts, in order.
        #[test]
        fn anchors_are_every_literal_occurrence_in_order(
            pieces in proptest::collection::vec((0usize..64, 0usize..100), 0..60),
        ) {
            let d = get();
            let mut buf = Vec::new();
            for (lit, gap) in pieces {
                let fill = if gap >= 80 { 100 } else { gap % 4 };
                // Filler with the literals' bytes, so that literals half met are searched too.
                buf.extend(b"xsEcrSwoaPikt-_".iter().cycle().skip(gap % 7).take(fill));
                let l = &d.literals[lit % d.literals.len()];
                // Sometimes only part of a literal, so that near misses are walked too.
                let cut = if gap % 5 == 0 { l.len() - 1 } else { l.len() };
                buf.extend_from_slice(&l[..cut]);
            }
            let got: Vec<usize> = d.anchors(&buf).map(|(at, _)| at).collect();
            let want: Vec<usize> = (0..buf.len())
                .filter(|&i| d.literals.iter().any(|l| buf[i..].starts_with(l)))
                .collect();
            proptest::prop_assert_eq!(got, want);
        }
    }

    proptest::proptest! {
        /// The walk's queue (used when a literal is nested in another) hands out the same
        /// anchors as its fast path.
        #[test]
        fn queued_walk_finds_what_the_fast_walk_finds(
            pieces in proptest::collection::vec((0usize..64, 0usize..100), 0..60),
        ) {
            let d = get();
            let mut buf = Vec::new();
            for (lit, gap) in pieces {
                buf.extend(std::iter::repeat_n(b'x', if gap >= 80 { 100 } else { gap % 4 }));
                let l = &d.literals[lit % d.literals.len()];
                buf.extend_from_slice(&l[..if gap % 5 == 0 { l.len() - 1 } else { l.len() }]);
            }
            let fast: Vec<usize> = d.anchors(&buf).map(|(at, _)| at).collect();
            proptest::prop_assert_eq!(d.anchors_queued(&buf).collect::<Vec<_>>(), fast);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]
        /// Each hand-written head matches exactly what its regex matches (the definition), on
        /// windows made of the pieces the heads care about.
        #[test]
        fn hand_written_heads_agree_with_their_regexes(
            start in proptest::sample::select(vec![
                "password", "PassWd", "PWD", "secret", "Token", "api_key", "API-KEY", "apikey",
                "api_", "secret_access_key", "SECRET-ACCESSKEY", "secretaccess_key",
                "secret_access", "authorization", "Authorization", "AKIAabc", "A", "AKIA", "ASIA",
            ]),
            id in proptest::sample::select(vec!["", "ABCDEFGHIJKLMNOP", "0123456789ABCDEF"]),
            pieces in proptest::collection::vec(proptest::sample::select(vec![
                "", " ", "\t", "  \t ", ":", "=", ":=", "=>", ",", ";", "|", "\"", "'", "\\\"",
                "\\'", "\\", "`", "\\`", "_id", "-", ".", "x", "Zz9", "key", "Bearer", "basic",
                "TOKEN", "bot", "apikey", "sso-key", "\n", "&",
            ]), 0..12),
            blanks in 0usize..70,
            at in 0usize..12,
        ) {
            // Key-shaped samples are assembled here, so that this file does not trip the
            // repository self-check.
            let mut w = [start, id].concat();
            for (i, p) in pieces.iter().enumerate() {
                if i == at {
                    w.push_str(&" ".repeat(blanks));
                }
                w.push_str(p);
            }
            let w = w.into_bytes();
            for spec in &SPECS {
                if let Shape::Run { head, parse: Some(parse), .. } = spec.shape {
                    let want = compile(head).find(&w).map(|m| m.end());
                    proptest::prop_assert_eq!(parse(&w), want, "{} on {:?}", spec.name, String::from_utf8_lossy(&w));
                }
            }
        }
    }

    proptest::proptest! {
        /// A detector's verdict depends on its window only: the same credential is found at the
        /// same place after any amount of filler, and filler alone is never a finding.
        #[test]
        fn findings_do_not_depend_on_input_size(
            filler in proptest::collection::vec(proptest::sample::select(&b"ab =:-_\n.xyz0123"[..]), 0..3000),
            which in 0usize..4,
        ) {
            let samples = [
                format!("sk-proj-{}", "Zq9xK2mP7vL4wR8tY3nB6cJ1hG5dF0aa"),
                format!("{d}BEGIN EC PRIVATE KEY{d}\nQ7xZq9\n{d}END EC PRIVATE KEY{d}", d = "-".repeat(5)),
                format!("Authorization: Bearer {}", "Zq9xK2mP7vL4wR8t"),
                format!("kg_{}", "Zq9xK2mP7vL4wR8tY3nB6cJ1hG5dF0aa12"),
            ];
            let filler = String::from_utf8(filler).unwrap();
            let text = format!("{filler}\n{}\n{filler}", samples[which]);
            let r = crate::redact::Redactor::builder().detectors(true).build();
            let alone = r.find(format!("\n{}\n", samples[which]).as_bytes());
            let inside = r.find(text.as_bytes());
            proptest::prop_assert!(!alone.is_empty());
            let shifted: Vec<_> = alone.iter().map(|f| (f.offset + filler.len(), f.len, f.label.clone())).collect();
            let got: Vec<_> = inside.iter().map(|f| (f.offset, f.len, f.label.clone())).collect();
            proptest::prop_assert_eq!(got, shifted);
        }
    }
}
