//! Stage `route`: which upstream a request goes to.
//!
//! Input: the request's raw path, and the host when it came through the forward proxy.
//! Output: a [`Routed`] naming the route and the path relative to it, or a refusal.
//!
//! Paths are matched on their decoded form, but only after every ambiguous spelling has been
//! refused: `%2e`, `%2f`, `%5c`, `%25`, `%00`, `\`, `//`, `.`/`..` segments, `;`, control bytes,
//! and percent-encoded unreserved characters (non-canonical). keygate never "fixes up" a path:
//! what the allowlist saw is byte for byte what the upstream gets, so the upstream cannot read a
//! path differently from the way keygate authorized it.

pub mod path;

pub use path::check_path;

use crate::config::{Route, RouteId};
use crate::error::{Code, Rejection};

/// A request matched to a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The route's index in the config.
    pub route: RouteId,
    /// Decoded path relative to the route prefix, always starting with `/`; allow rules match it.
    pub path: String,
    /// The raw (still encoded) relative path, forwarded as is after the upstream's base path.
    pub raw_path: String,
    /// The raw query string, when the target had a `?`; allow rules may constrain it.
    pub query: Option<String>,
}

/// Matches on the (host, path) pair: a request through the forward proxy (`host` set) goes to
/// the route that names its host, with the whole path; any other to the route with the longest
/// prefix that matches (routes are sorted longest first). Routes without a prefix serve only
/// their host.
pub fn select(
    routes: &[Route],
    host: Option<&str>,
    target: &http::Uri,
) -> Result<Routed, Rejection> {
    let raw_path = target.path();
    let decoded = check_path(raw_path)
        .map_err(|why| Rejection::new(Code::InvalidPath, format!("path refused: {why}")))?;
    if let Some(host) = host {
        return match routes.iter().position(|r| r.host.as_deref() == Some(host)) {
            Some(i) => Ok(Routed {
                route: RouteId(i),
                path: decoded,
                raw_path: raw_path.to_string(),
                query: target.query().map(str::to_string),
            }),
            None => Err(Rejection::new(
                Code::RouteNotFound,
                format!("no route serves host {host}"),
            )),
        };
    }
    for (i, r) in routes.iter().enumerate() {
        if r.prefix.is_empty() {
            continue;
        }
        let Some(rel) = strip_prefix(&decoded, &r.prefix) else {
            continue;
        };
        // The prefix is plain ASCII with no encodable characters (checked at config load) and the
        // raw path has no non-canonical encodings, so the raw path starts with the same bytes.
        let Some(raw_rel) = strip_prefix(raw_path, &r.prefix) else {
            // Unreachable with prefixes config accepts; refuse rather than forward a path that
            // differs from the one authorized.
            return Err(Rejection::new(
                Code::InvalidPath,
                "path refused: non-canonical route prefix",
            ));
        };
        // The route's path is the decoded path's tail (or `/`): cut in place, not copied.
        let cut = decoded.ends_with(rel).then(|| decoded.len() - rel.len());
        let path = match cut {
            Some(cut) => {
                let mut path = decoded;
                path.replace_range(..cut, "");
                path
            }
            None => rel.to_string(),
        };
        let raw_path = raw_rel.to_string();
        return Ok(Routed {
            route: RouteId(i),
            path,
            raw_path,
            query: target.query().map(str::to_string),
        });
    }
    Err(Rejection::new(
        Code::RouteNotFound,
        format!("no route serves {decoded}; {}", known_prefixes(routes)),
    ))
}

/// The prefixes a caller can use, to say where a request should have gone: prefixes only (no
/// upstream, secret or rule), at most [`LISTED_PREFIXES`] of them.
fn known_prefixes(routes: &[Route]) -> String {
    let mut prefixes: Vec<&str> = routes.iter().map(|r| r.prefix.as_str()).collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    let more = prefixes.len().saturating_sub(LISTED_PREFIXES);
    prefixes.truncate(LISTED_PREFIXES);
    let mut text = format!("route prefixes: {}", prefixes.join(", "));
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

/// A refusal stays short however many routes a config has.
const LISTED_PREFIXES: usize = 16;

fn strip_prefix<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    if prefix == "/" {
        return Some(path);
    }
    let rest = path.strip_prefix(prefix)?;
    if rest.is_empty() {
        Some("/")
    } else if rest.starts_with('/') {
        Some(rest)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn routes() -> Vec<Route> {
        let text = "[routes.a]\nprefix = \"/openai\"\nupstream = \"http://127.0.0.1:9\"\n\
                    [routes.b]\nprefix = \"/x/y\"\nupstream = \"http://127.0.0.1:9\"\n\
                    [routes.c]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n";
        crate::config::Config::from_text(std::path::Path::new("p.toml"), text)
            .unwrap()
            .routes
    }

    proptest! {
        /// The route's path is the decoded path after the prefix (`/` when nothing follows),
        /// and its raw path the same cut of the raw path, for any path the checks accept.
        #[test]
        fn routed_path_is_the_decoded_path_after_the_prefix(
            segs in proptest::collection::vec(
                prop_oneof![
                    Just("openai"), Just("x"), Just("y"), Just("v1"), Just("%C3%A9"),
                    Just("a%20b"), Just("openaix"), Just(""),
                ],
                0..6,
            ),
            trailing in any::<bool>(),
        ) {
            let routes = routes();
            let mut raw = format!("/{}", segs.join("/"));
            if trailing && !raw.ends_with('/') {
                raw.push('/');
            }
            let uri: http::Uri = raw.parse().unwrap();
            let Ok(decoded) = check_path(&raw) else {
                prop_assert!(select(&routes, None, &uri).is_err());
                return Ok(());
            };
            let got = select(&routes, None, &uri).unwrap();
            let prefix = &routes[got.route.0].prefix;
            prop_assert_eq!(Some(got.path.as_str()), strip_prefix(&decoded, prefix));
            prop_assert_eq!(Some(got.raw_path.as_str()), strip_prefix(&raw, prefix));
        }
    }
}
