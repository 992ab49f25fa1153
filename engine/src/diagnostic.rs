//! Runbook diagnostics: every problem found in a file, each with its place, a label and a hint.

use std::fmt;
use std::sync::Arc;

use miette::{Diagnostic, LabeledSpan, NamedSource, SourceCode, SourceSpan};

/// A byte range in a runbook's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct Span {
    pub offset: usize,
    pub len: usize,
}

impl Span {
    pub fn new(offset: usize, len: usize) -> Span {
        Span { offset, len }
    }
}

impl From<Span> for SourceSpan {
    fn from(span: Span) -> SourceSpan {
        SourceSpan::new(span.offset.into(), span.len)
    }
}

/// A runbook's text with the name it is shown under (a path, or `bundled:<name>`).
#[derive(Clone, PartialEq, Eq)]
pub struct RunbookSource {
    pub name: String,
    pub text: Arc<str>,
    /// The same, as miette shows it: `[file:line:col]` above each snippet.
    named: NamedSource<Arc<str>>,
}

impl fmt::Debug for RunbookSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunbookSource")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RunbookSource {
    pub fn new(name: impl Into<String>, text: impl Into<Arc<str>>) -> RunbookSource {
        let (name, text) = (name.into(), text.into());
        let named = NamedSource::new(name.clone(), text.clone()).with_language("yaml");
        RunbookSource { name, text, named }
    }
}

/// What is wrong, with the data needed to explain it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProblemKind {
    #[error("{message}")]
    Yaml { message: String },
    #[error("unknown key `{key}` in {context}")]
    UnknownKey {
        key: String,
        context: String,
        suggestion: Option<String>,
        allowed: Vec<String>,
    },
    #[error("missing key `{key}` in {context}")]
    MissingKey { key: String, context: String },
    #[error("`{key}` must be {expected}, found {found}")]
    WrongType {
        key: String,
        expected: String,
        found: String,
    },
    #[error("duplicate step id `{id}`")]
    DuplicateStep { id: String, first: Span },
    #[error("invalid {what} `{name}`")]
    InvalidName { what: String, name: String },
    #[error("unknown step kind `{uses}`")]
    UnknownKind {
        uses: String,
        suggestion: Option<String>,
    },
    #[error("`needs` names unknown step `{target}`")]
    UnknownNeeds {
        target: String,
        suggestion: Option<String>,
    },
    #[error("reference to unknown step `{step}`")]
    UnknownStepRef {
        step: String,
        suggestion: Option<String>,
    },
    #[error("step `{step}` (`{uses}`) has no output `{output}`")]
    UnknownOutput {
        step: String,
        uses: String,
        output: String,
        declared: Vec<String>,
    },
    #[error("reference to unknown parameter `{param}`")]
    UnknownParamRef {
        param: String,
        suggestion: Option<String>,
    },
    #[error("unknown template variable `{path}`")]
    UnknownVariable { path: String, hint: String },
    #[error("template syntax error: {message}")]
    TemplateSyntax { message: String },
    #[error("unknown template helper `{name}`")]
    UnknownHelper {
        name: String,
        suggestion: Option<String>,
    },
    #[error("dependency cycle: {}", path.join(" -> "))]
    Cycle { path: Vec<String> },
    #[error("invalid duration `{value}`: {reason}")]
    InvalidDuration { value: String, reason: String },
    #[error("invalid value for `{key}`: {reason}")]
    InvalidValue {
        key: String,
        reason: String,
        hint: Option<String>,
    },
    #[error("`lock` may only use parameters and `run`, not step outputs")]
    LockUsesSteps,
    #[error("step `{step}` depends on itself")]
    SelfDependency { step: String },
}

impl ProblemKind {
    fn code(&self) -> &'static str {
        match self {
            ProblemKind::Yaml { .. } => "kmsflow::yaml",
            ProblemKind::UnknownKey { .. } => "kmsflow::unknown_key",
            ProblemKind::MissingKey { .. } => "kmsflow::missing_key",
            ProblemKind::WrongType { .. } => "kmsflow::wrong_type",
            ProblemKind::DuplicateStep { .. } => "kmsflow::duplicate_step",
            ProblemKind::InvalidName { .. } => "kmsflow::invalid_name",
            ProblemKind::UnknownKind { .. } => "kmsflow::unknown_kind",
            ProblemKind::UnknownNeeds { .. } => "kmsflow::unknown_needs",
            ProblemKind::UnknownStepRef { .. } => "kmsflow::unknown_step",
            ProblemKind::UnknownOutput { .. } => "kmsflow::unknown_output",
            ProblemKind::UnknownParamRef { .. } => "kmsflow::unknown_param",
            ProblemKind::UnknownVariable { .. } => "kmsflow::unknown_variable",
            ProblemKind::TemplateSyntax { .. } => "kmsflow::template_syntax",
            ProblemKind::UnknownHelper { .. } => "kmsflow::unknown_helper",
            ProblemKind::Cycle { .. } => "kmsflow::cycle",
            ProblemKind::InvalidDuration { .. } => "kmsflow::invalid_duration",
            ProblemKind::InvalidValue { .. } => "kmsflow::invalid_value",
            ProblemKind::LockUsesSteps => "kmsflow::lock_uses_steps",
            ProblemKind::SelfDependency { .. } => "kmsflow::self_dependency",
        }
    }

    fn label(&self) -> String {
        match self {
            ProblemKind::Yaml { .. } => "here".into(),
            ProblemKind::UnknownKey { .. } => "not a known key".into(),
            ProblemKind::MissingKey { key, .. } => format!("`{key}` is missing here"),
            ProblemKind::WrongType { expected, .. } => format!("expected {expected}"),
            ProblemKind::DuplicateStep { .. } => "second step with this id".into(),
            ProblemKind::InvalidName { .. } => "invalid name".into(),
            ProblemKind::UnknownKind { .. } => "no such step kind".into(),
            ProblemKind::UnknownNeeds { .. } | ProblemKind::UnknownStepRef { .. } => {
                "no step has this id".into()
            }
            ProblemKind::UnknownOutput { .. } => "not an output of that step".into(),
            ProblemKind::UnknownParamRef { .. } => "not a declared parameter".into(),
            ProblemKind::UnknownVariable { .. } => "unknown variable".into(),
            ProblemKind::TemplateSyntax { .. } => "in this template".into(),
            ProblemKind::UnknownHelper { .. } => "no such helper".into(),
            ProblemKind::Cycle { path } => format!("{} starts the cycle", path[0]),
            ProblemKind::InvalidDuration { .. } => "not a duration".into(),
            ProblemKind::InvalidValue { .. } => "invalid value".into(),
            ProblemKind::LockUsesSteps => "a lock is taken before any step runs".into(),
            ProblemKind::SelfDependency { .. } => "names its own step".into(),
        }
    }

    fn help(&self) -> Option<String> {
        let did_you_mean = |s: &Option<String>| s.as_ref().map(|s| format!("did you mean `{s}`?"));
        match self {
            ProblemKind::Yaml { .. } => Some("fix the YAML syntax first".into()),
            ProblemKind::UnknownKey {
                suggestion,
                allowed,
                ..
            } => did_you_mean(suggestion).or_else(|| {
                Some(format!(
                    "allowed keys: {}",
                    allowed
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }),
            ProblemKind::MissingKey { key, .. } => Some(format!("add `{key}:`")),
            ProblemKind::WrongType { .. } => None,
            ProblemKind::DuplicateStep { .. } => {
                Some("step ids must be unique; rename one of them".into())
            }
            ProblemKind::InvalidName { .. } => Some(
                "use letters, digits, `_` and `-` (not `--`, which names fragment steps), starting with a letter (parameters: lowercase letters, digits and `_`)".into(),
            ),
            ProblemKind::UnknownKind { suggestion, .. } => did_you_mean(suggestion)
                .or_else(|| Some("`kmsflow docs` lists the step kinds".into())),
            ProblemKind::UnknownNeeds { suggestion, .. }
            | ProblemKind::UnknownStepRef { suggestion, .. }
            | ProblemKind::UnknownParamRef { suggestion, .. } => did_you_mean(suggestion),
            ProblemKind::UnknownOutput { declared, uses, .. } => Some(if declared.is_empty() {
                format!("`{uses}` declares no outputs")
            } else {
                format!(
                    "`{uses}` declares: {}",
                    declared
                        .iter()
                        .map(|o| format!("`{o}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
            ProblemKind::UnknownVariable { hint, .. } => Some(hint.clone()),
            ProblemKind::UnknownHelper { suggestion, .. } => Some(match suggestion {
                Some(name) => format!("did you mean `{name}`? helpers: {}", crate::template::HELPERS.join(", ")),
                None => format!("helpers: {}", crate::template::HELPERS.join(", ")),
            }),
            ProblemKind::TemplateSyntax { .. } => Some(
                "templates are handlebars: `{{params.name}}`, `{{steps.<id>.outputs.<name>}}`, `{{eq a b}}`".into(),
            ),
            ProblemKind::Cycle { .. } => Some(
                "a step cannot depend, directly or through others, on itself; remove one `needs` or output reference".into(),
            ),
            ProblemKind::InvalidDuration { .. } => {
                Some("write a number with a unit: `500ms`, `30s`, `5m`, `1h30m`".into())
            }
            ProblemKind::InvalidValue { hint, .. } => hint.clone(),
            ProblemKind::LockUsesSteps => {
                Some("build the lock key from `params` (for AKS: the cluster's resource id)".into())
            }
            ProblemKind::SelfDependency { .. } => Some("remove it from `needs`".into()),
        }
    }
}

/// One problem in one runbook file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub span: Span,
    /// Which file the span points into (a fragment's problems point into the fragment).
    pub source: RunbookSource,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kind.fmt(f)
    }
}

impl std::error::Error for Problem {}

impl Diagnostic for Problem {
    fn code<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        Some(Box::new(self.kind.code()))
    }

    fn help<'a>(&'a self) -> Option<Box<dyn fmt::Display + 'a>> {
        self.kind
            .help()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        Some(&self.source.named as &dyn SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let mut labels = vec![LabeledSpan::new_primary_with_span(
            Some(self.kind.label()),
            self.span,
        )];
        if let ProblemKind::DuplicateStep { first, .. } = &self.kind {
            labels.push(LabeledSpan::new_with_span(
                Some("first defined here".into()),
                *first,
            ));
        }
        Some(Box::new(labels.into_iter()))
    }
}

impl Problem {
    /// `file:line:col` of the problem, 1-based, for one-line reports.
    pub fn location(&self) -> String {
        let (line, col) = line_col(&self.source.text, self.span.offset);
        format!("{}:{line}:{col}", self.source.name)
    }

    /// The problem as a miette report.
    pub fn report(&self) -> miette::Report {
        miette::Report::new(self.clone())
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// Every problem found in a runbook (and the fragments it uses).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} problem{} in `{}`", problems.len(), if problems.len() == 1 { "" } else { "s" }, file)]
pub struct Diagnostics {
    pub file: String,
    pub problems: Vec<Problem>,
}

impl Diagnostics {
    /// Every problem as data, for CI and editors: file, 1-based line and column, code,
    /// message, label and help. Positions come from one index of line starts per file, so a
    /// file with thousands of problems is read once.
    pub fn to_json(&self) -> Vec<serde_json::Value> {
        let mut line_starts: std::collections::HashMap<&str, Vec<usize>> =
            std::collections::HashMap::new();
        self.problems
            .iter()
            .map(|problem| {
                let text = &problem.source.text;
                let starts = line_starts.entry(&problem.source.name).or_insert_with(|| {
                    std::iter::once(0)
                        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                        .collect()
                });
                let offset = floor_char_boundary(text, problem.span.offset.min(text.len()));
                let line = starts.partition_point(|&start| start <= offset);
                let column = text[starts[line - 1]..offset].chars().count() + 1;
                serde_json::json!({
                    "file": problem.source.name,
                    "line": line,
                    "column": column,
                    "code": problem.kind.code(),
                    "message": problem.kind.to_string(),
                    "label": problem.kind.label(),
                    "help": problem.kind.help(),
                })
            })
            .collect()
    }

    /// Renders every problem, as `kmsflow validate` prints them.
    pub fn render(&self, handler: &miette::GraphicalReportHandler) -> String {
        let mut out = String::new();
        for problem in self.problems.iter().take(MAX_RENDERED) {
            let report = problem.report();
            let _ = handler.render_report(&mut out, report.as_ref());
            out.push('\n');
        }
        if self.problems.len() > MAX_RENDERED {
            out.push_str(&format!(
                "... and {} more problems (the first {MAX_RENDERED} are shown)\n\n",
                self.problems.len() - MAX_RENDERED
            ));
        }
        out
    }
}

/// How many problems are drawn with their source; the rest are counted. A file with
/// thousands of the same mistake needs its first few shown, not all (each drawing reads the
/// source from its start).
pub const MAX_RENDERED: usize = 50;

/// The closest candidate within a small edit distance, for "did you mean".
pub fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(distance, c)| {
            // A small edit, or one word abbreviating the other (`integer` for `int`).
            let abbreviation =
                c.len() >= 3 && word.len() >= 3 && (word.starts_with(c) || c.starts_with(word));
            *distance <= (word.len().max(c.len()) / 3).max(1) || abbreviation
        })
        .min_by_key(|(distance, c)| (*distance, c.to_string()))
        .map(|(_, c)| c.to_owned())
}
