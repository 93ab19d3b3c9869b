//! Engine tests. Credential-looking values are assembled at run time (`fake`) so that this file
//! does not itself trip `keygate redact --check`.

use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use proptest::prelude::*;

use super::*;

/// A deterministic pseudo-random string over `alphabet`, with a digit, an upper- and a
/// lower-case letter early on so that plausibility checks pass.
fn fake(len: usize, seed: u64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut s: Vec<u8> = b"Q7x".iter().copied().take(len).collect();
    while s.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push(ALPHABET[(x % ALPHABET.len() as u64) as usize]);
    }
    String::from_utf8(s).expect("ascii")
}

fn detectors() -> Redactor {
    Redactor::builder().detectors(true).build()
}

fn redact_str(r: &Redactor, s: &str) -> String {
    String::from_utf8(r.redact(s.as_bytes()).into_owned()).expect("utf-8 in, utf-8 out")
}

fn labels(r: &Redactor, s: &str) -> Vec<String> {
    r.find(s.as_bytes()).into_iter().map(|f| f.label).collect()
}

fn stream_all(r: &Arc<Redactor>, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut s = Arc::clone(r).stream();
    let mut out = Vec::new();
    let mut at = 0;
    for (i, &c) in cuts.iter().enumerate() {
        let c = c.clamp(at, input.len());
        // Both entry points, in turn: a shared chunk's output may be a slice of it.
        if i % 2 == 0 {
            out.extend_from_slice(&s.push(&input[at..c]));
        } else {
            out.extend_from_slice(&s.push_bytes(&Bytes::copy_from_slice(&input[at..c])));
        }
        at = c;
    }
    // The last piece as the body adapter hands it over when its source says it is the last
    // (`push_last`), or not.
    if cuts.len() % 2 == 0 {
        out.extend_from_slice(&s.push(&input[at..]));
    } else {
        out.extend_from_slice(&s.push_last(&Bytes::copy_from_slice(&input[at..])));
    }
    out.extend_from_slice(&s.finish());
    out
}

// --- known values ---------------------------------------------------------------------------

#[test]
fn known_value_is_replaced_with_its_key_id_in_every_encoding() {
    let secret = format!("{}/+x?&", fake(30, 1));
    let r = Redactor::builder()
        .known("openai#3f2a9c1d", secret.as_bytes())
        .build();
    let encodings = [
        secret.clone(),
        STANDARD.encode(&secret),
        URL_SAFE_NO_PAD.encode(&secret),
        percent_encoding::utf8_percent_encode(&secret, percent_encoding::NON_ALPHANUMERIC)
            .to_string()
            .replace("%2D", "-")
            .replace("%5F", "_")
            .replace("%2E", ".")
            .replace("%7E", "~"),
        hex::encode(&secret),
        hex::encode_upper(&secret),
    ];
    for enc in encodings {
        let out = redact_str(&r, &format!("before {enc} after"));
        assert_eq!(
            out, "before [REDACTED:openai#3f2a9c1d] after",
            "encoding {enc}"
        );
    }
}

#[test]
fn secret_inside_basic_auth_is_redacted_at_any_user_length() {
    let secret = fake(40, 2);
    let r = Redactor::builder().known("k#1", secret.as_bytes()).build();
    for user in ["a", "ab", "abc", "abcd"] {
        let header = format!(
            "Authorization: Basic {}",
            STANDARD.encode(format!("{user}:{secret}"))
        );
        let out = redact_str(&r, &header);
        assert!(out.contains("[REDACTED:k#1]"), "{out}");
        // What is left of the blob must not decode to the secret.
        assert!(!out.contains(&STANDARD.encode(&secret)[4..20]));
    }
}

#[test]
fn short_held_values_are_ignored() {
    let r = Redactor::builder().known("pin", b"1234567").build();
    assert!(r.is_empty());
    assert!(r.find(b"code 1234567").is_empty());
}

#[test]
fn nothing_matched_borrows_the_input() {
    let r = Redactor::builder()
        .known("k", fake(20, 3).as_bytes())
        .detectors(true)
        .build();
    assert!(matches!(
        r.redact(b"plain text, nothing to see"),
        Cow::Borrowed(_)
    ));
}

#[test]
fn find_reports_offsets_and_labels_never_values() {
    let secret = fake(24, 4);
    let r = Redactor::builder()
        .known("anthropic#01", secret.as_bytes())
        .build();
    let input = format!("xx{secret}yy");
    assert_eq!(
        r.find(input.as_bytes()),
        vec![Finding {
            offset: 2,
            len: 24,
            label: "anthropic#01".into()
        }]
    );
}

#[test]
fn longest_spelling_wins_so_no_padding_or_suffix_leaks() {
    let secret = fake(20, 5);
    let r = Redactor::builder().known("k", secret.as_bytes()).build();
    let b64 = STANDARD.encode(&secret);
    assert!(b64.ends_with('='));
    assert_eq!(redact_str(&r, &format!("[{b64}]")), "[[REDACTED:k]]");
}

/// How different JSON encoders write a string's characters.
#[derive(Clone, Copy)]
enum JsonStyle {
    /// PHP `json_encode`: `\/` and `\u00e9`.
    Php,
    /// .NET `System.Text.Json`: `\u002B` and `\u00E9` (upper-case hex).
    DotNet,
    /// Python `json.dumps`: `\u00e9`, `/` and `+` as they are.
    Python,
    /// Every character as `\uXXXX`, non-BMP ones as surrogate pairs.
    Everything,
}
use JsonStyle::*;

fn json_escaped(s: &str, style: JsonStyle) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let mut units = [0u16; 2];
        let u = |n: u16, upper: bool| {
            if upper {
                format!("\\u{n:04X}")
            } else {
                format!("\\u{n:04x}")
            }
        };
        match (style, c) {
            (Everything, c) => {
                for n in c.encode_utf16(&mut units) {
                    out.push_str(&u(*n, false));
                }
            }
            (Php, '/') => out.push_str("\\/"),
            (DotNet, '+') => out.push_str(&u(0x2b, true)),
            (_, c) if !c.is_ascii() => {
                for n in c.encode_utf16(&mut units) {
                    out.push_str(&u(*n, matches!(style, DotNet)));
                }
            }
            (_, c) => out.push(c),
        }
    }
    out
}

#[test]
fn every_json_spelling_of_a_held_value_is_redacted() {
    let secret = format!(
        "{}/{}+{}\u{e9}\u{1F511}",
        fake(12, 63),
        fake(8, 64),
        fake(6, 65)
    );
    let r = Redactor::builder().known("k#j", secret.as_bytes()).build();
    for style in [Php, DotNet, Python, Everything] {
        let enc = json_escaped(&secret, style);
        let body = format!("{{\"error\":\"bad key {enc}\",\"n\":\"caf\\u00e9\\/x\"}}");
        assert_eq!(
            redact_str(&r, &body),
            "{\"error\":\"bad key [REDACTED:k#j]\",\"n\":\"caf\\u00e9\\/x\"}",
            "{enc}"
        );
    }
    // Mixed within one value: PHP's `\/`, a lower-case `\u002b`, the rest raw.
    let mixed = secret.replacen('/', "\\/", 1).replace('+', "\\u002b");
    assert_eq!(redact_str(&r, &mixed), "[REDACTED:k#j]");
}

#[test]
fn escaped_json_without_a_held_value_is_left_byte_for_byte() {
    let r = Redactor::builder()
        .known("k", fake(20, 66).as_bytes())
        .build();
    let body = r#"{"t":"caf\u00e9 \ud83d\ude00 a\/b \\u0041 \"q\" \n \q \u12"}"#;
    assert!(matches!(r.redact(body.as_bytes()), Cow::Borrowed(_)));
}

#[test]
fn json_escaped_secret_split_inside_an_escape_is_redacted_in_a_stream() {
    let secret = format!("{}/{}", fake(12, 67), fake(12, 68));
    let r = Arc::new(Redactor::builder().known("k", secret.as_bytes()).build());
    let input = format!("x {} y", secret.replace('/', "\\u002F"));
    let slash = input.find('\\').expect("escape");
    for cut in slash..slash + 6 {
        assert_eq!(
            stream_all(&r, input.as_bytes(), &[cut]),
            b"x [REDACTED:k] y",
            "cut at {cut}"
        );
    }
}

#[test]
fn html_character_references_of_a_held_value_are_redacted() {
    let secret = format!("sk-{}/{}", fake(12, 71), fake(12, 72));
    let r = Redactor::builder().known("k", secret.as_bytes()).build();
    for enc in [
        secret.replace('-', "&#45;"),
        secret.replace('-', "&#x2d;").replace('/', "&#X2F;"),
        secret.replace('/', "&sol;"),
        secret.chars().map(|c| format!("&#{};", c as u32)).collect(),
    ] {
        assert_eq!(
            redact_str(&r, &format!("<p>bad key {enc}</p>")),
            "<p>bad key [REDACTED:k]</p>",
            "{enc}"
        );
    }
    // The benign neighbour: an ordinary page with references passes byte for byte.
    let page =
        "<a href=\"?a=1&amp;b=2\">caf&eacute; &#8212; &lt;sk&#45;learn&gt; &nbsp;</a> R&D & more";
    assert!(matches!(r.redact(page.as_bytes()), Cow::Borrowed(_)));
}

#[test]
fn request_scan_finds_a_json_escaped_held_value() {
    let secret = format!("{}+{}", fake(12, 69), fake(12, 70));
    let r = Redactor::builder()
        .known("k", secret.as_bytes())
        .detectors(true)
        .build();
    let body = format!(r#"{{"content":"{}"}}"#, secret.replace('+', "\\u002B"));
    assert_eq!(labels(&r, &body), vec!["k".to_string()]);
}

// --- detectors: true positives ----------------------------------------------------------------

#[test]
fn each_detector_finds_its_format() {
    let r = detectors();
    let aws_id = format!("AKIA{}", "Z3XQ7RT2PLMN4KWV");
    let cases: Vec<(String, &str)> = vec![
        (format!("sk-proj-{}", fake(64, 10)), "openai_key"),
        (format!("sk-{}", fake(48, 11)), "openai_key"),
        (format!("sk-ant-api03-{}", fake(90, 12)), "anthropic_key"),
        (format!("ghp_{}", fake(36, 13)), "github_token"),
        (
            format!("github_pat_{}_{}", fake(22, 14), fake(59, 15)),
            "github_token",
        ),
        (aws_id.clone(), "aws_access_key_id"),
        (
            format!("xoxb-{}-{}-{}", "1234567890", "0987654321", fake(24, 16)),
            "slack_token",
        ),
        (format!("AIza{}", fake(35, 17)), "google_api_key"),
        (format!("sk_live_{}", fake(24, 18)), "stripe_live_key"),
        (format!("kg_{}", fake(43, 19)), "keygate_token"),
        (
            format!(
                "{}.{}.{}",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
                URL_SAFE_NO_PAD.encode(r#"{"sub":"1234567890","name":"x"}"#),
                fake(43, 20)
            ),
            "jwt",
        ),
    ];
    for (token, label) in cases {
        let text = format!("value: \"{token}\"\n");
        assert_eq!(labels(&r, &text), vec![label.to_string()], "{token}");
        assert_eq!(
            redact_str(&r, &text),
            format!("value: \"[REDACTED:{label}]\"\n")
        );
    }
}

#[test]
fn private_key_block_is_redacted_from_begin_to_end() {
    let r = detectors();
    let dashes = "-".repeat(5);
    let block = format!(
        "{dashes}BEGIN RSA PRIVATE KEY{dashes}\n{}\n{}\n{dashes}END RSA PRIVATE KEY{dashes}",
        fake(64, 21),
        fake(40, 22)
    );
    let out = redact_str(&r, &format!("key:\n{block}\ndone"));
    assert_eq!(out, "key:\n[REDACTED:private_key]\ndone");
    // Inside JSON the newlines are `\n` escapes; the block is still one finding.
    let json = format!("{{\"k\":\"{}\"}}", block.replace('\n', "\\n"));
    assert_eq!(redact_str(&r, &json), "{\"k\":\"[REDACTED:private_key]\"}");
}

#[test]
fn private_key_without_end_is_redacted_up_to_the_cap() {
    let r = detectors();
    let dashes = "-".repeat(5);
    let body = fake(HOLD_BACK_MAX + 100, 23);
    let text = format!("{dashes}BEGIN PRIVATE KEY{dashes}\n{body}");
    let out = redact_str(&r, &text);
    assert!(out.starts_with("[REDACTED:private_key]"));
    assert_eq!(
        out.len(),
        "[REDACTED:private_key]".len() + text.len() - HOLD_BACK_MAX
    );
}

#[test]
fn authorization_header_keeps_its_scheme() {
    let r = detectors();
    let token = fake(40, 24);
    assert_eq!(
        redact_str(&r, &format!("Authorization: Bearer {token}1\r\n")),
        "Authorization: Bearer [REDACTED:authorization_header]\r\n"
    );
    let basic = STANDARD.encode("admin:hunter2hunter2");
    assert_eq!(
        redact_str(&r, &format!("authorization: Basic {basic}\n")),
        "authorization: Basic [REDACTED:authorization_header]\n"
    );
    // A token with its own detector is labelled by that detector.
    let kg = format!("kg_{}", fake(40, 25));
    assert_eq!(
        redact_str(&r, &format!("\"Authorization\": \"Bearer {kg}\"")),
        "\"Authorization\": \"Bearer [REDACTED:keygate_token]\""
    );
}

#[test]
fn password_assignment_with_high_entropy_value_is_redacted() {
    let r = detectors();
    // Keyword and value are joined at run time so this file passes `redact --check`.
    for (key, value) in [
        ("DB_PASSWORD=", "Xk9#mP2vL8qR4nT!"),
        ("password: ", "\"Tr0ub4dor&3-horse\""),
        ("client_secret = ", "'aB3dE5gH7jK9mN1pQ3sT'"),
        ("apiKey: ", "\"9fA2kQ7xL0pZ3mW8vB5n\""),
    ] {
        let line = &format!("{key}{value}\n");
        assert_eq!(
            labels(&r, line),
            vec!["password_assignment".to_string()],
            "{line}"
        );
        assert!(redact_str(&r, line).contains("[REDACTED:password_assignment]"));
    }
}

#[test]
fn aws_secret_is_found_by_keyword_and_next_to_its_key_id() {
    let r = detectors();
    let secret = format!("{}/{}+{}", fake(12, 26), fake(13, 27), fake(13, 28));
    assert_eq!(secret.len(), 40);
    let ini = format!("aws_secret_access_key = {secret}\n");
    assert_eq!(labels(&r, &ini), vec!["aws_secret_access_key"]);
    let id = format!("AKIA{}", "Z3XQ7RT2PLMN4KWV");
    let csv = format!("Access key ID,Secret access key\n{id},{secret}\n");
    assert_eq!(
        labels(&r, &csv),
        vec!["aws_access_key_id", "aws_secret_access_key"]
    );
}

// --- detectors: false positives ---------------------------------------------------------------

#[test]
fn ordinary_code_and_prose_are_left_alone() {
    let r = detectors();
    let samples = [
        "let token = tokens.next_token_id2(&mut self.state);",
        "password = config.password_file.clone()",
        "secret: SecretString::from(value),",
        "api_key = os.environ.get(\"OPENAI_API_KEY\")",
        "password: ${DB_PASSWORD}",
        "password = \"changeme\"",
        "token_budget = 2000000",
        "max_tokens: 4096,",
        "headers[\"Authorization\"] = \"Bearer \" + token",
        "Authorization: Bearer <token>",
        "Authorization: Bearer accessToken",
        "pip install scikit-learn; the task-runner uses sk-learn-compatible-estimators-here",
        "desk-top AKIAxyz ghp_short xoxb-abc AIzaShort sk_live_x kg_tooShort eyJhbGciOi",
        "-----BEGIN PUBLIC KEY-----",
        "the key is at ~/.ssh/id_ed25519 and tokens are hashed with sha256",
        "mask-0123456789ABCDEFGHIJKLMNOPabcdef", // `sk-` inside a word
        "//! Issued tokens: `state_dir/tokens.json`, written by the CLI",
    ];
    for s in samples {
        assert_eq!(labels(&r, s), Vec::<String>::new(), "{s}");
    }
}

#[test]
fn detector_names_are_the_documented_labels() {
    assert_eq!(
        detector_names(),
        vec![
            "anthropic_key",
            "openai_key",
            "github_token",
            "aws_access_key_id",
            "aws_secret_access_key",
            "slack_token",
            "google_api_key",
            "stripe_live_key",
            "keygate_token",
            "jwt",
            "private_key",
            "authorization_header",
            "password_assignment",
        ]
    );
}

// --- streams --------------------------------------------------------------------------------

#[test]
fn stream_holds_back_only_a_possible_prefix() {
    let secret = fake(32, 30);
    let r = Arc::new(Redactor::builder().known("k", secret.as_bytes()).build());
    let mut s = Arc::clone(&r).stream();
    // No byte of "hello " can start the secret: all of it goes out at once.
    assert_eq!(&s.push(b"hello ")[..], b"hello ");
    // The first 5 bytes of the secret are held, the text before is not.
    let head = format!("world {}", &secret[..5]);
    assert_eq!(&s.push(head.as_bytes())[..], b"world ");
    let rest = format!("{} end", &secret[5..]);
    let mut out = s.push(rest.as_bytes()).to_vec();
    out.extend_from_slice(&s.finish());
    assert_eq!(out, b"[REDACTED:k] end");
}

#[test]
fn stream_with_detectors_emits_plain_text_immediately() {
    let r = Arc::new(detectors());
    let mut s = Arc::clone(&r).stream();
    assert_eq!(&s.push(b"plain line\n")[..], b"plain line\n");
    // An anchor and an unfinished token are held until a byte ends the token.
    let head = format!("x sk-proj-{}", fake(30, 31));
    assert_eq!(&s.push(head.as_bytes())[..], b"x ");
    let out = s.push(b"Zz9 tail");
    assert_eq!(&out[..], b"[REDACTED:openai_key] tail");
}

#[test]
fn hold_back_bound_covers_the_longest_spelling() {
    let secret = fake(100, 32);
    let r = Redactor::builder().known("k", secret.as_bytes()).build();
    assert!(r.hold_back_bound() >= 2 * secret.len() - 1);
    assert!(Redactor::builder().build().hold_back_bound() >= HOLD_BACK_MAX);
}

/// Pieces of a document: filler and every spelling of two secrets and of each detector.
fn corpus() -> (Vec<String>, Vec<(String, Vec<u8>)>) {
    let s1 = format!("{}:{}", fake(18, 40), fake(9, 41)); // has a reserved character
    let s2 = fake(24, 42);
    // `/`, `+` and a non-ASCII character: JSON encoders disagree on all three.
    let s3 = format!("{}/{}+{}\u{e9}", fake(10, 60), fake(10, 61), fake(6, 62));
    let dashes = "-".repeat(5);
    let pieces = vec![
        s1.clone(),
        STANDARD.encode(&s1),
        URL_SAFE_NO_PAD.encode(&s2),
        STANDARD.encode(format!("user:{s2}")),
        STANDARD.encode(format!("us:{s1}")),
        percent_encoding::utf8_percent_encode(&s1, percent_encoding::NON_ALPHANUMERIC).to_string(),
        hex::encode(&s2),
        hex::encode_upper(&s1),
        s2.clone(),
        format!("sk-proj-{}", fake(50, 43)),
        format!("sk-ant-api03-{}", fake(80, 44)),
        format!("ghp_{}", fake(36, 45)),
        format!("AKIA{},{}", "Z3XQ7RT2PLMN4KWV", fake(40, 46)),
        format!("xoxp-1234-{}", fake(20, 47)),
        format!("AIza{}", fake(35, 48)),
        format!("sk_live_{}", fake(24, 49)),
        format!("kg_{}", fake(40, 50)),
        format!("eyJ{}.eyJ{}.{}", fake(20, 51), fake(30, 52), fake(40, 53)),
        format!(
            "{dashes}BEGIN EC PRIVATE KEY{dashes}\n{}\n{dashes}END EC PRIVATE KEY{dashes}",
            fake(90, 54)
        ),
        format!("Authorization: Bearer {}9", fake(30, 55)),
        format!("password = {}!#", fake(20, 56)),
        "filler text ".into(),
        " ".into(),
        "\n".into(),
        "sk".into(),
        "-".into(),
        "eyJ".into(),
        "AKIA".into(),
        "pass".into(),
        "word".into(),
        "=".into(),
        "token".into(),
        "Zq".into(),
        s3.clone(),
        json_escaped(&s3, Php),
        json_escaped(&s3, DotNet),
        json_escaped(&s3, Python),
        json_escaped(&s3, Everything),
        "\\".into(),
        "\\u".into(),
        "\\/".into(),
        "\\u00".into(),
        "\\ud83d".into(),
        "\\ude00".into(),
        "\\u002B".into(),
        "\\\\".into(),
        "\\\"".into(),
        "\\n".into(),
        s3.replace('/', "&#x2F;").replace('+', "&plus;"),
        "&".into(),
        "&#".into(),
        "&#4".into(),
        "&amp;".into(),
        "&#x2F;".into(),
    ];
    (
        pieces,
        vec![
            ("k1".into(), s1.into_bytes()),
            ("k2".into(), s2.into_bytes()),
            ("k3".into(), s3.into_bytes()),
        ],
    )
}

/// Labelled held values.
type Held = Vec<(String, Vec<u8>)>;

/// The corpus pieces `picks` names, then `noise`, and a detecting builder holding the corpus's
/// values.
fn corpus_input(picks: &[usize], noise: &[u8]) -> (Vec<u8>, RedactorBuilder, Held) {
    let (pieces, held) = corpus();
    let mut input = Vec::new();
    for p in picks {
        input.extend_from_slice(pieces[p % pieces.len()].as_bytes());
    }
    input.extend_from_slice(noise);
    let mut b = Redactor::builder().detectors(true);
    for (l, v) in &held {
        b = b.known(l, v);
    }
    (input, b, held)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The core property: chunking never changes the output, so a secret split across chunks
    /// is redacted exactly as in one buffer and no other byte is altered.
    #[test]
    fn stream_output_equals_whole_buffer_redaction_for_any_chunking(
        picks in proptest::collection::vec(0usize..54, 1..24),
        noise in proptest::collection::vec(any::<u8>(), 0..16),
        cuts in proptest::collection::vec(0usize..4096, 0..12),
    ) {
        let (input, b, held) = corpus_input(&picks, &noise);
        let r = Arc::new(b.build());
        let whole = r.redact(&input).into_owned();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(&stream_all(&r, &input, &cuts), &whole);
        for (_, v) in &held {
            prop_assert!(!whole.windows(v.len()).any(|w| w == v.as_slice()));
        }
    }

    /// `find_with`'s own findings are `find`'s, whatever the extra set finds beside them: the
    /// audit record keeps a URL's path as it is when the strong set found nothing there
    /// (`scan::Target`), which is sound only if that means `redact` would change nothing.
    #[test]
    fn find_with_own_findings_are_find_whatever_the_extra_set_finds(
        picks in proptest::collection::vec(0usize..54, 1..24),
        noise in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let (input, b, _) = corpus_input(&picks, &noise);
        let strong = b.build().with_detector_set(DetectorSet::class(Class::Strong));
        for extra in [DetectorSet::class(Class::Generic), DetectorSet::NONE, DetectorSet::ALL] {
            let (own, _) = strong.find_with(&input, extra);
            prop_assert_eq!(&own, &strong.find(&input));
            prop_assert_eq!(own.is_empty(), matches!(strong.redact(&input), Cow::Borrowed(_)));
        }
    }

    /// Byte-at-a-time is the harshest chunking; random bytes must pass through untouched.
    #[test]
    fn stream_of_single_bytes_equals_whole_buffer(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let r = Arc::new(Redactor::builder().known("k", b"needle-in-haystack").detectors(true).build());
        let cuts: Vec<usize> = (0..data.len()).collect();
        prop_assert_eq!(stream_all(&r, &data, &cuts), r.redact(&data).into_owned());
    }
}

/// 40 held values that share prefixes, overlap and contain each other, and their redactor
/// (built once: hundreds of spellings).
fn many_held() -> &'static (Vec<Vec<u8>>, Arc<Redactor>) {
    static M: std::sync::OnceLock<(Vec<Vec<u8>>, Arc<Redactor>)> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let stem = fake(60, 70);
        let mut held: Vec<Vec<u8>> = Vec::new();
        for i in 0..40 {
            let v = match i % 4 {
                // Prefixes of one another.
                0 => stem[..8 + i].to_string(),
                // Overlapping: a suffix of the stem and more.
                1 => format!("{}{}", &stem[i..i + 12], fake(6, i as u64)),
                2 => fake(8 + i % 30, 100 + i as u64),
                _ => format!("{}{}", fake(5, 7), fake(10 + i, 200 + i as u64)),
            };
            held.push(v.into_bytes());
        }
        let mut b = Redactor::builder().detectors(true);
        for (i, v) in held.iter().enumerate() {
            b = b.known(&format!("m{i}"), v);
        }
        (held, Arc::new(b.build()))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// With many held values (hundreds of spellings: the skip search of `many.rs`), values that
    /// share prefixes, overlap and contain each other are redacted in a stream exactly as in one
    /// buffer, and none survives.
    #[test]
    fn many_held_values_stream_as_whole_buffer_and_none_survives(
        picks in proptest::collection::vec((0usize..40, 0usize..4), 1..30),
        cuts in proptest::collection::vec(0usize..4096, 0..12),
    ) {
        let (held, r) = many_held();
        let mut input = Vec::new();
        for (i, how) in picks {
            let v = &held[i];
            match how {
                0 => input.extend_from_slice(v),
                1 => input.extend_from_slice(STANDARD.encode(v).as_bytes()),
                2 => input.extend_from_slice(&v[..v.len() / 2]),
                _ => input.extend_from_slice(b" the model said "),
            }
        }
        let whole = r.redact(&input).into_owned();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        prop_assert_eq!(&stream_all(r, &input, &cuts), &whole);
        for v in held {
            prop_assert!(!whole.windows(v.len()).any(|w| w == v.as_slice()));
        }
    }

    /// `push` hands over the joined held and new bytes as its output when nothing in them is
    /// replaced: every push still emits exactly what the callback scanner emits at that
    /// moment (no byte held longer, none early), for any chunking and chunk sizes.
    #[test]
    fn each_push_emits_what_the_scanner_emits_at_that_chunk(
        picks in proptest::collection::vec(0usize..54, 1..24),
        sizes in proptest::collection::vec(0usize..700, 1..16),
    ) {
        let (pieces, held) = corpus();
        let mut input = Vec::new();
        for p in picks {
            input.extend_from_slice(pieces[p % pieces.len()].as_bytes());
        }
        let mut b = Redactor::builder().detectors(true);
        for (l, v) in &held {
            b = b.known(l, v);
        }
        let r = Arc::new(b.build());
        let mut stream = Arc::clone(&r).stream();
        let mut reference = Scanner::new(Arc::clone(&r));
        let mut at = 0;
        for size in sizes.iter().cycle().take(64) {
            let end = (at + size).min(input.len());
            let chunk = &input[at..end];
            let mut want = Vec::new();
            reference.push(chunk, false, |bytes, spans| r.render(bytes, spans, &mut want));
            prop_assert_eq!(&stream.push(chunk)[..], &want[..]);
            at = end;
            if at == input.len() {
                break;
            }
        }
    }
}

#[test]
fn debug_names_key_ids_but_never_a_pattern() {
    let value = b"sk-canary-debug-0123456789abcdef";
    let r = Redactor::builder()
        .known("k#1", value)
        .detectors(true)
        .build();
    let dbg = format!("{r:?}");
    assert!(
        dbg.contains("k#1") && dbg.contains("detectors: true"),
        "{dbg}"
    );
    for spelling in [&value[..], hex::encode(value).as_bytes()] {
        assert!(
            !dbg.contains(std::str::from_utf8(spelling).unwrap()),
            "{dbg}"
        );
    }
    // nor the bytes as a list of numbers, as a derived Debug of a Vec<u8> would print them
    assert!(!dbg.contains("115, 107, 45"), "{dbg}");
}

/// Dense anchors whose windows overlap hold long runs back; the stream then skips rescans
/// (waiting for a byte that can change the pending verdict, or batching) and must still give
/// exactly the whole-buffer output.
#[test]
fn stream_of_dense_overlapping_anchors_equals_whole_buffer() {
    let r = Arc::new(detectors());
    let dashes = "-".repeat(5);
    let units = [
        "authorization=a1".to_string(),
        "eyJ-".to_string(),
        "pwd=aA1aA1aA1a".to_string(),
        format!("{dashes}BEGIN RSA PRIVATE KEY{dashes}\n"),
        "-sk-a".to_string(),
    ];
    for unit in units {
        let mut input: Vec<u8> = unit.bytes().cycle().take(40_000).collect();
        input.extend_from_slice(
            format!("\n{dashes}END RSA PRIVATE KEY{dashes}\nplain tail ").as_bytes(),
        );
        input.extend(unit.bytes().cycle().take(9_000));
        let whole = r.redact(&input).into_owned();
        for step in [1usize, 64, 1000] {
            let cuts: Vec<usize> = (step..input.len()).step_by(step).collect();
            assert!(
                stream_all(&r, &input, &cuts) == whole,
                "{unit:?} in chunks of {step}"
            );
        }
    }
}
