//! A rollout's rate control: how many targets at once, how many failures before no new one
//! starts, which targets go in which wave, and what stands between waves. Pure: parsed from
//! the command line, stored with the rollout as JSON, and applied to a number of targets.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::duration::{format_duration, parse_duration};

/// A number of targets, or a share of them (`8`, `25%`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    Count(usize),
    /// Per cent, 1 to 100.
    Percent(u8),
}

impl Share {
    /// How many of `total` targets this is. A share rounds up (10% of 5 is 1): a share that
    /// names some targets never comes to none.
    pub fn of(self, total: usize) -> usize {
        match self {
            Share::Count(n) => n.min(total),
            Share::Percent(p) => (total * p as usize).div_ceil(100),
        }
    }
}

impl FromStr for Share {
    type Err = String;
    fn from_str(text: &str) -> Result<Share, String> {
        let text = text.trim();
        match text.strip_suffix('%') {
            Some(percent) => match percent.trim().parse::<u8>() {
                Ok(p @ 1..=100) => Ok(Share::Percent(p)),
                _ => Err(format!(
                    "`{text}` is not a share: write a per cent from 1% to 100%"
                )),
            },
            None => text.parse::<usize>().map(Share::Count).map_err(|_| {
                format!("`{text}` is neither a number of targets nor a share such as `10%`")
            }),
        }
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Share::Count(n) => write!(f, "{n}"),
            Share::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Share {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Share, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What stands between one wave and the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaveGate {
    /// The next wave starts once this one is done.
    #[default]
    None,
    /// The next wave waits for `kmsflow approve ROLLOUT wave-N`.
    Approve,
    /// The next wave starts this long after this one is done (time to watch dashboards).
    Pause(Duration),
}

impl FromStr for WaveGate {
    type Err = String;
    fn from_str(text: &str) -> Result<WaveGate, String> {
        match text.trim() {
            "none" => Ok(WaveGate::None),
            "approve" => Ok(WaveGate::Approve),
            other => match other.strip_prefix("pause=") {
                Some(duration) => parse_duration(duration)
                    .map(WaveGate::Pause)
                    .map_err(|e| format!("`{other}`: {e}")),
                None => Err(format!(
                    "`{other}` is not a wave gate: use `approve`, `pause=DURATION` (e.g. `pause=10m`) or `none`"
                )),
            },
        }
    }
}

impl fmt::Display for WaveGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveGate::None => f.write_str("none"),
            WaveGate::Approve => f.write_str("approve"),
            WaveGate::Pause(d) => write!(f, "pause={}", format_duration(*d)),
        }
    }
}

impl Serialize for WaveGate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WaveGate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<WaveGate, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// How a rollout paces its targets, as AWS SSM Automation's rate control does, with waves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Targets running at once.
    pub concurrency: Share,
    /// Failures allowed: once more targets than this have failed, no new target starts
    /// (those running finish).
    pub max_errors: Share,
    /// Cumulative shares of the targets, one per wave (`1,10%,50%,100%`); `None` ramps: a
    /// canary of one, then doubling up to the concurrency, then the rest.
    pub waves: Option<Vec<Share>>,
    pub gate: WaveGate,
    /// Where the targets run: in the process that drives the rollout (`None`), or shared out
    /// to the workers of this queue (`--distribute`). Kept with the rollout, so every drive of
    /// it, a resume on a laptop included, shares its targets out the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            concurrency: Share::Count(1),
            max_errors: Share::Count(0),
            waves: None,
            gate: WaveGate::None,
            queue: None,
        }
    }
}

/// Waves that do not cover the targets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WavesError {
    #[error(
        "--waves are cumulative and must not shrink: `{later}` comes after `{earlier}`, which is more targets"
    )]
    Shrinks { earlier: Share, later: Share },
    #[error(
        "--waves are cumulative: the last, `{last}`, covers {covered} of the {total} targets; end with `100%`"
    )]
    Short {
        last: Share,
        covered: usize,
        total: usize,
    },
}

impl Policy {
    /// Targets at once, for `total` targets: at least one.
    pub fn concurrency_for(&self, total: usize) -> usize {
        self.concurrency.of(total).max(1)
    }

    /// Failures allowed among `total` targets.
    pub fn max_errors_for(&self, total: usize) -> usize {
        self.max_errors.of(total)
    }

    /// The wave (from 1) of each of `total` targets, in their order.
    pub fn assign_waves(&self, total: usize) -> Result<Vec<u32>, WavesError> {
        let ends = match &self.waves {
            Some(shares) => explicit_ends(shares, total)?,
            None => ramp_ends(self.concurrency_for(total), total),
        };
        let mut waves = Vec::with_capacity(total);
        let mut start = 0;
        for (index, end) in ends.iter().enumerate() {
            waves.extend(std::iter::repeat_n(index as u32 + 1, end - start));
            start = *end;
        }
        Ok(waves)
    }
}

/// Where each wave ends: cumulative counts, empty waves dropped.
fn explicit_ends(shares: &[Share], total: usize) -> Result<Vec<usize>, WavesError> {
    let mut ends: Vec<usize> = Vec::new();
    let mut previous: Option<(Share, usize)> = None;
    for share in shares {
        let end = share.of(total);
        if let Some((earlier, before)) = previous
            && end < before
        {
            return Err(WavesError::Shrinks {
                earlier,
                later: *share,
            });
        }
        previous = Some((*share, end));
        if end > ends.last().copied().unwrap_or(0) {
            ends.push(end);
        }
    }
    match previous {
        Some((last, covered)) if covered < total => Err(WavesError::Short {
            last,
            covered,
            total,
        }),
        _ => Ok(ends),
    }
}

/// A canary of one, then waves doubling while they are smaller than the concurrency, then
/// every remaining target in one wave run at the concurrency.
fn ramp_ends(concurrency: usize, total: usize) -> Vec<usize> {
    let mut ends = Vec::new();
    let (mut size, mut end) = (1, 0);
    while size < concurrency && end + size < total {
        end += size;
        ends.push(end);
        size *= 2;
    }
    if end < total {
        ends.push(total);
    }
    ends
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(concurrency: &str, waves: Option<&str>) -> Policy {
        Policy {
            concurrency: concurrency.parse().unwrap(),
            waves: waves.map(|w| w.split(',').map(|s| s.parse().unwrap()).collect()),
            ..Policy::default()
        }
    }

    fn sizes(waves: &[u32]) -> Vec<usize> {
        let mut sizes = vec![0; waves.last().copied().unwrap_or(0) as usize];
        for wave in waves {
            sizes[*wave as usize - 1] += 1;
        }
        sizes
    }

    #[test]
    fn shares_parse_and_round_up() {
        assert_eq!("8".parse::<Share>().unwrap().of(40), 8);
        assert_eq!("25%".parse::<Share>().unwrap().of(40), 10);
        assert_eq!("10%".parse::<Share>().unwrap().of(5), 1);
        assert_eq!("50".parse::<Share>().unwrap().of(40), 40);
        assert!("0%".parse::<Share>().is_err());
        assert!("101%".parse::<Share>().is_err());
        assert!("eight".parse::<Share>().unwrap_err().contains("eight"));
        assert_eq!("25%".parse::<Share>().unwrap().to_string(), "25%");
    }

    #[test]
    fn explicit_waves_are_cumulative_shares() {
        let waves = policy("8", Some("1,25%,100%")).assign_waves(40).unwrap();
        assert_eq!(sizes(&waves), vec![1, 9, 30]);
        assert_eq!(waves.len(), 40);
        // A wave that adds nothing is dropped rather than gated on.
        let waves = policy("8", Some("1,1,100%")).assign_waves(3).unwrap();
        assert_eq!(sizes(&waves), vec![1, 2]);
        assert!(matches!(
            policy("8", Some("1,50%")).assign_waves(40),
            Err(WavesError::Short { covered: 20, .. })
        ));
        assert!(matches!(
            policy("8", Some("50%,10,100%")).assign_waves(40),
            Err(WavesError::Shrinks { .. })
        ));
    }

    #[test]
    fn the_default_ramps_from_a_canary_to_the_concurrency() {
        assert_eq!(
            sizes(&policy("8", None).assign_waves(40).unwrap()),
            vec![1, 2, 4, 33]
        );
        assert_eq!(sizes(&policy("1", None).assign_waves(5).unwrap()), vec![5]);
        assert_eq!(
            sizes(&policy("4", None).assign_waves(2).unwrap()),
            vec![1, 1]
        );
        assert_eq!(sizes(&policy("4", None).assign_waves(1).unwrap()), vec![1]);
        assert!(policy("4", None).assign_waves(0).unwrap().is_empty());
    }

    #[test]
    fn gates_and_policies_round_trip_as_text() {
        for gate in ["none", "approve", "pause=10m"] {
            assert_eq!(gate.parse::<WaveGate>().unwrap().to_string(), gate);
        }
        assert!("pause=soon".parse::<WaveGate>().is_err());
        let policy = Policy {
            gate: WaveGate::Pause(Duration::from_secs(90)),
            ..policy("25%", Some("1,100%"))
        };
        let stored = serde_json::to_value(&policy).unwrap();
        assert_eq!(stored["concurrency"], "25%");
        assert_eq!(serde_json::from_value::<Policy>(stored).unwrap(), policy);
    }
}
