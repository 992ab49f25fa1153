//! Runbooks with YAML anchors and aliases (`&name`, `*name`, and `<<: *name` merge keys).
//! marked-yaml, which keeps every node's span, refuses anchors; such a text is loaded here
//! from yaml-rust2's events instead, into the same [`Yaml`] values. An alias is a copy of its
//! anchor's value, spans included, so a problem in a reused block points at the block.
//!
//! Expansion is bounded: an alias bomb (aliases of aliases of lists of aliases) grows
//! exponentially, and is refused at its anchor once the runbook would hold more than
//! [`MAX_NODES`] values, before any of it is built.

use std::collections::{HashMap, HashSet};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::{CharOffsets, Spanned, Yaml, YamlValue, container_span, plain_scalar, scalar_span};
use crate::diagnostic::{Problem, ProblemKind, RunbookSource, Span};

/// The most values (scalars, lists and mappings) a runbook may hold once aliases are expanded.
/// The bundled runbooks hold a few hundred.
pub const MAX_NODES: usize = 100_000;

#[derive(Default)]
struct Events(Vec<(Event, Marker)>);

impl MarkedEventReceiver for Events {
    fn on_event(&mut self, event: Event, mark: Marker) {
        self.0.push((event, mark));
    }
}

/// A value an anchor names: its tree (spans included), and how many values it holds.
struct Anchored {
    value: Yaml,
    nodes: usize,
}

struct Builder<'a> {
    events: Vec<(Event, Marker)>,
    at: usize,
    text: &'a str,
    offsets: &'a CharOffsets,
    anchors: HashMap<usize, Anchored>,
    /// Values built so far, aliases counted at their expanded size.
    nodes: usize,
}

/// A mapping's entries, in order.
type Entries = Vec<(Spanned<String>, Yaml)>;

/// Why loading stopped: the offset and the message.
type Refusal = (usize, String);

/// Loads a text that uses anchors. The caller has bounded its depth and size already.
pub fn parse(source: &RunbookSource, offsets: &CharOffsets) -> Result<Yaml, Box<Problem>> {
    let problem = |offset: usize, message: String| {
        let len = usize::from(offset < source.text.len());
        Box::new(Problem {
            kind: ProblemKind::Yaml { message },
            span: Span::new(offset, len),
            source: source.clone(),
        })
    };
    let mut events = Events::default();
    if let Err(error) = Parser::new_from_str(&source.text).load(&mut events, false) {
        let offset = offsets.byte(error.marker().index());
        return Err(problem(offset, format!("invalid YAML: {}", error.info())));
    }
    let mut builder = Builder {
        events: events.0,
        at: 0,
        text: &source.text,
        offsets,
        anchors: HashMap::new(),
        nodes: 0,
    };
    // StreamStart, DocumentStart, the root, DocumentEnd.
    while matches!(
        builder.peek(),
        Some(Event::StreamStart | Event::DocumentStart)
    ) {
        builder.at += 1;
    }
    let root = builder
        .node()
        .map_err(|(offset, message)| problem(offset, message))?;
    if !matches!(root.value, YamlValue::Map(_)) {
        return Err(problem(
            root.span.offset,
            "invalid YAML: a runbook must be a YAML mapping (`name:`, `steps:`, ...)".to_owned(),
        ));
    }
    Ok(root)
}

impl Builder<'_> {
    fn peek(&self) -> Option<&Event> {
        self.events.get(self.at).map(|(event, _)| event)
    }

    fn next(&mut self) -> Result<(Event, usize), Refusal> {
        let (event, mark) = self.events.get(self.at).cloned().ok_or_else(|| {
            (
                self.text.len(),
                "invalid YAML: the text ends early".to_owned(),
            )
        })?;
        self.at += 1;
        Ok((event, self.offsets.byte(mark.index())))
    }

    fn count(&mut self, nodes: usize, anchor_offset: usize) -> Result<(), Refusal> {
        self.nodes = self.nodes.saturating_add(nodes);
        if self.nodes > MAX_NODES {
            return Err((
                anchor_offset,
                format!(
                    "aliases of this anchor expand the runbook past {MAX_NODES} values: reuse smaller blocks, or share steps through a fragment (`uses: runbook`)"
                ),
            ));
        }
        Ok(())
    }

    /// Builds the next value; records it when it carries an anchor.
    fn node(&mut self) -> Result<Yaml, Refusal> {
        let before = self.nodes;
        let (event, start) = self.next()?;
        let (value, anchor) = match event {
            Event::Scalar(text, style, anchor, _tag) => {
                self.count(1, start)?;
                let span = scalar_span(self.text, start, &text);
                let value = if style == TScalarStyle::Plain {
                    plain_scalar(&text)
                } else {
                    YamlValue::Str(text)
                };
                (Yaml { value, span }, anchor)
            }
            Event::SequenceStart(anchor, _tag) => {
                self.count(1, start)?;
                let mut items = Vec::new();
                let end = loop {
                    if let Some(Event::SequenceEnd) = self.peek() {
                        break self.next()?.1;
                    }
                    items.push(self.node()?);
                };
                let span = container_span(start, Some(end));
                (
                    Yaml {
                        value: YamlValue::Seq(items),
                        span,
                    },
                    anchor,
                )
            }
            Event::MappingStart(anchor, _tag) => {
                self.count(1, start)?;
                let (entries, end) = self.mapping()?;
                let span = container_span(start, Some(end));
                (
                    Yaml {
                        value: YamlValue::Map(entries),
                        span,
                    },
                    anchor,
                )
            }
            Event::Alias(id) => {
                let Some(anchored) = self.anchors.get(&id) else {
                    return Err((
                        start,
                        "invalid YAML: an alias of an unknown anchor".to_owned(),
                    ));
                };
                let (value, nodes, at) = (
                    anchored.value.clone(),
                    anchored.nodes,
                    anchored.value.span.offset,
                );
                self.count(nodes, at)?;
                return Ok(value);
            }
            other => {
                return Err((start, format!("invalid YAML: unexpected {other:?}")));
            }
        };
        if anchor > 0 {
            let nodes = self.nodes - before;
            self.anchors.insert(
                anchor,
                Anchored {
                    value: value.clone(),
                    nodes,
                },
            );
        }
        Ok(value)
    }

    /// A mapping's entries up to its end, with `<<` merge keys applied: a merged mapping (or
    /// each of a list of them) adds the keys the mapping does not set itself.
    fn mapping(&mut self) -> Result<(Entries, usize), Refusal> {
        let mut entries: Entries = Vec::new();
        let mut merged: Entries = Vec::new();
        // Keys seen, so a mapping of many keys is read in linear time.
        let mut own: HashSet<String> = HashSet::new();
        let mut merged_keys: HashSet<String> = HashSet::new();
        loop {
            if let Some(Event::MappingEnd) = self.peek() {
                let end = self.next()?.1;
                entries.extend(merged.into_iter().filter(|(k, _)| !own.contains(&k.value)));
                return Ok((entries, end));
            }
            // Keys are read as their text, as marked-yaml reads them (`1:` names "1").
            let (event, key_at) = self.next()?;
            let Event::Scalar(name, style, _, _) = event else {
                return Err((
                    key_at,
                    "invalid YAML: a mapping key must be a plain value, not a list or mapping"
                        .to_owned(),
                ));
            };
            self.count(1, key_at)?;
            let merge = style == TScalarStyle::Plain && name == "<<";
            let key = Spanned {
                span: scalar_span(self.text, key_at, &name),
                value: name,
            };
            let value = self.node()?;
            if merge {
                let sources = match value.value {
                    YamlValue::Map(_) => vec![value],
                    YamlValue::Seq(items) => items,
                    _ => {
                        return Err((
                            value.span.offset,
                            "invalid YAML: `<<` merges a mapping (or a list of them)".to_owned(),
                        ));
                    }
                };
                for source in sources {
                    let YamlValue::Map(source) = source.value else {
                        return Err((
                            source.span.offset,
                            "invalid YAML: `<<` merges a mapping (or a list of them)".to_owned(),
                        ));
                    };
                    for (k, v) in source {
                        if merged_keys.insert(k.value.clone()) {
                            merged.push((k, v));
                        }
                    }
                }
                continue;
            }
            if !own.insert(key.value.clone()) {
                return Err((
                    key.span.offset,
                    format!("invalid YAML: duplicate key `{}`", key.value),
                ));
            }
            entries.push((key, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<serde_json::Value, String> {
        let source = RunbookSource::new("t.yaml", text);
        super::super::parse(&source)
            .map(|y| y.value.to_json())
            .map_err(|p| format!("{} at {}", p.kind, p.span.offset))
    }

    #[test]
    fn an_alias_is_a_copy_of_its_anchor() {
        let got = load("a: &x { k: 1, s: 'v' }\nb: *x\n").unwrap();
        assert_eq!(got["b"], got["a"]);
        assert_eq!(got["b"]["k"], 1);
    }

    #[test]
    fn merge_keys_add_what_the_mapping_does_not_set() {
        let got =
            load("base: &b { retry: 3, timeout: 10m }\nstep:\n  <<: *b\n  timeout: 1m\n").unwrap();
        assert_eq!(got["step"]["retry"], 3);
        assert_eq!(got["step"]["timeout"], "1m");
        assert!(got["step"].get("<<").is_none());
    }

    #[test]
    fn duplicate_keys_are_refused_with_anchors_too() {
        let err = load("a: &x 1\nb: *x\nb: 2\n").unwrap_err();
        assert!(err.contains("duplicate key `b`"), "{err}");
    }

    #[test]
    fn an_alias_bomb_is_refused_at_its_anchor() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            text.push_str(&format!(
                "a{i}: &a{i} [{}]\n",
                [prev.as_str(); 10].join(", ")
            ));
        }
        let started = std::time::Instant::now();
        let err = load(&text).unwrap_err();
        assert!(err.contains("past 100000 values"), "{err}");
        // Refused where the anchor that overflows is defined, not at 1:1.
        assert!(!err.ends_with(" at 0"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
