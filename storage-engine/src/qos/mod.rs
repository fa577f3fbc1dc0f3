//! Per-volume QoS: token buckets for read/write IOPS and bandwidth (Portworx's
//! `io_throttle_rd_iops`, `io_throttle_wr_iops`, `io_throttle_rd_bw`, `io_throttle_wr_bw`).
//! A bucket may go into debt: a request that overdraws it waits until the debt is repaid, so
//! the long-run rate equals the limit and requests keep their order of arrival.

use parking_lot::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Limits of one volume; 0 means unlimited. Bandwidth in bytes per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    pub rd_iops: u64,
    pub wr_iops: u64,
    pub rd_bw: u64,
    pub wr_bw: u64,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        *self == Limits::default()
    }
}

/// Seconds of burst a bucket holds when full.
const BURST_SECONDS: f64 = 0.05;

#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, now: Instant) -> Bucket {
        let rate = rate as f64;
        Bucket { rate, tokens: Self::burst(rate), last: now }
    }

    fn burst(rate: f64) -> f64 {
        (rate * BURST_SECONDS).max(1.0)
    }

    /// Takes `cost` tokens; returns how long the caller must wait for them.
    fn take(&mut self, now: Instant, cost: f64) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(Self::burst(self.rate));
        self.tokens -= cost;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

struct State {
    limits: Limits,
    rd_iops: Bucket,
    wr_iops: Bucket,
    rd_bw: Bucket,
    wr_bw: Bucket,
}

pub struct Throttle {
    state: Mutex<State>,
}

impl Throttle {
    pub fn new(limits: Limits) -> Throttle {
        Throttle { state: Mutex::new(Self::state(limits)) }
    }

    fn state(l: Limits) -> State {
        let now = Instant::now();
        State {
            limits: l,
            rd_iops: Bucket::new(l.rd_iops, now),
            wr_iops: Bucket::new(l.wr_iops, now),
            rd_bw: Bucket::new(l.rd_bw, now),
            wr_bw: Bucket::new(l.wr_bw, now),
        }
    }

    /// Changes the limits online; requests already waiting keep their wait.
    pub fn set(&self, limits: Limits) {
        *self.state.lock() = Self::state(limits);
    }

    pub fn limits(&self) -> Limits {
        self.state.lock().limits
    }

    /// How long a request must wait before it may start (and charges it).
    pub fn charge(&self, write: bool, bytes: u64, now: Instant) -> Duration {
        let mut s = self.state.lock();
        if s.limits.is_unlimited() {
            return Duration::ZERO;
        }
        let (ops, bw) = if write { (s.limits.wr_iops, s.limits.wr_bw) } else { (s.limits.rd_iops, s.limits.rd_bw) };
        let mut wait = Duration::ZERO;
        if ops > 0 {
            let b = if write { &mut s.wr_iops } else { &mut s.rd_iops };
            wait = wait.max(b.take(now, 1.0));
        }
        if bw > 0 && bytes > 0 {
            let b = if write { &mut s.wr_bw } else { &mut s.rd_bw };
            wait = wait.max(b.take(now, bytes as f64));
        }
        wait
    }

    /// Waits until a request of `bytes` may start.
    pub async fn admit(&self, write: bool, bytes: u64) {
        let wait = self.charge(write, bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_run_rate_equals_the_limit() {
        let t = Throttle::new(Limits { rd_iops: 1000, ..Default::default() });
        let t0 = Instant::now();
        // 2000 back-to-back reads: the last one may start after about 2 s minus the burst.
        let mut last = Duration::ZERO;
        for _ in 0..2000 {
            last = t.charge(false, 4096, t0);
        }
        let expect = 2.0 - BURST_SECONDS;
        assert!((last.as_secs_f64() - expect).abs() < 0.01, "{last:?}");
        assert_eq!(t.charge(true, 4096, t0), Duration::ZERO, "writes are not limited");
    }

    #[test]
    fn bandwidth_and_iops_combine_and_limits_change_online() {
        let t = Throttle::new(Limits { wr_iops: 100, wr_bw: 1 << 20, ..Default::default() });
        let t0 = Instant::now();
        // 1 MiB writes: bandwidth binds (1 per second), not IOPS (100 per second).
        let w: Vec<Duration> = (0..3).map(|_| t.charge(true, 1 << 20, t0)).collect();
        assert!(w[2] > Duration::from_millis(1900), "{w:?}");
        t.set(Limits::default());
        assert_eq!(t.charge(true, 1 << 30, t0), Duration::ZERO);
        assert!(t.limits().is_unlimited());
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let t = Throttle::new(Limits { rd_iops: 100, ..Default::default() });
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(60);
        let waits: Vec<Duration> = (0..20).map(|_| t.charge(false, 0, later)).collect();
        assert!(waits[4].is_zero() && !waits[10].is_zero(), "a minute idle buys 5 requests of burst, not 6000: {waits:?}");
    }
}
