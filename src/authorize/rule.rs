//! Allow rules (`POST /v1/chat/completions`) and rates (`60/min`): parsed once at config load,
//! matched per request. A leaf module, so config can build them without depending on the policy
//! stage that uses them.

use std::time::Duration;

use http::Method;
use serde::Serialize;

/// One allow rule: `POST /v1/chat/completions`, `GET /v1/files/*`, `* /v1/**`, and with the
/// query parameters it allows: `POST /v1/messages?beta` (only `beta`), `GET /v1/models?` (none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    method: Option<Method>,
    segments: Vec<Segment>,
    query: Query,
    text: String,
}

/// Which query strings a rule allows.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Query {
    /// Any (a rule written without `?`, and no route `query` key).
    Any,
    /// Only parameters of these names (decoded); an empty list allows no query string at all.
    Only(Vec<String>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one non-empty segment.
    One,
    /// `**` (last only): any number of segments, including none.
    Rest,
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl Rule {
    /// Parses `METHOD /path` (`*` for one segment, `**` last for the rest); the error says how to
    /// write it.
    pub fn parse(s: &str) -> Result<Rule, String> {
        let (method, path) = s.trim().split_once(' ').ok_or_else(|| {
            format!("{s:?} is not a rule; write METHOD /path, e.g. \"POST /v1/chat/completions\"")
        })?;
        let method = match method {
            "*" | "ANY" => None,
            m => Some(
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| format!("{m:?} is not an HTTP method"))?,
            ),
        };
        if let Some(m) = &method {
            if m.as_str().chars().any(|c| c.is_ascii_lowercase()) {
                return Err(format!("method {m} must be upper case"));
            }
        }
        let (path, query) = match path.trim().split_once('?') {
            Some((p, q)) => (p, Query::Only(parse_names(q)?)),
            None => (path.trim(), Query::Any),
        };
        if !path.starts_with('/') {
            return Err(format!("path {path:?} must start with /"));
        }
        if path.contains('%') {
            return Err(format!(
                "path {path:?}: write it decoded (rules match the decoded path)"
            ));
        }
        crate::route::path::check_path(&path.replace('*', "x"))
            .map_err(|why| format!("path {path:?} refused: {why}"))?;
        let parts: Vec<&str> = path[1..].split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            segments.push(match *p {
                "*" => Segment::One,
                "**" if i == parts.len() - 1 => Segment::Rest,
                p if p.contains('*') => {
                    return Err(format!(
                        "{p:?}: * must be a whole segment, and ** only the last"
                    ))
                }
                p => Segment::Literal(p.to_string()),
            });
        }
        Ok(Rule {
            method,
            segments,
            query,
            text: s.trim().to_string(),
        })
    }

    /// The rule with the route's `query` names, unless it names its own.
    pub fn default_query(mut self, names: &[String]) -> Result<Rule, String> {
        if self.query == Query::Any {
            self.query = Query::Only(parse_names(&names.join("&"))?);
            self.text = format!("{}?{}", self.text, names.join("&"));
        }
        Ok(self)
    }

    /// A rule for one exact path (the lab's `allowed_paths`): `*` in it is literal.
    pub fn exact(method: &str, path: &str) -> Result<Rule, String> {
        let method = Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
        let segments = path[1..]
            .split('/')
            .map(|p| Segment::Literal(p.to_string()))
            .collect();
        Ok(Rule {
            method: Some(method.clone()),
            segments,
            query: Query::Only(Vec::new()),
            text: format!("{method} {path}"),
        })
    }

    /// Whether the rule's method and query-name conditions hold (the path is checked apart).
    fn admits(&self, method: &Method, query: Option<&str>) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        match (&self.query, query) {
            // The lab compared the whole target, so even a bare `?` is another path there.
            (Query::Only(names), Some(q)) => {
                !names.is_empty() && query_names(q).all(|n| n.is_some_and(|n| names.contains(&n)))
            }
            _ => true,
        }
    }

    /// Whether the rule allows this method on this path with this query string (`None`: the
    /// target had no `?`).
    pub fn matches(&self, method: &Method, path: &str, query: Option<&str>) -> bool {
        let Some(path) = self
            .admits(method, query)
            .then(|| path.strip_prefix('/'))
            .flatten()
        else {
            return false;
        };
        // A byte split: `str::split`'s searcher cost more to set up than these short paths.
        let mut parts = path.as_bytes().split(|&b| b == b'/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::One => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(l) => match parts.next() {
                    Some(p) if p == l.as_bytes() => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }

    /// [`Rule::matches`] as it was, splitting the path with `str::split`.
    #[cfg(test)]
    fn matches_by_str_split(&self, method: &Method, path: &str, query: Option<&str>) -> bool {
        let Some(path) = self
            .admits(method, query)
            .then(|| path.strip_prefix('/'))
            .flatten()
        else {
            return false;
        };
        let mut parts = path.split('/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return true,
                Segment::One => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Segment::Literal(l) => match parts.next() {
                    Some(p) if p == l => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

/// The names a rule's `?a&b` allows: plain names, as an upstream decodes them.
fn parse_names(q: &str) -> Result<Vec<String>, String> {
    q.split('&')
        .filter(|n| !n.is_empty())
        .map(|n| {
            if n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.[]".contains(&b))
            {
                Ok(n.to_string())
            } else {
                Err(format!(
                    "query parameter {n:?}: write plain names, e.g. \"POST /v1/messages?beta\""
                ))
            }
        })
        .collect()
}

/// Each parameter's name in a query string, decoded as a server reads it (`+` is a space,
/// percent-decoding); `None` for a name that is not UTF-8, which no rule allows.
fn query_names(q: &str) -> impl Iterator<Item = Option<String>> + '_ {
    q.split(['&', ';']).filter(|p| !p.is_empty()).map(|pair| {
        let name = pair
            .split_once('=')
            .map_or(pair, |(n, _)| n)
            .replace('+', " ");
        percent_encoding::percent_decode_str(&name)
            .decode_utf8()
            .ok()
            .map(|n| n.into_owned())
    })
}

/// `60/min`: at most `count` requests per `per`, refilled continuously.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rate {
    /// Requests allowed per period; also the burst size.
    pub count: u32,
    /// The period, e.g. one minute for `/min`.
    #[serde(with = "humantime_serde")]
    pub per: Duration,
}

impl Rate {
    /// Parses `COUNT/UNIT` (unit: second, minute, hour or day); a count of 0 is refused.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let bad = || {
            format!("{s:?} is not a rate; write COUNT/UNIT, e.g. 60/min (units: s, min, h, day)")
        };
        let (n, unit) = s.split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(
                "a rate of 0 refuses every request; remove the route from the agent instead".into(),
            );
        }
        Ok(Rate { count, per })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(s: &str) -> Method {
        Method::from_bytes(s.as_bytes()).unwrap()
    }

    #[test]
    fn a_query_rule_allows_its_named_parameters_only() {
        let r = Rule::parse("POST /v1/messages?beta").unwrap();
        let p = |q| r.matches(&m("POST"), "/v1/messages", q);
        assert!(p(None) && p(Some("beta=true")) && p(Some("beta")) && p(Some("%62eta=1")));
        assert!(!p(Some("beta=1&other=2")) && !p(Some("other=2")));
        let none = Rule::parse("GET /v1/models?").unwrap();
        assert!(none.matches(&m("GET"), "/v1/models", None));
        assert!(!none.matches(&m("GET"), "/v1/models", Some("a=1")));
        let any = Rule::parse("GET /v1/models").unwrap();
        assert!(any.matches(&m("GET"), "/v1/models", Some("after=x&limit=2")));
        let lab = Rule::exact("POST", "/v1/chat/completions").unwrap();
        assert!(!lab.matches(&m("POST"), "/v1/chat/completions", Some("x=1")));
        assert!(!lab.matches(&m("POST"), "/v1/chat/completions", Some("")));
        assert!(Rule::parse("POST /x?a=1").is_err());
        let routed = Rule::parse("GET /v1/models")
            .unwrap()
            .default_query(&["limit".into()])
            .unwrap();
        assert!(!routed.matches(&m("GET"), "/v1/models", Some("after=x")));
    }

    #[test]
    fn rule_matches_method_and_exact_segments() {
        let r = Rule::parse("POST /v1/chat/completions").unwrap();
        assert!(r.matches(&m("POST"), "/v1/chat/completions", None));
        assert!(!r.matches(&m("GET"), "/v1/chat/completions", None));
        assert!(!r.matches(&m("POST"), "/v1/chat/completions/x", None));
        assert!(!r.matches(&m("POST"), "/v1/chat", None));
        assert!(!r.matches(&m("POST"), "/v1/chat/completions/", None));
    }

    #[test]
    fn star_is_one_segment_and_double_star_the_rest() {
        let one = Rule::parse("GET /v1/files/*").unwrap();
        assert!(one.matches(&m("GET"), "/v1/files/abc", None));
        assert!(!one.matches(&m("GET"), "/v1/files/abc/content", None));
        assert!(!one.matches(&m("GET"), "/v1/files/", None));
        let rest = Rule::parse("* /v1/**").unwrap();
        assert!(rest.matches(&m("DELETE"), "/v1/files/abc/content", None));
        assert!(rest.matches(&m("GET"), "/v1", None));
        assert!(!rest.matches(&m("GET"), "/v2/x", None));
    }

    #[test]
    fn malformed_rules_say_how_to_write_one() {
        for bad in [
            "POST",
            "post /x",
            "POST x",
            "GET /a*b",
            "GET /**/x",
            "GET /a/../b",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_parses_units() {
        assert_eq!(Rate::parse("60/min").unwrap().per, Duration::from_secs(60));
        assert!(Rate::parse("0/min").is_err());
        assert!(Rate::parse("ten/min").is_err());
    }

    proptest! {
        // A literal rule matches exactly its own path, and no path that differs in any segment.
        #[test]
        fn literal_rule_matches_only_its_path(
            segs in proptest::collection::vec("[a-z0-9._-]{1,8}", 1..5),
            other in proptest::collection::vec("[a-z0-9._-]{1,8}", 1..5),
        ) {
            prop_assume!(!segs.iter().any(|s| s == "." || s == ".."));
            let path = format!("/{}", segs.join("/"));
            let rule = Rule::parse(&format!("POST {path}")).unwrap();
            prop_assert!(rule.matches(&Method::POST, &path, None));
            let other_path = format!("/{}", other.join("/"));
            prop_assert_eq!(rule.matches(&Method::POST, &other_path, None), other_path == path);
        }

        // Splitting the path's bytes decides as splitting the string did.
        #[test]
        fn matches_as_the_string_split_did(
            rule in prop_oneof![
                Just("POST /v1/chat/completions"),
                Just("GET /v1/*"),
                Just("GET /f/*/x"),
                Just("POST /v1/**"),
                Just("GET /"),
                Just("POST /v1/messages?beta"),
                Just("GET /a/*/**"),
            ],
            path in prop_oneof![
                Just("/v1/chat/completions".to_string()),
                Just("/v1/chat/completions/".to_string()),
                Just("/v1//x".to_string()),
                Just("/f/a/x".to_string()),
                Just("/a/b/c/d".to_string()),
                "/?[a-z1/]{0,16}",
            ],
            query in proptest::option::of("[a-z=&]{0,8}"),
            get in any::<bool>(),
        ) {
            let rule = Rule::parse(rule).unwrap();
            let method = if get { Method::GET } else { Method::POST };
            prop_assert_eq!(
                rule.matches(&method, &path, query.as_deref()),
                rule.matches_by_str_split(&method, &path, query.as_deref())
            );
        }

        // `*` never lets a request cross a segment boundary.
        #[test]
        fn star_never_matches_more_than_one_segment(a in "[a-z]{1,6}", b in "[a-z]{1,6}") {
            let rule = Rule::parse("GET /f/*").unwrap();
            let one = format!("/f/{a}");
            let two = format!("/f/{a}/{b}");
            prop_assert!(rule.matches(&Method::GET, &one, None));
            prop_assert!(!rule.matches(&Method::GET, &two, None));
        }
    }
}
