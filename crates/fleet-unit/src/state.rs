//! Target (desired) states of a unit: inactive, loaded, launched.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::quote::go_quote;

/// The state a user asked for (`fleetctl submit`/`load`/`start`). Ordered
/// `Inactive < Loaded < Launched`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    #[default]
    Inactive,
    Loaded,
    Launched,
}

/// A string that is not a target state. Display is fleet's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {} for JobState", go_quote(.input))]
pub struct TargetStateError {
    pub input: String,
}

impl TargetState {
    /// The lowercase name fleet used on the wire and in etcd.
    pub fn as_str(&self) -> &'static str {
        match self {
            TargetState::Inactive => "inactive",
            TargetState::Loaded => "loaded",
            TargetState::Launched => "launched",
        }
    }
}

impl fmt::Display for TargetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TargetState {
    type Err = TargetStateError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inactive" => Ok(TargetState::Inactive),
            "loaded" => Ok(TargetState::Loaded),
            "launched" => Ok(TargetState::Launched),
            _ => Err(TargetStateError {
                input: s.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_orders() {
        let cases = [
            ("inactive", TargetState::Inactive),
            ("loaded", TargetState::Loaded),
            ("launched", TargetState::Launched),
        ];
        for (s, st) in cases {
            assert_eq!(s.parse::<TargetState>(), Ok(st));
            assert_eq!(st.to_string(), s);
            assert_eq!(
                serde_json::to_string(&st).expect("serialize"),
                format!("\"{s}\"")
            );
        }
        assert!(TargetState::Inactive < TargetState::Loaded);
        assert!(TargetState::Loaded < TargetState::Launched);
    }

    #[test]
    fn rejects_with_fleets_message() {
        let cases = [
            ("x", "invalid value \"x\" for JobState"),
            ("Launched", "invalid value \"Launched\" for JobState"),
            ("", "invalid value \"\" for JobState"),
        ];
        for (input, want) in cases {
            assert_eq!(
                input.parse::<TargetState>().expect_err(input).to_string(),
                want
            );
        }
    }
}
