//! The backoff before a requeued job may be claimed again.

use std::time::Duration;

use studio_core::JobId;

/// The delay after the first failed attempt, before jitter.
pub const RETRY_BASE_DELAY: Duration = Duration::from_secs(10);

/// The maximum delay, before jitter. The delay doubles per attempt until it reaches this.
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(600);

/// Returns how long a job waits in the queue after its attempt number `attempt` (1-based)
/// failed: 10 s, 20 s, 40 s, … doubling up to 10 min, times a jitter factor in [0.5, 1.0],
/// in whole milliseconds, which both backends store exactly.
///
/// The jitter comes from a hash of the job id and the attempt, with no random generator or
/// clock, so the same inputs always give the same delay. Jobs that failed together, for
/// example when one worker machine died, still come back at different times. Attempt 0 counts
/// as 1.
pub fn retry_delay(job_id: &JobId, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(16);
    let base = RETRY_BASE_DELAY
        .saturating_mul(1 << doublings)
        .min(RETRY_MAX_DELAY);
    let millis = base.as_millis() as f64 * jitter_factor(job_id, attempt);
    Duration::from_millis(millis.round() as u64)
}

/// Maps the job id and attempt to a factor in [0.5, 1.0].
fn jitter_factor(job_id: &JobId, attempt: u32) -> f64 {
    let mut hash = fnv1a(job_id.as_str().as_bytes());
    hash = mix64(hash ^ u64::from(attempt));
    // The top 53 bits fill an f64 mantissa exactly, giving a uniform value in [0, 1).
    let unit = (hash >> 11) as f64 / (1u64 << 53) as f64;
    0.5 + 0.5 * unit
}

/// FNV-1a, 64-bit: a fixed, portable hash, unlike `DefaultHasher`, whose output may change
/// between Rust releases.
fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// Applies the SplitMix64 finalizer, which spreads a change in any input bit over every output
/// bit. Job ids are UUIDv7s that share their leading timestamp digits, so FNV alone varies too
/// little in the high bits that the jitter reads.
fn mix64(mut value: u64) -> u64 {
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u32) -> JobId {
        JobId::parse(&format!("ftjob-0198a1b2c3d47e5f8a9b{n:012x}")).unwrap()
    }

    #[test]
    fn delay_stays_within_jitter_bounds() {
        for n in 0..200 {
            for attempt in 1..=12 {
                let base = RETRY_BASE_DELAY
                    .saturating_mul(1 << (attempt - 1))
                    .min(RETRY_MAX_DELAY);
                let delay = retry_delay(&job(n), attempt);
                assert!(
                    delay >= base / 2,
                    "job {n} attempt {attempt}: {delay:?} < {:?}",
                    base / 2
                );
                assert!(
                    delay <= base,
                    "job {n} attempt {attempt}: {delay:?} > {base:?}"
                );
            }
        }
    }

    #[test]
    fn delay_grows_with_attempts_until_cap() {
        let id = job(7);
        // Each doubling of the base outweighs the widest jitter swing (x0.5), so the delay
        // never shrinks, and it grows while the base still doubles.
        for attempt in 1..6 {
            let now = retry_delay(&id, attempt);
            let next = retry_delay(&id, attempt + 1);
            assert!(next >= now, "attempt {attempt}: {now:?}, then {next:?}");
        }
        assert!(retry_delay(&id, 5) > retry_delay(&id, 1) * 4);
    }

    #[test]
    fn delay_is_capped_at_ten_minutes() {
        for attempt in [7, 10, 31, 32, 1000, u32::MAX] {
            let delay = retry_delay(&job(1), attempt);
            assert!(delay <= RETRY_MAX_DELAY, "attempt {attempt}: {delay:?}");
            assert!(delay >= RETRY_MAX_DELAY / 2, "attempt {attempt}: {delay:?}");
        }
    }

    #[test]
    fn delay_is_deterministic() {
        let id = JobId::new();
        assert_eq!(retry_delay(&id, 3), retry_delay(&id, 3));
        assert_eq!(retry_delay(&job(5), 2), retry_delay(&job(5), 2));
    }

    #[test]
    fn delay_differs_between_jobs() {
        let delays: std::collections::BTreeSet<Duration> =
            (0..50).map(|n| retry_delay(&job(n), 2)).collect();
        // 50 jobs over a 10 s jitter window: nearly all distinct, never a handful of values.
        assert!(delays.len() >= 45, "only {} distinct delays", delays.len());
    }

    #[test]
    fn attempt_zero_counts_as_first() {
        let delay = retry_delay(&job(3), 0);
        assert!(delay <= RETRY_BASE_DELAY, "{delay:?}");
        assert!(delay >= RETRY_BASE_DELAY / 2, "{delay:?}");
    }
}
