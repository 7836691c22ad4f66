//! Retries of store calls while the database is unavailable (restarting, unreachable, or out of
//! connections), with exponential backoff and jitter, so a short outage loses nothing.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use studio_store::StoreError;
use tokio::time::Instant;

/// The first retry waits about this long...
const FIRST_DELAY: Duration = Duration::from_millis(200);
/// ...and no retry waits longer than this.
const MAX_DELAY: Duration = Duration::from_secs(5);

/// Returns the wait before retry number `retry` (0-based). It doubles from [`FIRST_DELAY`] up
/// to [`MAX_DELAY`] and is scaled by `jitter` in [0.5, 1], so many workers do not retry in step.
pub(crate) fn backoff(retry: u32, jitter: f64) -> Duration {
    let doubled = FIRST_DELAY.saturating_mul(1u32 << retry.min(16));
    doubled.min(MAX_DELAY).mul_f64(jitter.clamp(0.5, 1.0))
}

/// Draws a random jitter factor for [`backoff`].
pub(crate) fn random_jitter() -> f64 {
    rand::thread_rng().gen_range(0.5..=1.0)
}

/// Runs `call` until it returns anything but [`StoreError::Unavailable`], or until `patience`
/// has passed since the first failure; then returns the last result. The first failure is
/// logged at warn level, later ones at debug, and the recovery at info.
pub(crate) async fn retry_unavailable<T, F, Fut>(
    operation: &str,
    patience: Duration,
    mut call: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut failures = 0u32;
    let mut first_failure = None;
    loop {
        match call().await {
            Err(StoreError::Unavailable(source)) => {
                let since = *first_failure.get_or_insert_with(Instant::now);
                if since.elapsed() >= patience {
                    tracing::warn!(operation, failures = failures + 1, "the database stayed unavailable; giving up");
                    return Err(StoreError::Unavailable(source));
                }
                if failures == 0 {
                    tracing::warn!(operation, error = %source, "the database is unavailable; retrying with backoff");
                } else {
                    tracing::debug!(operation, failures, error = %source, "the database is still unavailable");
                }
                tokio::time::sleep(backoff(failures, random_jitter())).await;
                failures += 1;
            }
            result => {
                if failures > 0 && result.is_ok() {
                    tracing::info!(operation, failures, "the database is reachable again");
                }
                return result;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(0, 1.0), FIRST_DELAY);
        assert_eq!(backoff(1, 1.0), FIRST_DELAY * 2);
        assert_eq!(backoff(3, 1.0), FIRST_DELAY * 8);
        assert_eq!(backoff(10, 1.0), MAX_DELAY);
        assert_eq!(backoff(u32::MAX, 1.0), MAX_DELAY);
    }

    #[test]
    fn jitter_scales_within_half_to_whole() {
        assert_eq!(backoff(2, 0.5), FIRST_DELAY * 2);
        assert_eq!(backoff(2, 0.1), FIRST_DELAY * 2, "jitter below 0.5 is clamped");
        for _ in 0..100 {
            let jitter = random_jitter();
            assert!((0.5..=1.0).contains(&jitter), "{jitter}");
        }
    }

    fn unavailable() -> StoreError {
        StoreError::Unavailable("connection refused".into())
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_the_database_answers() {
        let calls = AtomicU32::new(0);
        let result = retry_unavailable("test", Duration::from_secs(60), || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0..=2 => Err(unavailable()),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(result.unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_patience() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result: Result<(), _> = retry_unavailable("test", Duration::from_secs(10), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(unavailable())
        })
        .await;
        assert!(matches!(result, Err(StoreError::Unavailable(_))));
        assert!(started.elapsed() >= Duration::from_secs(10));
        assert!(started.elapsed() < Duration::from_secs(16), "{:?}", started.elapsed());
        assert!(calls.load(Ordering::SeqCst) > 3);
    }

    #[tokio::test(start_paused = true)]
    async fn other_errors_are_returned_at_once() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = retry_unavailable("test", Duration::from_secs(10), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(StoreError::Conflict("the job was taken".into()))
        })
        .await;
        assert!(matches!(result, Err(StoreError::Conflict(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
