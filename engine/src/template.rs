//! Templates: handlebars in strict mode over `params`, `steps.<id>.outputs` and `run`.
//!
//! Compile parses every template and collects the paths it reads; references to
//! `steps.<id>.outputs.<name>` become edges of the DAG. The executor renders them.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use handlebars::template::{Parameter, TemplateElement};
use handlebars::{Context, Handlebars, Path, RenderContext, Renderable, StringOutput, Template};
use serde_json::{Map, Value};

/// Every helper a template may call: handlebars' own that make sense in a runbook, and
/// kmsflow's (`lower`, `upper`, `default`, `json`, `concat`). Compile refuses any other.
pub const HELPERS: &[&str] = &[
    "eq", "ne", "gt", "gte", "lt", "lte", "and", "or", "not", "len", "lookup", "if", "unless",
    "each", "with", "lower", "upper", "default", "json", "concat",
];

/// How deeply a template may nest blocks (`{{#if}}`) and subexpressions (`(concat ...)`)
/// together. handlebars parses and renders by recursion, so depth is stack: 2,000 levels
/// overflow a worker's thread. No runbook needs more than a handful; this bound holds far
/// below what the smallest thread kmsflow renders on can hold (see the test
/// `the_deepest_template_allowed_renders_on_a_small_stack`).
pub const MAX_NESTING: usize = 32;

/// Refuses a template nested deeper than [`MAX_NESTING`], before anything recursive reads
/// it: one pass over the text, linear in its length.
pub fn check_nesting(text: &str) -> Result<(), SyntaxError> {
    let bytes = text.as_bytes();
    let (mut blocks, mut parens) = (0usize, 0usize);
    let mut in_mustache = false;
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if !in_mustache {
            if bytes[i..].starts_with(b"{{") {
                let mut j = i + 2;
                while j < bytes.len() && matches!(bytes[j], b'{' | b'~' | b' ') {
                    j += 1;
                }
                if bytes[j..].starts_with(b"!") {
                    // A comment: skipped whole (`{{!-- ... --}}` or `{{! ... }}`).
                    let end = if bytes[j..].starts_with(b"!--") {
                        "--}}"
                    } else {
                        "}}"
                    };
                    i = text[j..]
                        .find(end)
                        .map_or(bytes.len(), |at| j + at + end.len());
                    continue;
                }
                match bytes.get(j) {
                    Some(b'#') => blocks += 1,
                    Some(b'/') => blocks = blocks.saturating_sub(1),
                    _ => {}
                }
                in_mustache = true;
                i = j;
                if blocks > MAX_NESTING {
                    return Err(too_deep(text, i));
                }
                continue;
            }
        } else if let Some(q) = quote {
            if b == q {
                quote = None;
            }
        } else {
            match b {
                b'"' | b'\'' => quote = Some(b),
                b'(' => {
                    parens += 1;
                    if blocks + parens > MAX_NESTING {
                        return Err(too_deep(text, i));
                    }
                }
                b')' => parens = parens.saturating_sub(1),
                b'}' if bytes[i..].starts_with(b"}}") => {
                    in_mustache = false;
                    parens = 0;
                    i += 2;
                    continue;
                }
                _ => {}
            }
        }
        i += 1;
    }
    Ok(())
}

fn too_deep(text: &str, at: usize) -> SyntaxError {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    SyntaxError {
        message: format!(
            "the template nests blocks and subexpressions more than {MAX_NESTING} deep; split it, or compute the value in an earlier step"
        ),
        position: Some((line, column)),
    }
}

/// The helpers a template calls, by name, in order of appearance.
pub fn helpers(text: &str) -> Result<Vec<String>, SyntaxError> {
    check_nesting(text)?;
    let template = Template::compile(text).map_err(|error| SyntaxError {
        message: error.reason().to_string(),
        position: error.pos(),
    })?;
    let mut found = Vec::new();
    helpers_in(&template, &mut found);
    Ok(found)
}

fn helpers_in(template: &Template, found: &mut Vec<String>) {
    for element in &template.elements {
        helpers_in_element(element, found);
    }
}

fn helpers_in_element(element: &TemplateElement, found: &mut Vec<String>) {
    let calls = |name: &Parameter, params: &[Parameter], found: &mut Vec<String>| {
        for parameter in params {
            if let Parameter::Subexpression(sub) = parameter {
                helpers_in_element(sub.as_element(), found);
            }
        }
        if let Parameter::Name(name) = name {
            found.push(name.clone());
        }
    };
    match element {
        TemplateElement::Expression(helper) | TemplateElement::HtmlExpression(helper) => {
            // `{{name}}` alone reads a variable; with arguments it calls a helper.
            if !helper.params.is_empty() || !helper.hash.is_empty() {
                calls(&helper.name, &helper.params, found);
            } else {
                for parameter in &helper.params {
                    if let Parameter::Subexpression(sub) = parameter {
                        helpers_in_element(sub.as_element(), found);
                    }
                }
            }
        }
        TemplateElement::HelperBlock(helper) => {
            calls(&helper.name, &helper.params, found);
            for inner in [&helper.template, &helper.inverse].into_iter().flatten() {
                helpers_in(inner, found);
            }
        }
        _ => {}
    }
}

/// The most a template may render to (1 MiB).
pub const MAX_RENDERED_BYTES: usize = 1 << 20;

/// Whether a string is a template (plain strings are used as they are).
pub fn is_template(text: &str) -> bool {
    text.contains("{{")
}

/// A path a template reads, as written (`steps.first.outputs.value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRef {
    pub raw: String,
    /// Inside a block helper (`#each`, `#with`), where relative paths may mean other things.
    pub nested: bool,
}

/// What a template path points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    Param(&'a str),
    StepOutput { step: &'a str, output: &'a str },
    Run(&'a str),
    Unknown,
}

impl PathRef {
    /// Interprets the path against the template context's roots.
    pub fn target(&self) -> Target<'_> {
        let segments: Vec<&str> = self.raw.split(['.', '/']).collect();
        match segments.as_slice() {
            ["params", name, ..] => Target::Param(name),
            ["steps", step, "outputs", output, ..] => Target::StepOutput { step, output },
            ["run", field] => Target::Run(field),
            _ => Target::Unknown,
        }
    }

    /// The step a `steps.<id>...` path names, whatever follows.
    pub fn step(&self) -> Option<&str> {
        let mut segments = self.raw.split(['.', '/']);
        (segments.next() == Some("steps"))
            .then(|| segments.next())
            .flatten()
    }
}

/// A template that did not parse: the message and the 1-based line/column inside the template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub message: String,
    pub position: Option<(usize, usize)>,
}

/// Parses a template and lists the paths it reads.
pub fn references(text: &str) -> Result<Vec<PathRef>, SyntaxError> {
    check_nesting(text)?;
    let template = Template::compile(text).map_err(|error| SyntaxError {
        message: error.reason().to_string(),
        position: error.pos(),
    })?;
    let mut found = Vec::new();
    walk(&template, false, &mut found);
    Ok(found)
}

fn walk(template: &Template, nested: bool, found: &mut Vec<PathRef>) {
    for element in &template.elements {
        walk_element(element, nested, found);
    }
}

fn walk_element(element: &TemplateElement, nested: bool, found: &mut Vec<PathRef>) {
    match element {
        TemplateElement::Expression(helper) | TemplateElement::HtmlExpression(helper) => {
            if helper.params.is_empty() && helper.hash.is_empty() {
                // `{{name}}` with nothing after it reads a variable.
                if let Parameter::Name(name) = &helper.name {
                    found.push(PathRef {
                        raw: name.clone(),
                        nested,
                    });
                }
            }
            walk_parameter(&helper.name, nested, found);
            walk_helper_args(&helper.params, helper.hash.values(), nested, found);
        }
        TemplateElement::HelperBlock(helper) => {
            walk_parameter(&helper.name, nested, found);
            walk_helper_args(&helper.params, helper.hash.values(), nested, found);
            for inner in [&helper.template, &helper.inverse].into_iter().flatten() {
                walk(inner, true, found);
            }
        }
        TemplateElement::DecoratorExpression(decorator)
        | TemplateElement::DecoratorBlock(decorator)
        | TemplateElement::PartialExpression(decorator)
        | TemplateElement::PartialBlock(decorator) => {
            walk_helper_args(&decorator.params, decorator.hash.values(), nested, found);
            if let Some(inner) = &decorator.template {
                walk(inner, true, found);
            }
        }
        TemplateElement::RawString(_) | TemplateElement::Comment(_) => {}
        #[allow(unreachable_patterns)]
        _ => {}
    }
}

fn walk_helper_args<'a>(
    params: &'a [Parameter],
    hash: impl Iterator<Item = &'a Parameter>,
    nested: bool,
    found: &mut Vec<PathRef>,
) {
    for parameter in params.iter().chain(hash) {
        walk_parameter(parameter, nested, found);
    }
}

fn walk_parameter(parameter: &Parameter, nested: bool, found: &mut Vec<PathRef>) {
    match parameter {
        Parameter::Path(Path::Relative((_, raw))) => found.push(PathRef {
            raw: raw.clone(),
            nested,
        }),
        Parameter::Subexpression(sub) => walk_element(sub.as_element(), nested, found),
        _ => {}
    }
}

/// Why rendering failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot render `{template}`: {reason}")]
pub struct RenderError {
    pub template: String,
    pub reason: String,
}

/// Strict (a missing path is an error, never an empty string) and without HTML escaping.
/// One registry for the process: building one registers every built-in helper.
static HANDLEBARS: LazyLock<Handlebars<'static>> = LazyLock::new(|| {
    let mut handlebars = Handlebars::new();
    handlebars.set_strict_mode(true);
    handlebars.register_escape_fn(handlebars::no_escape);
    handlebars.register_helper("lower", Box::new(lower));
    handlebars.register_helper("upper", Box::new(upper));
    handlebars.register_helper("default", Box::new(default));
    handlebars.register_helper("json", Box::new(json));
    handlebars.register_helper("concat", Box::new(concat));
    handlebars
});

/// Text of a value as a template shows it: strings as they are, the rest as JSON.
fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

handlebars::handlebars_helper!(lower: |value: Value| text_of(&value).to_lowercase());
handlebars::handlebars_helper!(upper: |value: Value| text_of(&value).to_uppercase());
// `{{default params.label 'none'}}`: the fallback when the value is null or empty.
handlebars::handlebars_helper!(default: |value: Value, fallback: Value| {
    match &value {
        Value::Null => fallback,
        Value::String(s) if s.is_empty() => fallback,
        _ => value,
    }
});
handlebars::handlebars_helper!(json: |value: Value| value.to_string());
handlebars::handlebars_helper!(concat: |*args| args.iter().map(|a| text_of(a)).collect::<String>());

/// What the templates of `template` that read a secret parameter rendered, from `rendered`
/// (the same value rendered): a value made from a secret (`{{upper params.token}}`,
/// `Bearer {{params.token}}`) is as secret as the secret, so the caller masks it too.
pub fn renderings_of_secrets(
    template: &Value,
    rendered: &Value,
    is_secret: &dyn Fn(&str) -> bool,
    out: &mut Vec<String>,
) {
    match (template, rendered) {
        (Value::String(text), value) if is_template(text) => {
            let reads_secret = references(text)
                .unwrap_or_default()
                .iter()
                .any(|path| matches!(path.target(), Target::Param(name) if is_secret(name)));
            if reads_secret {
                match value {
                    Value::String(s) => out.push(s.clone()),
                    Value::Null | Value::Bool(_) => {}
                    other => out.push(other.to_string()),
                }
            }
        }
        (Value::Array(templates), Value::Array(values)) => {
            for (t, v) in templates.iter().zip(values) {
                renderings_of_secrets(t, v, is_secret, out);
            }
        }
        (Value::Object(templates), Value::Object(values)) => {
            for (key, t) in templates {
                if let Some(v) = values.get(key) {
                    renderings_of_secrets(t, v, is_secret, out);
                }
            }
        }
        _ => {}
    }
}

/// Templates parsed once per process, by their text. A fleet check renders the same few
/// conditions a thousand times; parsing them each time was a fifth of its CPU.
fn parsed(text: &str) -> Result<Arc<Template>, handlebars::TemplateError> {
    static CACHE: LazyLock<Mutex<HashMap<String, Arc<Template>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    // Runbooks hold few templates; a daemon running ever-changing runbooks starts over
    // rather than growing without bound.
    const MAX_CACHED: usize = 4096;
    if let Some(template) = CACHE.lock().expect("never poisoned").get(text) {
        return Ok(template.clone());
    }
    let template = Arc::new(Template::compile(text)?);
    let mut cache = CACHE.lock().expect("never poisoned");
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert(text.to_owned(), template.clone());
    Ok(template)
}

/// Renders templates against a context `{params, steps, run}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Renderer;

impl Renderer {
    pub fn new() -> Renderer {
        Renderer
    }

    fn render_text(&self, text: &str, context: &Value) -> Result<String, handlebars::RenderError> {
        let template = parsed(text)?;
        let context = Context::from(context.clone());
        let mut render_context = RenderContext::new(None);
        let mut out = StringOutput::new();
        template.render(&HANDLEBARS, &context, &mut render_context, &mut out)?;
        Ok(out.into_string()?)
    }

    /// Renders one string. A string that is exactly one `{{path}}` keeps the JSON type of what
    /// it points at (so `"{{params.count}}"` stays an integer); other templates render to text.
    pub fn render_str(&self, text: &str, context: &Value) -> Result<Value, RenderError> {
        if !is_template(text) {
            return Ok(Value::String(text.to_owned()));
        }
        if let Some(path) = sole_path(text) {
            return lookup(context, path).cloned().ok_or_else(|| RenderError {
                template: text.to_owned(),
                reason: format!("`{path}` is not defined"),
            });
        }
        // Compile refused it already; a template that reaches here some other way is refused
        // too, never handed to a recursive parser.
        check_nesting(text).map_err(|error| RenderError {
            template: text.to_owned(),
            reason: error.message,
        })?;
        let rendered = self
            .render_text(text, context)
            .map_err(|error| RenderError {
                template: text.to_owned(),
                reason: render_reason(&error),
            })?;
        // `{{#each}}` over a large value can render without bound; nothing a step takes
        // needs more.
        if rendered.len() > MAX_RENDERED_BYTES {
            return Err(RenderError {
                template: text.to_owned(),
                reason: format!(
                    "it renders {} bytes; a template may render at most {MAX_RENDERED_BYTES}",
                    rendered.len()
                ),
            });
        }
        Ok(Value::String(rendered))
    }

    /// Renders every string inside a value.
    pub fn render_value(&self, value: &Value, context: &Value) -> Result<Value, RenderError> {
        Ok(match value {
            Value::String(text) => self.render_str(text, context)?,
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| self.render_value(item, context))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(key, item)| Ok((key.clone(), self.render_value(item, context)?)))
                    .collect::<Result<Map<_, _>, RenderError>>()?,
            ),
            other => other.clone(),
        })
    }

    /// Renders a condition: a boolean, or text that is exactly `true` or `false` once
    /// trimmed (case matters). Anything else is an error naming what it rendered: a step must
    /// never run because a condition rendered `False`, `no` or a sentence.
    pub fn render_condition(&self, text: &str, context: &Value) -> Result<bool, RenderError> {
        let rendered = self.render_str(text, context)?;
        match &rendered {
            Value::Bool(b) => return Ok(*b),
            Value::String(s) if s.trim() == "true" => return Ok(true),
            Value::String(s) if s.trim() == "false" => return Ok(false),
            _ => {}
        }
        let shown = match &rendered {
            Value::String(s) => format!("`{s}`"),
            other => format!("`{other}` ({})", json_type(other)),
        };
        Err(RenderError {
            template: text.to_owned(),
            reason: format!("`if` rendered {shown}, not `true` or `false`"),
        })
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

fn render_reason(error: &handlebars::RenderError) -> String {
    match error.reason() {
        handlebars::RenderErrorReason::MissingVariable(Some(path)) => {
            format!("`{path}` is not defined")
        }
        other => other.to_string(),
    }
}

/// `{{ a.b.c }}` → `a.b.c`, when the template is exactly one plain path.
fn sole_path(text: &str) -> Option<&str> {
    let inner = text.trim().strip_prefix("{{")?.strip_suffix("}}")?.trim();
    let plain = !inner.is_empty()
        && inner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && !inner.starts_with('.')
        && !inner.contains("..");
    plain.then_some(inner)
}

/// Follows a dotted path through objects (and arrays, by index).
pub fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(value, |current, segment| match current {
            Value::Object(map) => map.get(segment),
            Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raws(text: &str) -> Vec<String> {
        references(text)
            .unwrap()
            .into_iter()
            .map(|r| r.raw)
            .collect()
    }

    #[test]
    fn finds_paths_in_expressions_helpers_and_blocks() {
        assert_eq!(raws("{{params.location}}"), ["params.location"]);
        assert_eq!(raws("{{eq params.location 'eastus'}}"), ["params.location"]);
        assert_eq!(
            raws("a-{{steps.first.outputs.value}}-{{run.id}}"),
            ["steps.first.outputs.value", "run.id"]
        );
        assert_eq!(
            raws("{{#if (eq steps.vault-1.outputs.name params.x)}}y{{/if}}"),
            ["steps.vault-1.outputs.name", "params.x"]
        );
        assert_eq!(raws("plain text"), Vec::<String>::new());
        assert_eq!(raws("{{typo}}"), ["typo"]);
    }

    #[test]
    fn reports_syntax_errors() {
        let error = references("{{params.x").unwrap_err();
        assert!(!error.message.is_empty());
    }

    #[test]
    fn renders_typed_and_text() {
        let renderer = Renderer::new();
        let context = json!({"params": {"count": 3, "name": "a<b"}, "steps": {"my-step": {"outputs": {"v": "x"}}}});
        assert_eq!(
            renderer.render_str("{{params.count}}", &context).unwrap(),
            json!(3)
        );
        assert_eq!(
            renderer.render_str("n={{params.count}}", &context).unwrap(),
            json!("n=3")
        );
        assert_eq!(
            renderer.render_str("{{params.name}}!", &context).unwrap(),
            json!("a<b!")
        );
        assert_eq!(
            renderer
                .render_str(
                    "{{steps.my-step.outputs.v}}-{{steps.my-step.outputs.v}}",
                    &context
                )
                .unwrap(),
            json!("x-x")
        );
        assert!(renderer.render_str("{{params.missing}}", &context).is_err());
        assert!(
            renderer
                .render_str("x{{params.missing}}", &context)
                .is_err()
        );
        assert!(
            renderer
                .render_condition("{{eq params.count 3}}", &context)
                .unwrap()
        );
        assert!(
            !renderer
                .render_condition("{{eq params.name 'b'}}", &context)
                .unwrap()
        );
    }

    /// `depth` nested `concat` subexpressions, or `if` blocks.
    fn nested(depth: usize, blocks: bool) -> String {
        if blocks {
            format!(
                "{}x{}",
                "{{#if params.a}}".repeat(depth),
                "{{/if}}".repeat(depth)
            )
        } else {
            format!(
                "{{{{concat {}params.a{}}}}}",
                "(concat ".repeat(depth),
                ")".repeat(depth)
            )
        }
    }

    #[test]
    fn nesting_is_bounded_before_anything_recursive_reads_it() {
        for blocks in [false, true] {
            let deepest = nested(MAX_NESTING, blocks);
            assert!(references(&deepest).is_ok(), "{deepest}");
            for depth in [MAX_NESTING + 1, 5_000, 100_000] {
                let text = nested(depth, blocks);
                let error = references(&text).unwrap_err();
                assert!(
                    error.message.contains("more than 32 deep"),
                    "{}",
                    error.message
                );
                assert_eq!(error.position.unwrap().0, 1);
                assert!(helpers(&text).is_err());
                let rendered = Renderer::new()
                    .render_str(&text, &serde_json::json!({"params": {"a": "v"}}))
                    .unwrap_err();
                assert!(rendered.reason.contains("deep"), "{}", rendered.reason);
            }
        }
        // Parentheses in a string literal are text, not nesting; comments are skipped.
        let quoted = format!(
            "{{{{concat \"{}\" params.a}}}}{{{{!-- {} --}}}}",
            "(".repeat(100),
            "{{#if".repeat(100)
        );
        assert!(check_nesting(&quoted).is_ok());
    }

    #[test]
    fn checking_nesting_is_linear_in_the_texts_length() {
        // 20,000 levels of `{{#if}}` (380 KB) took 32.5 s to compile before the bound.
        let text = nested(20_000, true);
        let started = std::time::Instant::now();
        assert!(references(&text).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn the_deepest_template_allowed_renders_on_a_small_stack() {
        // Smaller than any thread kmsflow renders on (tokio's workers and `std::thread`'s
        // default are 2 MiB).
        let renders = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(|| {
                let context = serde_json::json!({"params": {"a": "v"}});
                for blocks in [false, true] {
                    let text = nested(MAX_NESTING, blocks);
                    references(&text).unwrap();
                    helpers(&text).unwrap();
                    Renderer::new().render_str(&text, &context).unwrap();
                }
            })
            .unwrap()
            .join();
        assert!(renders.is_ok());
    }

    #[test]
    fn a_template_renders_at_most_a_mebibyte() {
        let renderer = Renderer::new();
        let items: Vec<String> = (0..20_000).map(|i| format!("{i:0>60}")).collect();
        let context = json!({"params": {"items": items}});
        let error = renderer
            .render_str("{{#each params.items}}{{this}}{{/each}}", &context)
            .unwrap_err();
        assert!(error.reason.contains("at most 1048576"), "{error}");
    }

    #[test]
    fn kmsflows_helpers_render() {
        let renderer = Renderer::new();
        let context = json!({"params": {"name": "AKS-Prod", "empty": "", "list": [1, 2]}});
        let render = |text: &str| renderer.render_str(text, &context).unwrap();
        assert_eq!(render("{{lower params.name}}"), json!("aks-prod"));
        assert_eq!(render("{{upper params.name}}"), json!("AKS-PROD"));
        assert_eq!(render("{{default params.empty 'none'}}"), json!("none"));
        assert_eq!(render("{{default params.name 'none'}}"), json!("AKS-Prod"));
        assert_eq!(render("{{json params.list}}"), json!("[1,2]"));
        assert_eq!(
            render("{{concat 'kv-' (lower params.name) '-1'}}"),
            json!("kv-aks-prod-1")
        );
        assert_eq!(
            helpers("{{#if (eq (lower params.a) 'x')}}{{lowr params.b}}{{/if}}").unwrap(),
            ["lower", "eq", "if", "lowr"]
        );
        assert!(helpers("{{params.a}}").unwrap().is_empty());
    }

    #[test]
    fn a_condition_is_true_or_false_and_nothing_else() {
        let renderer = Renderer::new();
        let context = json!({"params": {"word": "False", "yes": "no", "flag": true, "n": 1, "padded": " true "}});
        assert!(
            renderer
                .render_condition("{{params.flag}}", &context)
                .unwrap()
        );
        assert!(
            renderer
                .render_condition("{{params.padded}}", &context)
                .unwrap()
        );
        for refused in [
            "{{params.word}}",
            "{{params.yes}}",
            "{{params.n}}",
            "x{{params.flag}}",
        ] {
            let error = renderer.render_condition(refused, &context).unwrap_err();
            assert!(
                error.reason.contains("not `true` or `false`"),
                "{refused}: {error}"
            );
        }
    }
}
