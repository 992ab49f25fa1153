//! Scrubs secret parameter values from anything stored, printed or logged.

use serde_json::Value;

/// Replaces every occurrence of a secret value with `***`. Clones share what they mask, so a
/// value found during a run to be made from a secret ([`Redactor::also_mask`]) is masked by
/// every part of the run from then on.
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: std::sync::Arc<std::sync::RwLock<Vec<String>>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.read().len())
    }
}

impl Redactor {
    pub fn new(secrets: Vec<String>) -> Redactor {
        // Each secret also in the forms it travels in: escaped in JSON (an Azure error that
        // echoes a body), percent-encoded (a URL, a form), and base64 (a header, a blob).
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .filter(|s| !s.is_empty())
            .flat_map(|s| encoded_forms(&s))
            .collect();
        // Longest first, so a secret that contains another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor {
            secrets: std::sync::Arc::new(std::sync::RwLock::new(secrets)),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<String>> {
        self.secrets
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Masks these values too, from now on: what templates made from a secret. A value
    /// shorter than [`crate::params::MIN_SECRET_CHARS`] is left (masking `12`, a secret's
    /// length, everywhere would garble every message and hide nothing worth hiding).
    pub fn also_mask(&self, values: Vec<String>) {
        let new: Vec<String> = values
            .into_iter()
            .filter(|v| v.chars().count() >= crate::params::MIN_SECRET_CHARS)
            .flat_map(|v| encoded_forms(&v))
            .collect();
        if new.is_empty() {
            return;
        }
        let mut secrets = self
            .secrets
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        secrets.extend(new);
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
    }

    pub fn text(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in self.read().iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "***");
            }
        }
        out
    }

    pub fn value(&self, value: &Value) -> Value {
        if self.read().is_empty() {
            return value.clone();
        }
        match value {
            Value::String(s) => Value::String(self.text(s)),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.value(v)).collect()),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), self.value(v)))
                    .collect(),
            ),
            // An `int` secret renders as a number: it is as secret as text.
            Value::Number(n) if self.read().contains(&n.to_string()) => Value::String("***".into()),
            other => other.clone(),
        }
    }
}

/// `secret` and the forms it takes on the way: JSON-escaped, percent-encoded, base64.
fn encoded_forms(secret: &str) -> Vec<String> {
    let json = serde_json::to_string(secret).expect("a string serializes");
    let json = json[1..json.len() - 1].to_owned();
    let percent = |upper: bool| -> String {
        secret
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                other if upper => format!("%{other:02X}"),
                other => format!("%{other:02x}"),
            })
            .collect()
    };
    let mut forms = vec![secret.to_owned(), json, percent(true), percent(false)];
    forms.push(base64(secret.as_bytes(), BASE64_STANDARD));
    forms.push(base64(secret.as_bytes(), BASE64_URL));
    forms.retain(|f| !f.is_empty());
    forms
}

const BASE64_STANDARD: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64 without padding (padding depends on what follows, so it is left to match either way).
fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_secret_is_masked_in_every_form_it_travels_in() {
        let redactor = Redactor::new(vec!["p\"a ss\t/w+rd".into(), "8675309".into()]);
        let cases = [
            "the body was {\"password\": \"p\\\"a ss\\t/w+rd\"}".to_owned(),
            "GET /x?password=p%22a%20ss%09%2Fw%2Brd".to_owned(),
            "GET /x?password=p%22a%20ss%09%2fw%2brd".to_owned(),
            "Authorization: Basic cCJhIHNzCS93K3Jk".to_owned(),
            "the raw p\"a ss\t/w+rd".to_owned(),
        ];
        for case in cases {
            let masked = redactor.text(&case);
            let leaked = ["a ss", "20ss", "NzCS93", "w+rd"]
                .iter()
                .any(|piece| masked.contains(piece));
            assert!(masked.contains("***") && !leaked, "{case} -> {masked}");
        }
        assert_eq!(
            base64(b"p\"a ss\t/w+rd", BASE64_STANDARD),
            "cCJhIHNzCS93K3Jk"
        );
        assert_eq!(
            redactor.value(&json!({"pin": 8675309})),
            json!({"pin": "***"})
        );
        assert_eq!(redactor.value(&json!({"n": 86753})), json!({"n": 86753}));
    }
}
