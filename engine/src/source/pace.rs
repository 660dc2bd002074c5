//! `--max-bandwidth`: a cap on the aggregate wire rate, shared by every worker.
//!
//! Each batch reserves its bytes' worth of time on one virtual clock; a sender waits until
//! its slot starts. Idle time is not saved up, so there is no burst after a pause.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A shared pacer; `None` rate means no cap.
pub struct Pacer {
    bytes_per_s: Option<f64>,
    next: Mutex<Option<Instant>>,
}

impl Pacer {
    pub fn new(bytes_per_s: Option<f64>) -> Self {
        Self {
            bytes_per_s: bytes_per_s.filter(|r| *r > 0.0 && r.is_finite()),
            next: Mutex::new(None),
        }
    }

    /// Reserves `bytes` at the cap and returns how long to wait, from `now`, before sending.
    pub fn reserve(&self, bytes: u64, now: Instant) -> Duration {
        let Some(rate) = self.bytes_per_s else {
            return Duration::ZERO;
        };
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let start = match *next {
            Some(n) if n > now => n,
            _ => now,
        };
        *next = Some(start + Duration::from_secs_f64(bytes as f64 / rate));
        start - now
    }

    /// Waits for a slot for `bytes`.
    pub fn pace(&self, bytes: u64) {
        let wait = self.reserve(bytes, Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_follow_the_cap_without_bursts() {
        let p = Pacer::new(Some(10e6));
        let t0 = Instant::now();
        let waits: Vec<_> = (0..5).map(|_| p.reserve(1_000_000, t0)).collect();
        let ms: Vec<u128> = waits.iter().map(|w| w.as_millis()).collect();
        assert_eq!(ms, vec![0, 100, 200, 300, 400]);
        // After a long idle spell the next batch goes at once: idle time is not banked.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(p.reserve(1_000_000, later), Duration::ZERO);
        assert_eq!(p.reserve(1_000_000, later).as_millis(), 100);
        assert_eq!(Pacer::new(None).reserve(1 << 30, t0), Duration::ZERO);
    }
}
