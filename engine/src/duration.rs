//! Human durations: `500ms`, `2s`, `10m`, `1h30m`, `1d`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("a duration cannot be empty")]
    Empty,
    #[error("`{0}` has no unit; write e.g. `30s`, `5m` or `1h`")]
    MissingUnit(String),
    #[error("unknown unit `{unit}` in `{text}`; use ms, s, m, h or d")]
    UnknownUnit { text: String, unit: String },
    #[error("`{0}` is not a number followed by a unit")]
    Malformed(String),
    #[error("`{0}` is too long")]
    Overflow(String),
}

/// Parses `1h30m`, `250ms`, `2s`. Units: ms, s, m, h, d; at least one part, each with a unit.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total: u128 = 0;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::Malformed(trimmed.to_owned()));
        }
        let number: u128 = rest[..digits]
            .parse()
            .map_err(|_| DurationError::Overflow(trimmed.to_owned()))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        if unit_len == 0 && rest.is_empty() {
            return Err(DurationError::MissingUnit(trimmed.to_owned()));
        }
        if unit_len == 0 {
            return Err(DurationError::Malformed(trimmed.to_owned()));
        }
        let unit = &rest[..unit_len];
        let millis_per_unit: u128 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            other => {
                return Err(DurationError::UnknownUnit {
                    text: trimmed.to_owned(),
                    unit: other.to_owned(),
                });
            }
        };
        total = number
            .checked_mul(millis_per_unit)
            .and_then(|part| total.checked_add(part))
            .filter(|t| *t <= u64::MAX as u128)
            .ok_or_else(|| DurationError::Overflow(trimmed.to_owned()))?;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_millis(total as u64))
}

/// Formats a duration the way runbooks write them (`1h30m`, `2s`, `250ms`).
pub fn format_duration(duration: Duration) -> String {
    let mut millis = duration.as_millis();
    if millis == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if millis >= size {
            out.push_str(&format!("{}{unit}", millis / size));
            millis %= size;
        }
    }
    out
}

/// A duration read from a runbook or a step's parameters (`with: { duration: 2s }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_duration(&text)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expect: Result<u64, &str>) {
        let got = parse_duration(text).map(|d| d.as_millis() as u64);
        match expect {
            Ok(millis) => assert_eq!(got, Ok(millis), "{text}"),
            Err(message) => assert_eq!(got.unwrap_err().to_string(), message, "{text}"),
        }
    }

    #[test]
    fn parses_and_rejects() {
        check("2s", Ok(2_000));
        check("250ms", Ok(250));
        check("1h30m", Ok(5_400_000));
        check("1d", Ok(86_400_000));
        check(" 10m ", Ok(600_000));
        check("", Err("a duration cannot be empty"));
        check(
            "10",
            Err("`10` has no unit; write e.g. `30s`, `5m` or `1h`"),
        );
        check(
            "5 minutes",
            Err("`5 minutes` is not a number followed by a unit"),
        );
        check("3w", Err("unknown unit `w` in `3w`; use ms, s, m, h or d"));
        check("soon", Err("`soon` is not a number followed by a unit"));
        check(
            "99999999999999999999999d",
            Err("`99999999999999999999999d` is too long"),
        );
    }

    #[test]
    fn formats_round_trip() {
        for text in ["2s", "250ms", "1h30m", "1d", "1m1s1ms"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
