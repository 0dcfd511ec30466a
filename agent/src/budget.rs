//! Holds a run's budget on the instance, so the cap holds while the daemon is away (the
//! laptop asleep): waits until the first cap is reached (`protocol::budget`, the same
//! decision the daemon shows), then records `Notice::BudgetExceeded` with the spend and
//! stops the run the graceful way (SIGTERM, its grace period, checkpoints pushed before
//! its end is recorded), after which its end action runs as for any end.

use std::sync::Arc;
use std::time::Duration;

use protocol::budget::Budget;
use protocol::{EventKind, Notice};
use tokio::time::Instant;

use crate::eventlog::EventLog;
use crate::supervisor::Handle;

/// Waits out `budget` from now (the moment it was handed over) unless the run ends first.
pub async fn hold(budget: Budget, run: Handle, log: Arc<EventLog>) {
    let handed = Instant::now();
    let mut cursor = log.subscribe();
    let (limit, spend) = loop {
        let since_ms = handed.elapsed().as_millis() as u64;
        let spend = budget.spend(since_ms);
        if let Some(limit) = budget.reached(&spend) {
            break (limit, spend);
        }
        let Some(left_ms) = budget.left_ms(since_ms) else {
            return;
        };
        tokio::select! {
            _ = cursor.wait_for(|c| c.ended) => return,
            () = tokio::time::sleep(Duration::from_millis(left_ms.max(1))) => {}
        }
    };
    tracing::warn!("run reached {}: stopping it", limit.describe(&spend));
    if let Err(e) = log.append(EventKind::Notice(Notice::BudgetExceeded { limit, spend })) {
        tracing::warn!("run log write failed: {e}");
    }
    run.stop(None);
}
