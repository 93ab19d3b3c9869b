//! The JSON Schema of both config formats, derived from the raw serde types themselves, so the
//! reference (`docs/config.md`) and the checked-in schema (`docs/config.schema.json`) cannot
//! drift from what keygate reads: a key added to a raw type changes the schema, and the tests
//! below fail until the schema is regenerated and the key documented.

use std::collections::BTreeSet;

use schemars::{JsonSchema, SchemaGenerator};
use serde::{Deserialize, Deserializer};

/// Where the config reference lives, named in config errors.
pub const REFERENCE: &str = "docs/config.md";

/// A TOML value with the byte span it was written at. A newtype over [`toml::Spanned`] only so
/// the raw types can derive [`JsonSchema`] (the schema of a spanned value is the value's).
pub(super) struct Spanned<T>(toml::Spanned<T>);

impl<T> Spanned<T> {
    pub(super) fn span(&self) -> std::ops::Range<usize> {
        self.0.span()
    }

    pub(super) fn get_ref(&self) -> &T {
        self.0.get_ref()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        toml::Spanned::<T>::deserialize(d).map(Spanned)
    }
}

impl<T: JsonSchema> JsonSchema for Spanned<T> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> std::borrow::Cow<'static, str> {
        T::schema_name()
    }

    fn schema_id() -> std::borrow::Cow<'static, str> {
        T::schema_id()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> schemars::Schema {
        generator.subschema_for::<T>()
    }
}

/// The schema of every config keygate reads: the native TOML, the lab broker's JSON and the lab
/// backend companion's JSON, each a definition, the whole `anyOf` them.
pub fn schema() -> serde_json::Value {
    let mut generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
    let native = super::native::schema(&mut generator);
    let (lab, backend) = super::seed::schemas(&mut generator);
    let defs = generator.take_definitions(true);
    serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/keygate/keygate/docs/config.schema.json",
        "title": "keygate config",
        "description": "keygate.toml (NativeConfig), or a lab broker JSON config (LabBrokerConfig, LabBackendConfig). Reference: docs/config.md.",
        "anyOf": [native, lab, backend],
        "$defs": defs,
    })
}

/// The schema as checked in: pretty JSON with a final newline.
pub fn schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&schema()).unwrap_or_default();
    text.push('\n');
    text
}

/// Every key path a format accepts, as the reference spells it: tables in a map are `NAME`
/// (`routes.NAME.prefix`), a nested table's keys follow its own (`agents.NAME.budget_tokens.per`).
pub fn key_paths(definition: &str) -> BTreeSet<String> {
    let schema = schema();
    let mut out = BTreeSet::new();
    let root = serde_json::json!({ "$ref": format!("#/$defs/{definition}") });
    walk(&schema, &root, "", &mut out, 0);
    out
}

fn resolve<'a>(root: &'a serde_json::Value, s: &'a serde_json::Value) -> &'a serde_json::Value {
    match s.get("$ref").and_then(|r| r.as_str()) {
        Some(r) => r
            .strip_prefix("#/$defs/")
            .and_then(|name| root.get("$defs").and_then(|d| d.get(name)))
            .unwrap_or(s),
        None => s,
    }
}

fn walk(
    root: &serde_json::Value,
    s: &serde_json::Value,
    prefix: &str,
    out: &mut BTreeSet<String>,
    depth: usize,
) {
    // The config types are not recursive; the bound only keeps a mistake from looping.
    if depth > 16 {
        return;
    }
    let s = resolve(root, s);
    for alt in ["anyOf", "oneOf", "allOf"] {
        for sub in s.get(alt).and_then(|a| a.as_array()).into_iter().flatten() {
            walk(root, sub, prefix, out, depth + 1);
        }
    }
    if let Some(props) = s.get("properties").and_then(|p| p.as_object()) {
        for (key, sub) in props {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            out.insert(path.clone());
            walk(root, sub, &path, out, depth + 1);
        }
    }
    // A map of tables (`[routes.NAME]`): its entries' keys are keys too.
    if let Some(add) = s.get("additionalProperties") {
        let entry = resolve(root, add);
        if entry.get("properties").is_some() {
            walk(root, add, &format!("{prefix}.NAME"), out, depth + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_file(path: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    }

    /// The keys documented in one `## ` part of the reference: the first cell of each table row,
    /// when it is a key in backticks.
    fn documented(reference: &str, part: &str) -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        let mut inside = false;
        for line in reference.lines() {
            if let Some(h) = line.strip_prefix("## ") {
                inside = h.trim() == part;
                continue;
            }
            if !inside {
                continue;
            }
            let Some(cell) = line.strip_prefix("| `") else {
                continue;
            };
            if let Some(key) = cell.split('`').next() {
                keys.insert(key.to_string());
            }
        }
        keys
    }

    #[test]
    fn checked_in_schema_matches_the_config_types() {
        let path = repo_file("docs/config.schema.json");
        let want = schema_text();
        if std::env::var_os("KEYGATE_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/config.schema.json is not what the config types give: run \
             `KEYGATE_BLESS=1 cargo nextest run -E 'test(checked_in_schema)'` and document any new key in {REFERENCE}"
        );
    }

    #[test]
    fn every_config_key_is_documented_and_every_documented_key_exists() {
        let reference = std::fs::read_to_string(repo_file(REFERENCE)).unwrap();
        let parts = [
            ("Native TOML keys", vec!["NativeConfig"]),
            ("Lab JSON keys", vec!["LabBrokerConfig", "LabBackendConfig"]),
        ];
        for (part, definitions) in parts {
            let keys: BTreeSet<String> = definitions.iter().flat_map(|d| key_paths(d)).collect();
            let docs = documented(&reference, part);
            let undocumented: Vec<_> = keys.difference(&docs).collect();
            let gone: Vec<_> = docs.difference(&keys).collect();
            assert!(
                undocumented.is_empty(),
                "{REFERENCE} ({part}) lacks a row for: {undocumented:?}"
            );
            assert!(
                gone.is_empty(),
                "{REFERENCE} ({part}) documents keys the config does not read: {gone:?}"
            );
        }
    }

    #[test]
    fn key_paths_name_map_entries_and_nested_tables() {
        let keys = key_paths("NativeConfig");
        for k in [
            "listen",
            "routes.NAME.prefix",
            "secrets.NAME.source",
            "agents.NAME.budget_tokens.per",
            "connections.idle_timeout",
        ] {
            assert!(keys.contains(k), "{k} missing from {keys:?}");
        }
        assert!(!keys.iter().any(|k| k.starts_with("routes.NAME.env.")));
        let lab = key_paths("LabBrokerConfig");
        assert!(lab.contains("secret_source.kind") && lab.contains("secret_source.argv"));
    }
}
