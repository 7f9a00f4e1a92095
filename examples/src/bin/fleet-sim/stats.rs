//! Latency percentiles, names and clocks shared by both sides.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The `i`-th simulated device's thing name.
pub(crate) fn thing_name(i: usize) -> String {
    format!("sim-{i:05}")
}

/// Microseconds since the epoch (device and cloud run on one machine, so
/// their clocks agree).
pub(crate) fn epoch_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Observed latencies, in microseconds.
#[derive(Debug, Default, Clone)]
pub(crate) struct Latencies(Vec<u32>);

impl Latencies {
    pub(crate) fn push(&mut self, d: Duration) {
        self.0
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    pub(crate) fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The `p`-th percentile (nearest rank); zero when empty.
    pub(crate) fn percentile(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        let index = rank.clamp(1, sorted.len()) - 1;
        Duration::from_micros(u64::from(sorted[index]))
    }
}

/// A padded JSON value of about `bytes` bytes.
pub(crate) fn padding(bytes: usize) -> String {
    "x".repeat(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut l = Latencies::default();
        for us in 1..=100 {
            l.push(Duration::from_micros(us));
        }
        assert_eq!(l.percentile(50.0), Duration::from_micros(50));
        assert_eq!(l.percentile(99.0), Duration::from_micros(99));
        assert_eq!(l.percentile(100.0), Duration::from_micros(100));
        assert_eq!(Latencies::default().percentile(50.0), Duration::ZERO);
    }
}
