//! The metrics recorder does not hold on to histogram samples when nobody scrapes `/metrics`.
//!
//! Every request records a histogram sample or two (its duration; on Redis also the store
//! call's). The recorder keeps samples in a list until upkeep folds them into buckets; without
//! upkeep, a service that nobody scraped grew by ~20 bytes of memory per request for ever. This binary counts the bytes it has allocated and not freed
//! (its own global allocator), records as many samples as ~1 million requests would, and
//! checks the memory is given back by the upkeep that `telemetry::metrics()` starts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

/// The system allocator, counting live bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn unscraped_histogram_samples_are_folded_away_and_their_memory_freed() {
    sendable_keys::telemetry::metrics().expect("the recorder installs");
    let histogram = metrics::histogram!("sendable_keys_test_upkeep_seconds");
    let before = LIVE.load(Ordering::Relaxed);
    let started = Instant::now();
    for i in 0..2_000_000u32 {
        histogram.record(f64::from(i % 1000) / 1e6);
    }
    let holding = LIVE.load(Ordering::Relaxed) - before;
    // The premise: the samples really are held until upkeep (8 bytes each, plus list blocks).
    // Checked only if recording was quick enough for no upkeep to have run in between.
    if started.elapsed() < sendable_keys::telemetry::METRICS_UPKEEP_INTERVAL / 2 {
        assert!(
            holding > 12_000_000,
            "2M samples should be held until upkeep, but only {holding} bytes are"
        );
    }

    // Upkeep runs every second; give it a generous bound on a loaded machine. Recording a
    // sample now and then is what a live service does anyway, and it is what lets the lock-free
    // list's deferred frees run.
    let deadline = Instant::now()
        + sendable_keys::telemetry::METRICS_UPKEEP_INTERVAL * 10
        + Duration::from_secs(5);
    loop {
        histogram.record(0.000_1);
        let held = LIVE.load(Ordering::Relaxed) - before;
        if held < 2_000_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{held} bytes of histogram samples are still held long after upkeep should have run"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // Folded, not dropped: the samples are all in the rendered histogram.
    let handle = sendable_keys::telemetry::metrics().expect("the same recorder");
    let text = handle.render();
    let count = text
        .lines()
        .find_map(|l| l.strip_prefix("sendable_keys_test_upkeep_seconds_count "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("the histogram's count is rendered");
    assert!(count >= 2_000_000, "rendered count {count}");
}
