//! Retry timing: exponential backoff with full jitter, bounded by a deadline.
//!
//! A [`Backoff`] is made when an operation first fails; each further failure asks
//! it for the next delay, and it answers `None` once the next attempt would start
//! after the deadline, so callers give up with a clean error instead of hanging.
//! Progress (bytes verified) resets it: the deadline bounds time *without
//! progress*, not the life of a long read.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use tokio::time::Instant;

/// How the client retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// First backoff cap.
    pub initial: Duration,
    /// Largest backoff cap.
    pub max: Duration,
    /// Give up when no progress was made for this long.
    pub deadline: Duration,
    /// A stream with outstanding ranges that received nothing for this long is
    /// treated as broken.
    pub stall_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_secs(2),
            deadline: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(10),
        }
    }
}

/// Backoff state for one failing operation.
#[derive(Debug)]
pub struct Backoff {
    policy: RetryPolicy,
    attempts: u32,
    started: Instant,
    seed: u64,
}

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish()
}

impl Backoff {
    pub fn new(policy: &RetryPolicy) -> Backoff {
        Backoff {
            policy: policy.clone(),
            attempts: 0,
            started: Instant::now(),
            seed: random_u64() | 1,
        }
    }

    /// Attempts made so far (failures seen).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Time since the first failure.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The delay before the next attempt, or `None` when the deadline is spent.
    pub fn next_delay(&mut self) -> Option<Duration> {
        let cap = self
            .policy
            .initial
            .saturating_mul(1u32 << self.attempts.min(20))
            .min(self.policy.max);
        self.attempts += 1;
        // xorshift for jitter: full jitter in [cap/2, cap].
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let frac = (self.seed >> 11) as f64 / (1u64 << 53) as f64;
        let delay = cap.mul_f64(0.5 + 0.5 * frac);
        (self.started.elapsed() + delay <= self.policy.deadline).then_some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn grows_then_gives_up_at_the_deadline() {
        let p = RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(100),
            deadline: Duration::from_secs(1),
            ..Default::default()
        };
        let mut b = Backoff::new(&p);
        let mut total = Duration::ZERO;
        let mut delays = vec![];
        while let Some(d) = b.next_delay() {
            assert!(d <= p.max);
            delays.push(d);
            tokio::time::sleep(d).await;
            total += d;
        }
        assert!(total <= p.deadline);
        assert!(delays.len() >= 10, "{delays:?}");
        assert!(delays[0] <= Duration::from_millis(10));
        assert!(delays.last().copied().unwrap_or_default() >= Duration::from_millis(50));
    }
}
