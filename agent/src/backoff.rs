//! The redial policy: exponential, capped, with jitter so a fleet of agents does not
//! stampede a controller that comes back. Pure: the caller supplies the random sample.

use std::time::Duration;

/// The first retry waits about this long.
pub const BASE: Duration = Duration::from_millis(100);
/// No retry waits longer than this.
pub const CAP: Duration = Duration::from_secs(15);

/// The wait before redial number `attempt` (0-based). `jitter` is a sample from [0, 1):
/// the wait is between half and all of the capped exponential step.
pub fn delay(attempt: u32, jitter: f64) -> Duration {
    let step = BASE
        .saturating_mul(2u32.saturating_pow(attempt.min(20)))
        .min(CAP);
    let jitter = jitter.clamp(0.0, 1.0);
    step.mul_f64(0.5 + 0.5 * jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(attempt: u32, jitter: f64, expected_ms: u64) {
        assert_eq!(
            delay(attempt, jitter),
            Duration::from_millis(expected_ms),
            "attempt {attempt}, jitter {jitter}"
        );
    }

    #[test]
    fn grows_then_caps_with_jitter() {
        check(0, 0.0, 50);
        check(0, 1.0, 100);
        check(1, 0.0, 100);
        check(3, 0.5, 600);
        check(8, 0.0, 7_500);
        check(8, 1.0, 15_000);
        check(1_000, 1.0, 15_000);
        check(u32::MAX, 0.0, 7_500);
    }
}
