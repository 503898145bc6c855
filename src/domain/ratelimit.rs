//! The sliding-window counter.
//!
//! Each key keeps the count of the current fixed one-minute window and of the previous one. The
//! number of requests "in the last minute" is estimated as
//!
//! ```text
//! estimate = current + previous * (W - elapsed) / W
//! ```
//!
//! where `W` is the window (60 s) and `elapsed` the time since the current window began: the
//! previous window's count weighted by how much of it still overlaps the trailing minute. A
//! request of cost `c` is admitted when `estimate + c <= limit`; a rejected request consumes
//! nothing. All comparisons are done on values scaled by `W`, in integers, so the Redis script
//! (which mirrors this function line by line) and the in-memory store agree exactly.
//!
//! Error against an exact sliding log: the estimate assumes the previous window's requests
//! were spread evenly. If `p` requests were admitted in the previous window, the true count in
//! the trailing minute differs from the estimate by at most `p * elapsed / W` upward and
//! `p * (W - elapsed) / W` downward. So (a) no fixed window ever admits more than `limit`, and
//! (b) a trailing 60-second window admits at most `limit + p * elapsed / W` < 2 x limit, the
//! worst case needing all previous-window traffic bunched at its end. The conformance tests
//! replay traffic against an exact log and check both bounds.

use super::decision::RateLimitState;
use super::time::Millis;

/// Window length: one minute.
pub const WINDOW_MS: Millis = 60_000;

/// The per-key counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowState {
    /// Index of the window `current` belongs to (`now / W`).
    pub window: i64,
    pub current: u64,
    pub previous: u64,
}

/// The state rolled forward to `now`: (window index, elapsed ms in it, current, previous).
///
/// If the stored window is *ahead* of `now` (another replica's clock runs slightly ahead), we
/// stay in the stored window with nothing elapsed: the most conservative reading.
fn roll(state: WindowState, now: Millis) -> (i64, Millis, u64, u64) {
    let window = now.div_euclid(WINDOW_MS);
    if state.window > window {
        return (state.window, 0, state.current, state.previous);
    }
    let elapsed = now - window * WINDOW_MS;
    if state.window == window {
        (window, elapsed, state.current, state.previous)
    } else if state.window == window - 1 {
        (window, elapsed, 0, state.current)
    } else {
        (window, elapsed, 0, 0)
    }
}

/// The result of an admission check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    pub allowed: bool,
    /// The state to store (rolled forward; incremented if allowed).
    pub state: WindowState,
    pub rate: RateLimitState,
}

/// Tries to admit a request of `cost` units against `limit` per window.
pub fn admit(state: WindowState, now: Millis, limit: u32, cost: u32) -> Admission {
    let w = WINDOW_MS as u128;
    let (window, elapsed, mut current, previous) = roll(state, now);
    let weight = (WINDOW_MS - elapsed) as u128; // previous window's overlap, scaled by W
    let (limit_s, cost_u) = (u128::from(limit), u128::from(cost));
    let prev_scaled = u128::from(previous) * weight;
    let allowed = (u128::from(current) + cost_u) * w + prev_scaled <= limit_s * w;
    let mut retry_after_ms = None;
    if allowed {
        current += u64::from(cost);
    } else if u128::from(current) + cost_u <= limit_s && previous > 0 {
        // Passes later in this window, once enough of the previous window has slid out:
        // need previous * (weight - t) <= (limit - current - cost) * W.
        let room = (limit_s - u128::from(current) - cost_u) * w;
        let t = weight - room / u128::from(previous);
        retry_after_ms = Some(t as Millis);
    } else if cost_u <= limit_s {
        // Passes in the next window, where `current` becomes the previous count:
        // need current * (W - t) <= (limit - cost) * W.
        let room = (limit_s - cost_u) * w;
        let t = if current == 0 {
            0
        } else {
            w.saturating_sub(room / u128::from(current))
        };
        retry_after_ms = Some((weight + t) as Millis);
    }
    let used_scaled = u128::from(current) * w + prev_scaled;
    let remaining = (limit_s * w).saturating_sub(used_scaled) / w;
    Admission {
        allowed,
        state: WindowState {
            window,
            current,
            previous,
        },
        rate: RateLimitState {
            limit,
            remaining: remaining.min(u128::from(u32::MAX)) as u32,
            reset_after_ms: weight as Millis,
            retry_after_ms,
        },
    }
}

/// The window as it stands at `now`, without consuming anything: (used, remaining,
/// reset_after_ms). `used` is the estimate rounded up, so `used + remaining == limit` whenever
/// the key is within its limit.
pub fn peek(state: WindowState, now: Millis, limit: u32) -> (u32, u32, Millis) {
    let w = WINDOW_MS as u128;
    let (_, elapsed, current, previous) = roll(state, now);
    let weight = (WINDOW_MS - elapsed) as u128;
    let used_scaled = u128::from(current) * w + u128::from(previous) * weight;
    let used = used_scaled.div_ceil(w).min(u128::from(u32::MAX)) as u32;
    let remaining = (u128::from(limit) * w).saturating_sub(used_scaled) / w;
    (used, remaining as u32, weight as Millis)
}

/// The unrounded share of `limit` the window holds at `now` (0 when there is no limit): what
/// the near-rate-limit alert compares with its thresholds.
pub fn used_fraction(state: WindowState, now: Millis, limit: u32) -> f64 {
    if limit == 0 {
        return 0.0;
    }
    let (_, elapsed, current, previous) = roll(state, now);
    let used_scaled =
        current as f64 * WINDOW_MS as f64 + previous as f64 * (WINDOW_MS - elapsed) as f64;
    used_scaled / (f64::from(limit) * WINDOW_MS as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_800_000_000_000; // a window boundary (divisible by 60 000)

    fn run(state: &mut WindowState, now: Millis, limit: u32, cost: u32) -> Admission {
        let a = admit(*state, now, limit, cost);
        *state = a.state;
        a
    }

    #[test]
    fn a_fresh_key_gets_exactly_its_limit_in_one_window() {
        let mut s = WindowState::default();
        let allowed = (0..100)
            .filter(|i| run(&mut s, T0 + i * 10, 60, 1).allowed)
            .count();
        assert_eq!(allowed, 60);
        let last = admit(s, T0 + 1_000, 60, 1);
        assert!(!last.allowed);
        assert_eq!(last.rate.remaining, 0);
        // Full window, nothing in the previous one: retry when the window rolls and the 60
        // become the previous count weighted down enough to fit one more.
        assert_eq!(last.rate.reset_after_ms, 59_000);
        assert_eq!(last.rate.retry_after_ms, Some(59_000 + 1_000));
    }

    #[test]
    fn the_previous_window_slides_out_linearly() {
        let mut s = WindowState::default();
        for i in 0..60 {
            assert!(run(&mut s, T0 + i, 60, 1).allowed);
        }
        // 15 s into the next window: previous weighs 45/60 -> 45 counted, 15 left.
        let next = T0 + WINDOW_MS + 15_000;
        let allowed = (0..30).filter(|_| run(&mut s, next, 60, 1).allowed).count();
        assert_eq!(allowed, 15);
        assert_eq!(peek(s, next, 60), (60, 0, 45_000));
        // Retry-after for one more: 60 * (45 s - t) / 60 s <= 60 - 15 - 1 = 44 -> t = 1 s.
        assert_eq!(admit(s, next, 60, 1).rate.retry_after_ms, Some(1_000));
        assert!(!admit(s, next + 999, 60, 1).allowed);
        assert!(admit(s, next + 1_000, 60, 1).allowed);
    }

    #[test]
    fn rejected_requests_consume_nothing_and_cost_is_honoured() {
        let mut s = WindowState::default();
        assert!(run(&mut s, T0, 10, 7).allowed);
        let rejected = run(&mut s, T0 + 1, 10, 4);
        assert!(!rejected.allowed);
        assert_eq!(rejected.state.current, 7);
        assert!(run(&mut s, T0 + 2, 10, 3).allowed);
        assert_eq!(s.current, 10);
        let too_big = admit(WindowState::default(), T0, 10, 11);
        assert!(!too_big.allowed);
        assert_eq!(too_big.rate.retry_after_ms, None);
    }

    #[test]
    fn idle_keys_start_over_and_clock_lag_is_conservative() {
        let busy = WindowState {
            window: T0 / WINDOW_MS,
            current: 60,
            previous: 0,
        };
        assert!(admit(busy, T0 + 2 * WINDOW_MS, 60, 1).allowed);
        // A replica whose clock is behind sees the newer window as current, full weight.
        let ahead = WindowState {
            window: T0 / WINDOW_MS + 1,
            current: 10,
            previous: 60,
        };
        let lagging = admit(ahead, T0 + WINDOW_MS - 5, 60, 1);
        assert!(!lagging.allowed);
        assert_eq!(lagging.state, ahead);
    }

    #[test]
    fn retry_after_is_exact() {
        // Property check over many states: waiting retry_after admits, waiting 1 ms less does not.
        let mut checked = 0;
        for previous in [0u64, 1, 7, 30, 60] {
            for current in [0u64, 1, 30, 59, 60] {
                for elapsed in [0, 1, 17_000, 59_999] {
                    for cost in [1u32, 5] {
                        let s = WindowState {
                            window: T0 / WINDOW_MS,
                            current,
                            previous,
                        };
                        let now = T0 + elapsed;
                        let a = admit(s, now, 60, cost);
                        if a.allowed {
                            continue;
                        }
                        let Some(retry) = a.rate.retry_after_ms else {
                            continue;
                        };
                        assert!(
                            admit(s, now + retry, 60, cost).allowed,
                            "{s:?} +{elapsed} retry {retry}"
                        );
                        if retry > 0 {
                            assert!(
                                !admit(s, now + retry - 1, 60, cost).allowed,
                                "{s:?} +{elapsed} retry {retry}"
                            );
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 20);
    }
}
