//! `pattern:` checks on parameters and step inputs, each pattern compiled once per process.
//!
//! A fleet check binds the same parameters a thousand times; compiling their patterns each time
//! was a third of its CPU. The cache hands out `Arc<Regex>` rather than clones of the `Regex`,
//! because a cloned `Regex` starts with an empty lazy-DFA cache and would rebuild it per match.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use regex::Regex;

/// A pattern anchored at both ends: `pattern:` must match the whole value.
pub(crate) fn anchored(pattern: &str) -> String {
    format!("^(?:{pattern})$")
}

/// The compiled, anchored form of `pattern`.
pub(crate) fn whole(pattern: &str) -> Result<Arc<Regex>, regex::Error> {
    static CACHE: LazyLock<Mutex<HashMap<String, Arc<Regex>>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    if let Some(regex) = CACHE.lock().expect("never poisoned").get(pattern) {
        return Ok(regex.clone());
    }
    // Compiled outside the lock; two threads racing on a new pattern both compile, one wins.
    let regex = Arc::new(Regex::new(&anchored(pattern))?);
    CACHE
        .lock()
        .expect("never poisoned")
        .insert(pattern.to_owned(), regex.clone());
    Ok(regex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_whole_value_and_reuses_the_compiled_pattern() {
        let first = whole("[a-z]+").unwrap();
        assert!(first.is_match("abc"));
        assert!(!first.is_match("abc1"), "anchored at the end");
        assert!(!first.is_match("1abc"), "anchored at the start");
        assert!(Arc::ptr_eq(&first, &whole("[a-z]+").unwrap()));
        assert!(whole("(").is_err());
    }
}
