//! What a budgeted request's JSON body says about its cost, read in one pass straight from the
//! bytes: no JSON tree is built, so a long conversation costs no allocation per string (a
//! `serde_json::Value` of the body was the largest allocation site of a budgeted request).

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The members of a request body that decide what it may cost.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Facts {
    /// `max_tokens`, `max_output_tokens`, `max_completion_tokens`, when a non-negative integer.
    pub(super) max: [Option<u64>; 3],
    /// `n`, when a non-negative integer.
    pub(super) n: Option<u64>,
    /// `stream`, when a boolean.
    pub(super) stream: Option<bool>,
    /// `stream_options` is present.
    pub(super) stream_options: bool,
    /// `stream_options.include_usage`, when a boolean.
    pub(super) include_usage: Option<bool>,
    /// Bytes of text: every string value except inline media (members `data`, `file_data`,
    /// `b64_json`, and `data:` URLs), which would make an image look like a novel.
    pub(super) text: u64,
}

impl Facts {
    /// The facts of a body that is one JSON object; `None` for anything else (not JSON, not an
    /// object, trailing bytes). A member named twice counts as the last one does, as in a
    /// parsed object, but the text of both is counted (booking more, never less).
    pub(super) fn read(body: &[u8]) -> Option<Facts> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let facts = de.deserialize_any(Top).ok()?;
        de.end().ok()?;
        Some(facts)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Max(usize),
    N,
    Stream,
    StreamOptions,
    IncludeUsage,
    Media,
    Other,
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Key;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_str<E>(self, v: &str) -> Result<Key, E> {
        Ok(match v {
            "max_tokens" => Key::Max(0),
            "max_output_tokens" => Key::Max(1),
            "max_completion_tokens" => Key::Max(2),
            "n" => Key::N,
            "stream" => Key::Stream,
            "stream_options" => Key::StreamOptions,
            "include_usage" => Key::IncludeUsage,
            "data" | "file_data" | "b64_json" => Key::Media,
            _ => Key::Other,
        })
    }
}

/// One value: its text bytes, and what it is as a number, a flag or an object with
/// `include_usage`.
#[derive(Default, Clone, Copy)]
struct Value {
    text: u64,
    number: Option<u64>,
    flag: Option<bool>,
    include_usage: Option<bool>,
}

struct Scan;

impl<'de> DeserializeSeed<'de> for Scan {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Scan {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value {
            flag: Some(v),
            ..Value::default()
        })
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value {
            number: Some(v),
            ..Value::default()
        })
    }
    fn visit_i64<E>(self, _: i64) -> Result<Value, E> {
        Ok(Value::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Value, E> {
        Ok(Value::default())
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::default())
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        let text = if v.starts_with("data:") { 0 } else { v.len() };
        Ok(Value {
            text: text as u64,
            ..Value::default()
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut text = 0u64;
        while let Some(v) = seq.next_element_seed(Scan)? {
            text = text.saturating_add(v.text);
        }
        Ok(Value {
            text,
            ..Value::default()
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Value::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            if key == Key::Media {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let v = map.next_value_seed(Scan)?;
            out.text = out.text.saturating_add(v.text);
            if key == Key::IncludeUsage {
                out.include_usage = v.flag;
            }
        }
        Ok(out)
    }
}

/// The body's top level: only an object has facts (anything else is an error here).
struct Top;

impl<'de> Visitor<'de> for Top {
    type Value = Facts;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Facts, A::Error> {
        let mut facts = Facts::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            if key == Key::Media {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let v = map.next_value_seed(Scan)?;
            facts.text = facts.text.saturating_add(v.text);
            match key {
                Key::Max(i) => facts.max[i] = v.number,
                Key::N => facts.n = v.number,
                Key::Stream => facts.stream = v.flag,
                Key::StreamOptions => {
                    facts.stream_options = true;
                    facts.include_usage = v.include_usage;
                }
                _ => {}
            }
        }
        Ok(facts)
    }
}
