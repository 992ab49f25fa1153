//! YAML with spans: marked-yaml parses, and this module turns its nodes into [`Yaml`] values
//! that carry byte spans into the source, typed the way YAML 1.2's core schema types plain
//! scalars (quoted scalars are always strings).

mod anchors;

use marked_yaml::{LoaderOptions, Node};

use crate::diagnostic::{Problem, ProblemKind, RunbookSource, Span};

/// A YAML value and where it stands in the source.
#[derive(Debug, Clone, PartialEq)]
pub struct Yaml {
    pub value: YamlValue,
    pub span: Span,
}

/// The shapes a runbook value can take.
#[derive(Debug, Clone, PartialEq)]
pub enum YamlValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Yaml>),
    /// Keys keep their spans and their order.
    Map(Vec<(Spanned<String>, Yaml)>),
}

/// A value with the span it came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Spanned<T> {
    pub value: T,
    pub span: Span,
}

impl YamlValue {
    /// How the value is described in a type error ("a string", "a list").
    pub fn type_name(&self) -> &'static str {
        match self {
            YamlValue::Null => "nothing",
            YamlValue::Bool(_) => "a boolean",
            YamlValue::Int(_) => "an integer",
            YamlValue::Float(_) => "a number",
            YamlValue::Str(_) => "a string",
            YamlValue::Seq(_) => "a list",
            YamlValue::Map(_) => "a mapping",
        }
    }

    /// The value as JSON (for defaults, enums and literal step inputs).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            YamlValue::Null => serde_json::Value::Null,
            YamlValue::Bool(b) => (*b).into(),
            YamlValue::Int(i) => (*i).into(),
            YamlValue::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            YamlValue::Str(s) => s.clone().into(),
            YamlValue::Seq(items) => items.iter().map(|i| i.value.to_json()).collect(),
            YamlValue::Map(entries) => entries
                .iter()
                .map(|(k, v)| (k.value.clone(), v.value.to_json()))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        }
    }
}

impl Yaml {
    /// The entries of a mapping, or `None` for other shapes.
    pub fn as_map(&self) -> Option<&[(Spanned<String>, Yaml)]> {
        match &self.value {
            YamlValue::Map(entries) => Some(entries),
            _ => None,
        }
    }
}

/// Where a second YAML document starts, if the text holds more than one: a runbook is one
/// document, and the YAML loader would silently read only the first. A document marker at
/// the start of a line cannot be part of any scalar, so lines tell.
fn second_document(text: &str) -> Option<usize> {
    let marker = |line: &str, mark: &str| {
        line.strip_prefix(mark)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
    };
    let mut content = false;
    let mut ended = false;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\n', '\r']);
        let blank = bare.trim().is_empty() || bare.trim_start().starts_with('#');
        if marker(bare, "---") {
            if content {
                return Some(offset);
            }
        } else if marker(bare, "...") {
            ended = content;
        } else if !blank && !bare.starts_with('%') {
            if ended {
                return Some(offset);
            }
            content = true;
        }
        offset += line.len();
    }
    None
}

/// How deep a runbook's YAML may nest (mappings and lists, block or flow). Real runbooks nest
/// a handful of levels; the parser and everything after it recurse once per level, and a
/// few thousand levels overflow the stack.
pub const MAX_DEPTH: usize = 64;

/// The largest runbook file read (4 MiB: the bundled ones are a few kilobytes).
pub const MAX_BYTES: usize = 4 << 20;

/// Where the text first nests deeper than [`MAX_DEPTH`], found without parsing: block levels
/// by indentation (and `- ` items on one line), flow levels by brackets outside quotes.
fn too_deep(text: &str) -> Option<usize> {
    let mut indents: Vec<usize> = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        let content = line.trim_start_matches(' ');
        let indent = line.len() - content.len();
        let bare = content.trim_end();
        if !bare.is_empty() && !bare.starts_with('#') {
            while indents.last().is_some_and(|&top| top > indent) {
                indents.pop();
            }
            if indents.last().is_none_or(|&top| top < indent) {
                indents.push(indent);
            }
            let items = bare
                .as_bytes()
                .chunks(2)
                .take_while(|pair| *pair == b"- " || *pair == b"-")
                .count();
            let mut depth = indents.len() + items;
            let mut quote: Option<char> = None;
            for (at, c) in bare.char_indices() {
                match (quote, c) {
                    (Some(q), c) if c == q => quote = None,
                    (Some(_), _) => {}
                    (None, '\'' | '"') => quote = Some(c),
                    (None, '#') if at > 0 && bare[..at].ends_with(' ') => break,
                    (None, '[' | '{') => depth += 1,
                    (None, ']' | '}') => depth = depth.saturating_sub(1),
                    _ => {}
                }
                if depth > MAX_DEPTH {
                    return Some(offset + indent + at);
                }
            }
            if depth > MAX_DEPTH {
                return Some(offset + indent);
            }
        }
        offset += line.len();
    }
    None
}

/// Parses a whole document; a syntax error is one problem pointing at its place.
pub fn parse(source: &RunbookSource) -> Result<Yaml, Box<Problem>> {
    if source.text.len() > MAX_BYTES {
        return Err(Box::new(Problem {
            kind: ProblemKind::Yaml {
                message: format!(
                    "the runbook is {} bytes; a runbook may be at most {MAX_BYTES} bytes",
                    source.text.len()
                ),
            },
            span: Span::new(0, 1),
            source: source.clone(),
        }));
    }
    if let Some(offset) = too_deep(&source.text) {
        return Err(Box::new(Problem {
            kind: ProblemKind::Yaml {
                message: format!("the runbook nests deeper than {MAX_DEPTH} levels here"),
            },
            span: Span::new(offset, usize::from(offset < source.text.len())),
            source: source.clone(),
        }));
    }
    if let Some(offset) = second_document(&source.text) {
        return Err(Box::new(Problem {
            kind: ProblemKind::Yaml {
                message: "a runbook is one YAML document, and a second one starts here: put it in a file of its own".to_owned(),
            },
            span: Span::new(offset, 3.min(source.text.len() - offset)),
            source: source.clone(),
        }));
    }
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .toplevel_mapping();
    let offsets = CharOffsets::new(&source.text);
    match marked_yaml::parse_yaml_with_options(0, &*source.text, options) {
        Ok(node) => Ok(convert(&node, &source.text, &offsets)),
        Err(error) => {
            let (marker, message) = match &error {
                marked_yaml::LoadError::TopLevelMustBeMapping(m) => (
                    Some(*m),
                    "a runbook must be a YAML mapping (`name:`, `steps:`, ...)".to_owned(),
                ),
                marked_yaml::LoadError::DuplicateKey(inner) => (
                    inner.key.span().start().copied(),
                    format!("duplicate key `{}`", inner.key.as_str()),
                ),
                // marked-yaml has no anchors: load such a text from the parser's events.
                marked_yaml::LoadError::UnexpectedAnchor(_) => {
                    return anchors::parse(source, &offsets);
                }
                marked_yaml::LoadError::ScanError(m, _) => {
                    (Some(*m), strip_marker(&error.to_string()))
                }
                other => (None, strip_marker(&other.to_string())),
            };
            let offset = marker.map_or(0, |m| offsets.byte(m.character()));
            let len = usize::from(offset < source.text.len());
            Err(Box::new(Problem {
                kind: ProblemKind::Yaml {
                    message: format!("invalid YAML: {message}"),
                },
                span: Span::new(offset, len),
                source: source.clone(),
            }))
        }
    }
}

/// Drops the `source:line:col: ` prefix and ` at line N column M` suffix marked-yaml adds: the
/// diagnostic shows the place itself.
fn strip_marker(message: &str) -> String {
    let mut text = message;
    // Drop up to three leading `N:` position fields.
    for _ in 0..3 {
        match text.split_once(':') {
            Some((head, rest)) if !head.is_empty() && head.trim().parse::<usize>().is_ok() => {
                text = rest.trim_start();
            }
            _ => break,
        }
    }
    match text.find(" at line ") {
        Some(index) => text[..index].to_owned(),
        None => text.to_owned(),
    }
}

/// marked-yaml reports character indices; miette wants byte offsets.
struct CharOffsets {
    /// `None` when the text is ASCII, where characters and bytes coincide.
    bytes: Option<Vec<usize>>,
    len: usize,
}

impl CharOffsets {
    fn new(text: &str) -> CharOffsets {
        let bytes = (!text.is_ascii()).then(|| text.char_indices().map(|(b, _)| b).collect());
        CharOffsets {
            bytes,
            len: text.len(),
        }
    }

    fn byte(&self, character: usize) -> usize {
        match &self.bytes {
            None => character.min(self.len),
            Some(bytes) => bytes.get(character).copied().unwrap_or(self.len),
        }
    }
}

fn convert(node: &Node, text: &str, offsets: &CharOffsets) -> Yaml {
    let start = node
        .span()
        .start()
        .map_or(0, |m| offsets.byte(m.character()));
    match node {
        Node::Scalar(scalar) => {
            let span = scalar_span(text, start, scalar.as_str());
            let quoted = matches!(text.as_bytes().get(start), Some(b'"' | b'\''));
            let value = if quoted || !scalar.may_coerce() {
                YamlValue::Str(scalar.as_str().to_owned())
            } else {
                plain_scalar(scalar.as_str())
            };
            Yaml { value, span }
        }
        Node::Sequence(seq) => {
            let end = node.span().end().map(|m| offsets.byte(m.character()));
            let items = seq.iter().map(|n| convert(n, text, offsets)).collect();
            Yaml {
                value: YamlValue::Seq(items),
                span: container_span(start, end),
            }
        }
        Node::Mapping(map) => {
            let end = node.span().end().map(|m| offsets.byte(m.character()));
            let entries = map
                .iter()
                .map(|(key, value)| {
                    let key_start = key
                        .span()
                        .start()
                        .map_or(0, |m| offsets.byte(m.character()));
                    (
                        Spanned {
                            value: key.as_str().to_owned(),
                            span: scalar_span(text, key_start, key.as_str()),
                        },
                        convert(value, text, offsets),
                    )
                })
                .collect();
            Yaml {
                value: YamlValue::Map(entries),
                span: container_span(start, end),
            }
        }
    }
}

fn container_span(start: usize, end: Option<usize>) -> Span {
    match end {
        Some(end) if end > start => Span::new(start, end - start),
        _ => Span::new(start, 1),
    }
}

/// The extent of a scalar in the source: quoted scalars up to their closing quote, plain ones
/// as long as their text when it appears verbatim, else to the end of the line.
fn scalar_span(text: &str, start: usize, value: &str) -> Span {
    let rest = &text[start.min(text.len())..];
    let len = match rest.as_bytes().first() {
        Some(b'"') => closing_quote(rest, b'"', b'\\'),
        Some(b'\'') => closing_quote(rest, b'\'', b'\''),
        _ if !value.is_empty() && rest.starts_with(value) => value.len(),
        _ => rest
            .find('\n')
            .unwrap_or(rest.len())
            .max(usize::from(!rest.is_empty())),
    };
    Span::new(start, len)
}

fn closing_quote(rest: &str, quote: u8, escape: u8) -> usize {
    let bytes = rest.as_bytes();
    let mut index = 1;
    while index < bytes.len() {
        if bytes[index] == escape && escape != quote {
            index += 2;
            continue;
        }
        if bytes[index] == quote {
            if escape == quote && bytes.get(index + 1) == Some(&quote) {
                index += 2;
                continue;
            }
            return index + 1;
        }
        if bytes[index] == b'\n' {
            return index;
        }
        index += 1;
    }
    bytes.len()
}

fn plain_scalar(text: &str) -> YamlValue {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return YamlValue::Null,
        "true" | "True" | "TRUE" => return YamlValue::Bool(true),
        "false" | "False" | "FALSE" => return YamlValue::Bool(false),
        _ => {}
    }
    if let Ok(int) = text.parse::<i64>() {
        return YamlValue::Int(int);
    }
    let looks_numeric = text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
        && text.bytes().any(|b| b.is_ascii_digit());
    if looks_numeric && let Ok(float) = text.parse::<f64>() {
        return YamlValue::Float(float);
    }
    YamlValue::Str(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_past_the_limit_is_found_without_parsing() {
        let flow = format!(
            "v: {}1{}\n",
            "[".repeat(MAX_DEPTH + 5),
            "]".repeat(MAX_DEPTH + 5)
        );
        assert!(too_deep(&flow).is_some());
        let block: String = (0..MAX_DEPTH + 5)
            .map(|level| format!("{}k:\n", " ".repeat(level)))
            .collect();
        assert!(too_deep(&block).is_some());
        let fine = "name: a\nsteps:\n  - id: x\n    with: { outputs: { v: [1, {a: '[[['}] } }\n";
        assert_eq!(too_deep(fine), None);
    }

    #[test]
    fn a_second_document_is_found_and_a_leading_marker_is_not_one() {
        assert_eq!(second_document("---\nname: a\n"), None);
        assert_eq!(second_document("name: a\n---\nname: b\n"), Some(8));
        assert_eq!(second_document("name: a\n...\n"), None);
        assert_eq!(second_document("name: a\n...\nname: b\n"), Some(12));
        assert_eq!(second_document("name: a\ntext: |\n  ---x\n"), None);
        assert_eq!(second_document("# c\n---\n# c\nname: a\n"), None);
    }

    fn parse_ok(text: &str) -> Yaml {
        parse(&RunbookSource::new("t.yaml", text)).unwrap()
    }

    #[test]
    fn spans_point_at_keys_and_values() {
        let text = "name: demo\nsteps:\n  - id: \"first\"\n    count: 3\n";
        let doc = parse_ok(text);
        let entries = doc.as_map().unwrap();
        let (key, value) = &entries[0];
        assert_eq!(&text[key.span.offset..][..key.span.len], "name");
        assert_eq!(&text[value.span.offset..][..value.span.len], "demo");
        let YamlValue::Seq(steps) = &entries[1].1.value else {
            panic!()
        };
        let step = steps[0].as_map().unwrap();
        assert_eq!(
            &text[step[0].1.span.offset..][..step[0].1.span.len],
            "\"first\""
        );
        assert_eq!(step[1].1.value, YamlValue::Int(3));
    }

    #[test]
    fn quoted_scalars_stay_strings() {
        let doc = parse_ok("a: '3'\nb: 3\nc: true\nd: 'true'\ne: 1.5\nf:\n");
        let values: Vec<_> = doc
            .as_map()
            .unwrap()
            .iter()
            .map(|(_, v)| v.value.clone())
            .collect();
        assert_eq!(
            values,
            vec![
                YamlValue::Str("3".into()),
                YamlValue::Int(3),
                YamlValue::Bool(true),
                YamlValue::Str("true".into()),
                YamlValue::Float(1.5),
                YamlValue::Null,
            ]
        );
    }

    #[test]
    fn non_ascii_offsets_are_bytes() {
        let text = "description: café ☕\nname: x\n";
        let doc = parse_ok(text);
        let (key, value) = &doc.as_map().unwrap()[1];
        assert_eq!(&text[key.span.offset..][..key.span.len], "name");
        assert_eq!(&text[value.span.offset..][..value.span.len], "x");
    }

    #[test]
    fn syntax_errors_are_located() {
        let problem = parse(&RunbookSource::new("t.yaml", "name: [unclosed\n")).unwrap_err();
        assert!(matches!(problem.kind, ProblemKind::Yaml { .. }));
        assert!(problem.span.offset <= 16);
    }
}
