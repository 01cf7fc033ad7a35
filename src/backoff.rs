//! How long a retry loop waits before each new attempt: [`Backoff`]. A leaf module: every
//! stage that retries uses it, it uses none.
//!
//! ```
//! use std::time::Duration;
//! use streamex::backoff::Backoff;
//!
//! let mut backoff = Backoff::new(Duration::from_millis(500), 2.0, Duration::from_secs(2));
//! let waits: Vec<Duration> = backoff.by_ref().take(4).collect();
//! assert_eq!(waits, [500, 1000, 2000, 2000].map(Duration::from_millis));
//! backoff.reset(); // the attempt succeeded: the next failure waits `initial` again
//! assert_eq!(backoff.next(), Some(Duration::from_millis(500)));
//! ```

use std::time::Duration;

/// Exponential backoff: the first wait is `initial`, each one after it `multiplier` times the
/// one before, none longer than `max`.
///
/// It is an endless [`Iterator`] of waits: `next()` gives the wait before the next attempt
/// (never `None`), [`reset`](Backoff::reset) starts again from `initial` once an attempt has
/// succeeded. Waking up early on shutdown is the caller's part (`tokio::select!` with the
/// cancellation token beside the sleep).
///
/// The fields are the policy; changing them takes effect from the next wait on. Arithmetic
/// saturates: a multiplier below 1 or not a number, or an overflow, never panics (waits then
/// stay between zero and `max`).
#[derive(Clone, Debug, PartialEq)]
pub struct Backoff {
    /// The first wait.
    pub initial: Duration,
    /// How much longer each wait is than the one before.
    pub multiplier: f64,
    /// The longest wait, the first one included.
    pub max: Duration,
    /// The wait `next()` gives after this one; `None` until the first, and after a reset.
    following: Option<Duration>,
}

impl Backoff {
    /// Waits of `initial`, then `multiplier` times longer each time, at most `max`.
    pub const fn new(initial: Duration, multiplier: f64, max: Duration) -> Self {
        Backoff {
            initial,
            multiplier,
            max,
            following: None,
        }
    }

    /// Starts again: the next wait is `initial`.
    pub fn reset(&mut self) {
        self.following = None;
    }

    /// `wait` times the multiplier, at most `max`.
    fn grow(&self, wait: Duration) -> Duration {
        let secs = (wait.as_secs_f64() * self.multiplier).min(self.max.as_secs_f64());
        Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(self.max)
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    /// The wait before the next attempt. Never `None`.
    fn next(&mut self) -> Option<Duration> {
        let wait = self.following.unwrap_or(self.initial).min(self.max);
        self.following = Some(self.grow(wait));
        Some(wait)
    }

    /// The wait `n` attempts from now, in fewer steps once the waits stop changing (at `max`).
    fn nth(&mut self, n: usize) -> Option<Duration> {
        for _ in 0..n {
            let wait = self.next();
            if self.following == wait {
                break;
            }
        }
        self.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::MAX, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn grows_to_its_cap_and_stays() {
        let mut backoff = Backoff::new(ms(500), 2.0, ms(2000));
        let waits: Vec<Duration> = backoff.by_ref().take(5).collect();
        assert_eq!(waits, [ms(500), ms(1000), ms(2000), ms(2000), ms(2000)]);
    }

    #[test]
    fn reset_starts_again_from_initial() {
        let mut backoff = Backoff::new(ms(100), 3.0, ms(10_000));
        backoff.nth(3);
        backoff.reset();
        assert_eq!(backoff.next(), Some(ms(100)));
        assert_eq!(backoff.next(), Some(ms(300)));
    }

    #[test]
    fn nth_is_the_same_as_stepping() {
        let policy = Backoff::new(ms(7), 1.5, ms(60_000));
        for n in [0, 1, 2, 10, 30, 1_000] {
            let mut stepping = policy.clone();
            for _ in 0..n {
                stepping.next();
            }
            let stepped = stepping.next();
            assert_eq!(policy.clone().nth(n), stepped, "{n}");
        }
        // Far beyond the cap it answers at once.
        assert_eq!(policy.clone().nth(usize::MAX - 1), Some(ms(60_000)));
    }

    #[test]
    fn fields_set_after_new_take_effect() {
        let mut backoff = Backoff::new(ms(500), 2.0, Duration::from_secs(30));
        backoff.initial = ms(50);
        backoff.max = ms(80);
        assert_eq!(
            backoff.by_ref().take(3).collect::<Vec<_>>(),
            [ms(50), ms(80), ms(80)]
        );
    }

    #[test]
    fn odd_policies_never_panic() {
        for multiplier in [f64::NAN, f64::INFINITY, -2.0, 0.0, 0.5, 1e300] {
            let mut backoff = Backoff::new(ms(10), multiplier, ms(1000));
            for wait in backoff.by_ref().take(100) {
                assert!(wait <= ms(1000), "{multiplier}: {wait:?}");
            }
        }
        let mut huge = Backoff::new(Duration::MAX, 2.0, Duration::MAX);
        assert_eq!(huge.nth(5), Some(Duration::MAX));
        // The cap applies to the first wait too.
        assert_eq!(Backoff::new(ms(5000), 2.0, ms(1000)).next(), Some(ms(1000)));
    }
}
