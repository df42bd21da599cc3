//! Upstream health: a circuit breaker, retry backoff, and the rate-limit budget.
//!
//! - The circuit is closed while upstream answers; after `failures_to_open`
//!   failures in a row (transport errors, 5xx, 429) it opens: no request goes
//!   out for `open_for`, so callers serve stale content at once. Then one probe
//!   is let through (half-open); its success closes the circuit, its failure
//!   opens it again. A probe that never reports (its caller went away) lets the
//!   next request probe.
//! - Retries back off exponentially with full jitter ("Exponential Backoff And
//!   Jitter", AWS Architecture Blog, 2015): sleep a random time in
//!   `[0, min(max, base * 2^attempt)]`.
//! - Docker Hub's `ratelimit-remaining: 76;w=21600` says how many pulls are left
//!   in the window; below the reserve, callers stop revalidating tags until the
//!   window has passed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the breaker and the retries do; from the upstream's configuration.
#[derive(Debug, Clone)]
pub struct HealthPolicy {
    /// Failures in a row that open the circuit.
    pub failures_to_open: u32,
    /// How long the circuit stays open before a probe.
    pub open_for: Duration,
    /// Retries of a failed idempotent request (so `retries + 1` attempts).
    pub retries: u32,
    /// First backoff ceiling; doubles per attempt.
    pub backoff: Duration,
    /// Largest backoff; a `Retry-After` longer than this is not waited for.
    pub max_backoff: Duration,
    /// Below this many remaining pulls, tags are not revalidated.
    pub ratelimit_reserve: u64,
}

/// The breaker's state, for operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests flow.
    Closed,
    /// No requests until the probe time.
    Open,
    /// One probe request is deciding.
    HalfOpen,
}

#[derive(Debug)]
enum Circuit {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// What upstream said about its rate limit, when it last said it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Pulls allowed per window (`ratelimit-limit`).
    pub limit: Option<u64>,
    /// Pulls left in the window (`ratelimit-remaining`).
    pub remaining: u64,
    /// The window (`w=` seconds).
    pub window: Duration,
    /// When upstream said it.
    pub seen: Instant,
}

/// Health of one upstream; shared by all its requests.
#[derive(Debug)]
pub struct Health {
    policy: HealthPolicy,
    /// A std mutex: held only to read or flip the state, never across an await.
    circuit: Mutex<Circuit>,
    /// A std mutex, as above.
    ratelimit: Mutex<Option<RateLimit>>,
    /// State of the jitter generator (xorshift; quality is irrelevant here).
    jitter: AtomicU64,
}

/// Permission to send one request; report its outcome with [`Ticket::record`].
pub struct Ticket<'a> {
    health: &'a Health,
    probe: bool,
    recorded: bool,
}

impl Ticket<'_> {
    /// Whether this request is the half-open circuit's probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Reports whether upstream answered healthily (anything but a transport error, 5xx or 429).
    pub fn record(mut self, healthy: bool) {
        self.recorded = true;
        self.health.record(healthy, self.probe);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            // The probe's caller went away: let the next request probe instead
            // (unless another request has settled the circuit meanwhile).
            let mut circuit = self.health.circuit.lock().expect("circuit poisoned");
            if matches!(*circuit, Circuit::HalfOpen { probing: true }) {
                *circuit = Circuit::HalfOpen { probing: false };
            }
        }
    }
}

/// Parses `100;w=21600` (or a bare `100`): the count and the window.
pub fn parse_ratelimit(value: &str) -> Option<(u64, Option<Duration>)> {
    let mut parts = value.split(';');
    let count = parts.next()?.trim().parse().ok()?;
    let window = parts.find_map(|p| {
        let secs = p.trim().strip_prefix("w=")?;
        secs.parse().ok().map(Duration::from_secs)
    });
    Some((count, window))
}

impl Health {
    /// A healthy upstream under `policy`.
    pub fn new(policy: HealthPolicy) -> Health {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        Health {
            policy,
            circuit: Mutex::new(Circuit::Closed { failures: 0 }),
            ratelimit: Mutex::new(None),
            jitter: AtomicU64::new(seed | 1),
        }
    }

    /// The policy.
    pub fn policy(&self) -> &HealthPolicy {
        &self.policy
    }

    /// Lets a request go, or says how long the circuit stays open.
    pub fn admit(&self) -> Result<Ticket<'_>, Duration> {
        let mut circuit = self.circuit.lock().expect("circuit poisoned");
        let now = Instant::now();
        let probe = match *circuit {
            Circuit::Closed { .. } => false,
            Circuit::Open { until } if now < until => return Err(until - now),
            Circuit::Open { .. } | Circuit::HalfOpen { probing: false } => {
                *circuit = Circuit::HalfOpen { probing: true };
                true
            }
            // One probe at a time; the others are refused as if open.
            Circuit::HalfOpen { probing: true } => return Err(Duration::from_secs(1)),
        };
        Ok(Ticket {
            health: self,
            probe,
            recorded: false,
        })
    }

    fn record(&self, healthy: bool, probe: bool) {
        let mut circuit = self.circuit.lock().expect("circuit poisoned");
        let open = || Circuit::Open {
            until: Instant::now() + self.policy.open_for,
        };
        *circuit = match (&*circuit, healthy) {
            (_, true) => Circuit::Closed { failures: 0 },
            (Circuit::HalfOpen { .. }, false) if probe => open(),
            (Circuit::Closed { failures }, false) => {
                let failures = failures + 1;
                if failures >= self.policy.failures_to_open {
                    tracing::warn!(failures, open_for = ?self.policy.open_for, "circuit opened");
                    open()
                } else {
                    Circuit::Closed { failures }
                }
            }
            // A straggler's failure while open or probing changes nothing.
            (Circuit::Open { until }, false) => Circuit::Open { until: *until },
            (Circuit::HalfOpen { probing }, false) => Circuit::HalfOpen { probing: *probing },
        };
    }

    /// A body that broke off after healthy headers: a failure like any other.
    pub fn body_failed(&self) {
        self.record(false, false);
    }

    /// A body that arrived whole: upstream is healthy.
    pub fn body_succeeded(&self) {
        self.record(true, false);
    }

    /// The breaker's state now.
    pub fn state(&self) -> CircuitState {
        match *self.circuit.lock().expect("circuit poisoned") {
            Circuit::Closed { .. } => CircuitState::Closed,
            Circuit::Open { until } if Instant::now() < until => CircuitState::Open,
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// How long to wait before retry number `attempt` (0-based): full jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .policy
            .backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.policy.max_backoff);
        let mut x = self.jitter.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter.store(x, Ordering::Relaxed);
        let nanos = ceiling.as_nanos() as u64;
        Duration::from_nanos(if nanos == 0 { 0 } else { x % (nanos + 1) })
    }

    /// Reads the rate-limit headers of an answer, if it has them.
    pub fn observe_ratelimit(&self, headers: &reqwest::header::HeaderMap) {
        let get = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_ratelimit)
        };
        let Some((remaining, window)) = get("ratelimit-remaining") else {
            return;
        };
        let limit = get("ratelimit-limit");
        let window = window
            .or(limit.and_then(|(_, w)| w))
            .unwrap_or(Duration::from_secs(6 * 3600));
        *self.ratelimit.lock().expect("ratelimit poisoned") = Some(RateLimit {
            limit: limit.map(|(l, _)| l),
            remaining,
            window,
            seen: Instant::now(),
        });
    }

    /// The last rate-limit reading, if upstream sent one.
    pub fn ratelimit(&self) -> Option<RateLimit> {
        *self.ratelimit.lock().expect("ratelimit poisoned")
    }

    /// Whether the pulls left are below the reserve, within the current window.
    pub fn budget_low(&self) -> bool {
        self.ratelimit().is_some_and(|r| {
            r.remaining < self.policy.ratelimit_reserve && r.seen.elapsed() < r.window
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            failures_to_open: 3,
            open_for: Duration::from_millis(500),
            retries: 2,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ratelimit_reserve: 10,
        }
    }

    #[test]
    fn the_circuit_opens_after_failures_in_a_row_and_a_probe_closes_it() {
        let h = Health::new(policy());
        h.admit().unwrap().record(false);
        h.admit().unwrap().record(true);
        assert_eq!(
            h.state(),
            CircuitState::Closed,
            "a success resets the count"
        );
        for _ in 0..3 {
            h.admit().unwrap().record(false);
        }
        assert_eq!(h.state(), CircuitState::Open);
        assert!(h.admit().is_err(), "no traffic while open");
        std::thread::sleep(Duration::from_millis(600));
        let probe = h.admit().expect("a probe after open_for");
        assert!(h.admit().is_err(), "one probe at a time");
        probe.record(false);
        assert_eq!(h.state(), CircuitState::Open, "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(600));
        h.admit().unwrap().record(true);
        assert_eq!(h.state(), CircuitState::Closed);
    }

    #[test]
    fn a_probe_whose_caller_vanished_lets_the_next_request_probe() {
        let h = Health::new(policy());
        for _ in 0..3 {
            h.admit().unwrap().record(false);
        }
        std::thread::sleep(Duration::from_millis(600));
        drop(h.admit().unwrap());
        assert!(h.admit().is_ok());
    }

    #[test]
    fn backoff_is_jittered_below_a_doubling_ceiling() {
        let h = Health::new(policy());
        for attempt in 0..6 {
            let ceiling = Duration::from_millis(100 * (1 << attempt)).min(Duration::from_secs(1));
            let waits: Vec<Duration> = (0..50).map(|_| h.backoff(attempt)).collect();
            assert!(waits.iter().all(|w| *w <= ceiling), "{attempt}: {waits:?}");
            assert!(waits.windows(2).any(|w| w[0] != w[1]), "jittered");
        }
    }

    #[test]
    fn rate_limit_headers_set_the_budget() {
        assert_eq!(
            parse_ratelimit("100;w=21600"),
            Some((100, Some(Duration::from_secs(21600))))
        );
        assert_eq!(parse_ratelimit("7"), Some((7, None)));
        assert_eq!(parse_ratelimit("x;w=1"), None);
        let h = Health::new(policy());
        assert!(!h.budget_low());
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        headers.insert("ratelimit-remaining", "50;w=21600".parse().unwrap());
        h.observe_ratelimit(&headers);
        assert!(!h.budget_low());
        headers.insert("ratelimit-remaining", "9;w=21600".parse().unwrap());
        h.observe_ratelimit(&headers);
        assert!(h.budget_low());
        assert_eq!(h.ratelimit().unwrap().limit, Some(100));
        headers.insert("ratelimit-remaining", "9;w=0".parse().unwrap());
        h.observe_ratelimit(&headers);
        assert!(!h.budget_low(), "the window has passed");
    }
}
