//! Wall-clock time as the records keep it.

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Spaces work out to `rate` bytes per second, over every caller together (0: unlimited).
/// Each caller pays after the fact: what it sent delays the next one.
#[derive(Debug, Default)]
pub struct Pacer {
    rate: std::sync::atomic::AtomicU64,
    next: parking_lot::Mutex<Option<tokio::time::Instant>>,
}

impl Pacer {
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts `bytes` as sent, and waits until the rate allows them.
    pub async fn take(&self, bytes: u64) {
        let rate = self.rate();
        if rate == 0 || bytes == 0 {
            return;
        }
        let until = {
            let mut next = self.next.lock();
            let now = tokio::time::Instant::now();
            let start = next.filter(|t| *t > now).unwrap_or(now);
            let end = start + std::time::Duration::from_secs_f64(bytes as f64 / rate as f64);
            *next = Some(end);
            end
        };
        tokio::time::sleep_until(until).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn callers_together_keep_to_the_rate_and_zero_is_unlimited() {
        let p = std::sync::Arc::new(Pacer::default());
        let t0 = tokio::time::Instant::now();
        p.take(1 << 30).await;
        assert_eq!(t0.elapsed(), Duration::ZERO, "no rate: no wait");
        p.set_rate(1 << 20);
        let each: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move { p.take(1 << 20).await })
            })
            .collect();
        for h in each {
            h.await.unwrap();
        }
        assert_eq!(t0.elapsed(), Duration::from_secs(4), "4 MiB at 1 MiB/s, sent by four callers");
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t1 = tokio::time::Instant::now();
        p.take(1 << 19).await;
        assert_eq!(t1.elapsed(), Duration::from_millis(500), "idle time is not saved up");
    }
}
