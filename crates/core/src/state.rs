//! The lifecycle of a sandbox, as the control plane records it.
//!
//! ```text
//!   creating ──▶ running ◀──▶ paused
//!      │            │            │
//!      └────────────┴────────────┴──▶ killed
//! ```
//!
//! Every transition is persisted before it is acknowledged. `killed` is final; a failed
//! create goes straight from `creating` to `killed`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Being started; not yet reachable.
    Creating,
    /// Running and reachable.
    Running,
    /// Frozen or checkpointed; resumed by `connect`.
    Paused,
    /// Gone for good.
    Killed,
}

impl SandboxState {
    /// Every state, in lifecycle order.
    pub const ALL: [SandboxState; 4] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Killed,
    ];

    /// The lowercase name used in the store and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Killed => "killed",
        }
    }

    /// Whether `self → to` is a legal transition (the whole table, checked by a test).
    pub fn can_transition(self, to: SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, to),
            (Creating, Running)
                | (Creating, Killed)
                | (Running, Paused)
                | (Running, Killed)
                | (Paused, Running)
                | (Paused, Killed)
        )
    }

    /// Whether a sandbox in this state still exists for API callers.
    pub fn is_live(self) -> bool {
        self != SandboxState::Killed
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown state name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown sandbox state {0:?}; known: creating, running, paused, killed")]
pub struct UnknownState(pub String);

impl FromStr for SandboxState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, UnknownState> {
        SandboxState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SandboxState::*;

    #[test]
    fn transition_table() {
        let allowed = [
            (Creating, Running),
            (Creating, Killed),
            (Running, Paused),
            (Running, Killed),
            (Paused, Running),
            (Paused, Killed),
        ];
        for from in SandboxState::ALL {
            for to in SandboxState::ALL {
                assert_eq!(
                    from.can_transition(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        assert!(!Killed.is_live());
    }

    #[test]
    fn names_round_trip() {
        for s in SandboxState::ALL {
            assert_eq!(s.as_str().parse::<SandboxState>().unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("dead".parse::<SandboxState>().is_err());
    }
}
