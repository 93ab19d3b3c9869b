use std::path::Path;

use super::*;

fn config(route_extra: &str) -> Config {
    let text = format!(
        "[secrets.k]\nsource = \"none\"\n[routes.gh]\nprefix = \"/gh\"\nupstream = \"http://127.0.0.1:1\"\nsecret = \"k\"\nplaceholder_env = \"GITHUB_TOKEN\"\n{route_extra}\n[routes.other]\nprefix = \"/o\"\nupstream = \"http://127.0.0.1:1\"\nsecret = \"k\"\nplaceholder_env = \"OTHER_TOKEN\"\n[agents.a]\n"
    );
    Config::from_text(Path::new("c.toml"), &text).unwrap()
}

/// A registry holding one run's placeholders; returns it with the one for `gh`.
fn registry(c: &Config) -> (Registry, String, String) {
    let reg = Registry::default();
    let routes: Vec<&Route> = c.routes.iter().collect();
    let made = reg.mint_for_run("tok_run1", "a", &routes);
    let gh = made.iter().find(|(r, _)| r == "gh").unwrap().1.clone();
    let other = made.iter().find(|(r, _)| r == "other").unwrap().1.clone();
    (reg, gh, other)
}

fn basic(pair: &str) -> HeaderValue {
    let b = base64::engine::general_purpose::STANDARD.encode(pair);
    HeaderValue::from_str(&format!("Basic {b}")).unwrap()
}

fn headers(pairs: &[(&str, HeaderValue)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.clone());
    }
    h
}

fn run(
    c: &Config,
    lifted: Lifted,
    placeholder: Option<&str>,
    h: &mut HeaderMap,
    query: &mut Option<String>,
    body: Option<&mut Bytes>,
) -> Result<bool, Rejection> {
    let target = Target {
        headers: h,
        query,
        body,
        max_body: 1 << 20,
    };
    substitute(&c.routes[0], lifted, placeholder, b"REAL/+=", target)
}

#[test]
fn placeholders_name_their_route_and_differ_per_mint() {
    let a = mint("github");
    let b = mint("github");
    assert!(a.starts_with("kgph_github_"));
    assert_eq!(a.len(), "kgph_github_".len() + RANDOM_LEN);
    assert_ne!(a, b);
}

#[test]
fn bearer_placeholder_is_lifted_before_authenticate_and_replaced_by_the_credential() {
    let c = config("");
    let (reg, gh, _) = registry(&c);
    let bearer = HeaderValue::from_str(&format!("Bearer {gh}")).unwrap();
    let mut h = headers(&[("authorization", bearer)]);
    let lifted = lift(&mut h, &reg, true).unwrap();
    assert!(h.get("authorization").is_none());
    assert_eq!(lifted.owner().unwrap().token_id, "tok_run1");
    let mut q = None;
    let in_header = run(&c, lifted, Some(&gh), &mut h, &mut q, None).unwrap();
    assert!(in_header);
    assert_eq!(h["authorization"], "Bearer REAL/+=");
    assert!(h["authorization"].is_sensitive());
}

#[test]
fn basic_placeholder_keeps_the_username_git_sent() {
    let c = config("");
    let (reg, gh, _) = registry(&c);
    let mut h = headers(&[("authorization", basic(&format!("x-access-token:{gh}")))]);
    let lifted = lift(&mut h, &reg, true).unwrap();
    let mut q = None;
    run(&c, lifted, Some(&gh), &mut h, &mut q, None).unwrap();
    assert_eq!(h["authorization"], basic("x-access-token:REAL/+="));
}

#[test]
fn token_header_placeholder_is_replaced_in_place() {
    let c = config("");
    let (reg, gh, _) = registry(&c);
    let mut h = headers(&[("private-token", HeaderValue::from_str(&gh).unwrap())]);
    let lifted = lift(&mut h, &reg, true).unwrap();
    let mut q = None;
    assert!(run(&c, lifted, Some(&gh), &mut h, &mut q, None).unwrap());
    assert_eq!(h["private-token"], "REAL/+=");
}

#[test]
fn placeholder_of_another_route_in_a_credential_header_is_refused() {
    let c = config("");
    let (reg, gh, other) = registry(&c);
    let mut h = headers(&[("x-api-key", HeaderValue::from_str(&other).unwrap())]);
    let lifted = lift(&mut h, &reg, true).unwrap();
    let mut q = None;
    let e = run(&c, lifted, Some(&gh), &mut h, &mut q, None).unwrap_err();
    assert_eq!(e.code, Code::PlaceholderMismatch);
}

#[test]
fn ended_runs_placeholder_in_a_credential_header_is_refused_and_elsewhere_is_text() {
    let c = config("");
    let (reg, gh, _) = registry(&c);
    reg.forget_run("tok_run1");
    let bearer = HeaderValue::from_str(&format!("Bearer {gh}")).unwrap();
    let mut h = headers(&[("authorization", bearer)]);
    assert_eq!(
        lift(&mut h, &reg, true).unwrap_err().code,
        Code::PlaceholderMismatch
    );
    // Benign: an ordinary header that mentions a kgph_ string is the agent's text.
    let mut h = headers(&[("x-note", HeaderValue::from_str(&gh).unwrap())]);
    let lifted = lift(&mut h, &reg, true).unwrap();
    assert!(lifted.owner().is_none());
    assert_eq!(h["x-note"], gh.as_str());
}

#[test]
fn placeholders_of_two_runs_in_one_request_are_refused() {
    let c = config("");
    let (reg, gh, _) = registry(&c);
    let routes: Vec<&Route> = c.routes.iter().collect();
    let second = reg.mint_for_run("tok_run2", "a", &routes);
    let mut h = headers(&[
        (
            "authorization",
            HeaderValue::from_str(&format!("Bearer {gh}")).unwrap(),
        ),
        (
            "private-token",
            HeaderValue::from_str(&second[0].1).unwrap(),
        ),
    ]);
    assert_eq!(
        lift(&mut h, &reg, true).unwrap_err().code,
        Code::PlaceholderMismatch
    );
}

#[test]
fn a_request_with_only_a_placeholder_is_its_runs_and_a_token_must_be_the_same_runs() {
    let c = config("");
    let (reg, gh, _) = registry(&c);
    let mut h = headers(&[("x-api-key", HeaderValue::from_str(&gh).unwrap())]);
    let lifted = lift(&mut h, &reg, true).unwrap();
    let missing = Err(Rejection::new(Code::MissingToken, "none"));
    let who = identify(missing, &lifted, &c, true, |_| true).unwrap();
    assert_eq!(who.token_id.as_deref(), Some("tok_run1"));
    assert_eq!(who.agent, AgentId(0));
    // The run's lease ended between the lookup and now.
    let missing = Err(Rejection::new(Code::MissingToken, "none"));
    let e = identify(missing, &lifted, &c, true, |_| false).unwrap_err();
    assert_eq!(e.code, Code::PlaceholderMismatch);
    let other_run = Ok(Identity {
        agent: AgentId(0),
        token_id: Some("tok_run9".into()),
        person: None,
    });
    let e = identify(other_run, &lifted, &c, true, |_| true).unwrap_err();
    assert_eq!(e.code, Code::PlaceholderMismatch);
    let same_run = Ok(Identity {
        agent: AgentId(0),
        token_id: Some("tok_run1".into()),
        person: None,
    });
    assert!(identify(same_run, &lifted, &c, true, |_| true).is_ok());
}

#[test]
fn foreign_token_on_a_placeholder_route_is_refused_and_the_callers_own_token_is_not() {
    let c = config("");
    let (reg, _, _) = registry(&c);
    let token = ["kg_", &"CallerToken".repeat(3)].concat();
    let id = format!("tok_{}", &hex::encode(hash(token.as_bytes()))[..12]);
    let bearer = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    let mut h = headers(&[("authorization", bearer)]);
    let lifted = lift(&mut h, &reg, true).unwrap();
    crate::authenticate::strip_caller_credentials(&mut h);
    assert!(check_foreign(&c.routes[0], &lifted, Some(&id), &h).is_ok());
    let e = check_foreign(&c.routes[0], &lifted, Some("tok_other"), &h).unwrap_err();
    assert_eq!(e.code, Code::PlaceholderMismatch);
    // A token header authenticate does not strip.
    let foreign = ["glpat", "-", "x".repeat(20).as_str()].concat();
    let h = headers(&[("private-token", HeaderValue::from_str(&foreign).unwrap())]);
    let e = check_foreign(&c.routes[0], &Lifted::default(), Some(&id), &h).unwrap_err();
    assert_eq!(e.code, Code::PlaceholderMismatch);
}

#[test]
fn query_and_body_are_replaced_only_where_the_route_opted_in() {
    let c = config("placeholder_in = [\"query\", \"body\"]");
    let (_, gh, _) = registry(&c);
    let mut h = headers(&[("content-type", HeaderValue::from_static("application/json"))]);
    let mut q = Some(format!("a=1&token={gh}"));
    let mut body = Bytes::from(format!("{{\"key\":\"{gh}\",\"n\":1}}"));
    run(
        &c,
        Lifted::default(),
        Some(&gh),
        &mut h,
        &mut q,
        Some(&mut body),
    )
    .unwrap();
    let expected = ["a=1&token=", "REAL%2F%2B%3D"].concat();
    assert_eq!(q.as_deref(), Some(expected.as_str()));
    assert_eq!(&body[..], br#"{"key":"REAL/+=","n":1}"#);

    let c = config("");
    let mut q = Some(format!("token={gh}"));
    let text = format!("{{\"key\":\"{gh}\"}}");
    let mut body = Bytes::from(text.clone());
    run(
        &c,
        Lifted::default(),
        Some(&gh),
        &mut h,
        &mut q,
        Some(&mut body),
    )
    .unwrap();
    assert_eq!(q, Some(format!("token={gh}")));
    assert_eq!(&body[..], text.as_bytes());
}

#[test]
fn placeholder_in_rejects_websocket_and_unknown_positions() {
    let items = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(Positions::parse(&items(&["websocket"]))
        .unwrap_err()
        .contains("WebSockets"));
    assert!(Positions::parse(&items(&["cookie"])).is_err());
    assert_eq!(
        Positions::parse(&items(&["headers", "body"])).unwrap(),
        Positions {
            query: false,
            body: true
        }
    );
}

#[test]
fn placeholders_are_not_taken_for_secrets_by_the_scan_or_the_redactor() {
    let all = crate::redact::Redactor::builder()
        .detectors(true)
        .detector_set(crate::redact::DetectorSet::ALL)
        .build();
    for _ in 0..50 {
        let p = mint("github");
        let text = format!("token={p} Authorization: Bearer {p} {{\"api_key\":\"{p}\"}}");
        assert!(all.find(text.as_bytes()).is_empty(), "{text}");
        assert_eq!(&*all.redact(text.as_bytes()), text.as_bytes());
    }
}

#[test]
fn find_all_takes_whole_words_only() {
    assert_eq!(
        find_all(b"a kgph_r_Ab1 xkgph_no kgph_s-1_Z."),
        vec![b"kgph_r_Ab1".to_vec(), b"kgph_s-1_Z".to_vec()]
    );
}

#[test]
fn masking_blanks_each_placeholder_where_it_stands_not_every_copy_of_its_text() {
    // Found by the placeholder_headers fuzz target: replacing each found string everywhere
    // blanked `kgph_aB` inside `kgph_aBkgph_a` and left a whole `kgph_a` for the scan.
    let text = b"kgph_aB \" kgph_aBkgph_a~ xkgph_a";
    assert_eq!(mask(text), b"  \"  ~ xkgph_a".to_vec());
    assert_eq!(mask(b"no placeholder"), b"no placeholder".to_vec());
    assert_eq!(mask(b"kgph_a"), b" ".to_vec());
}
