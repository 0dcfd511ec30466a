//! User-facing errors: what happened, what to do next, and a distinct exit code per kind.
//! They cross the local socket as values, so the CLI renders a daemon's refusal exactly as
//! it would its own.

use serde::{Deserialize, Serialize};

/// The kind of failure, which fixes the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Something unexpected failed (exit 1).
    Internal,
    /// The command line, a config file or an argument was invalid (exit 2).
    BadInput,
    /// The named run or instance does not exist (exit 3).
    NotFound,
    /// The request conflicts with the current state, e.g. the run is not active (exit 4).
    Conflict,
    /// The daemon could not be reached or started (exit 5).
    DaemonUnavailable,
    /// An agent is unreachable or refused the request (exit 6).
    Agent,
    /// The provider has none of what was asked, here and now: no capacity, an instance
    /// type not offered there, a spot price above the maximum, a used-up quota (exit 7).
    /// Another instance type, zone or time may have it.
    Capacity,
}

impl ErrorCode {
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorCode::Internal => 1,
            ErrorCode::BadInput => 2,
            ErrorCode::NotFound => 3,
            ErrorCode::Conflict => 4,
            ErrorCode::DaemonUnavailable => 5,
            ErrorCode::Agent => 6,
            ErrorCode::Capacity => 7,
        }
    }
}

/// An error meant for the person at the terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct UserError {
    pub code: ErrorCode,
    pub message: String,
    /// Steps that resolve it, shown under `To resolve:`.
    pub to_resolve: Vec<String>,
}

impl UserError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        UserError {
            code,
            message: message.into(),
            to_resolve: Vec::new(),
        }
    }

    pub fn resolve(mut self, step: impl Into<String>) -> Self {
        self.to_resolve.push(step.into());
        self
    }

    /// Classifies any error: a `UserError` anywhere in the chain keeps its code; anything
    /// else is internal, with the whole chain as its message.
    pub fn from_anyhow(e: &anyhow::Error) -> Self {
        if let Some(user) = e.chain().find_map(|c| c.downcast_ref::<UserError>()) {
            let mut user = user.clone();
            let context: Vec<String> = e
                .chain()
                .take_while(|c| c.downcast_ref::<UserError>().is_none())
                .map(|c| c.to_string())
                .collect();
            if !context.is_empty() {
                user.message = format!("{}: {}", context.join(": "), user.message);
            }
            return user;
        }
        UserError::new(ErrorCode::Internal, format!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn codes_are_distinct() {
        let codes = [
            ErrorCode::Internal,
            ErrorCode::BadInput,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::DaemonUnavailable,
            ErrorCode::Agent,
        ];
        let mut exits: Vec<u8> = codes.iter().map(|c| c.exit_code()).collect();
        exits.dedup();
        assert_eq!(exits.len(), codes.len());
    }

    #[test]
    fn user_errors_keep_their_code_through_context() {
        let e = Err::<(), _>(UserError::new(
            ErrorCode::NotFound,
            "no run run-000000000000",
        ))
        .context("stopping")
        .expect_err("error");
        let user = UserError::from_anyhow(&e);
        assert_eq!(user.code, ErrorCode::NotFound);
        assert_eq!(user.message, "stopping: no run run-000000000000");
        let plain = UserError::from_anyhow(&anyhow::anyhow!("boom"));
        assert_eq!(plain.code, ErrorCode::Internal);
    }
}
