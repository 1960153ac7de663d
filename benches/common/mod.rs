//! What every bench shares: quick mode, criterion settings, and the "own timing loop" whose
//! medians feed the ratio tables printed after each group.
//!
//! Every measured routine goes through [`Recorder::bench`] / [`Recorder::bench_custom`]: criterion
//! drives the iteration counts and prints its own statistics, and the same timings are kept here
//! (one value per criterion sample: the sample's mean time per iteration). The ratio tables use
//! the **median of the last `sample_size` values**, i.e. of the measurement samples, not of the
//! warm-up calls. Nothing else is timed, so criterion's figures and the tables come from the same
//! runs.
#![allow(dead_code)] // each bench binary uses a different part

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};

/// Quick mode: `VMBSRV_BENCH_QUICK=1`, `cargo bench -- --quick`, or a test-mode run
/// (`cargo test --benches`, where cargo does not pass `--bench`). Smaller samples, shorter
/// measurement, and the largest whole-channel point is dropped.
pub(crate) fn quick() -> bool {
    let env = std::env::var("VMBSRV_BENCH_QUICK").is_ok_and(|v| v != "0" && !v.is_empty());
    let args: Vec<String> = std::env::args().collect();
    env || args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench")
}

/// What the machine line calls this run. Without `--bench` (`cargo test --benches`) criterion
/// runs each routine once, unoptimized: the tables are then printed but mean nothing.
fn mode() -> &'static str {
    if !std::env::args().any(|a| a == "--bench") {
        "test (one iteration each: figures meaningless)"
    } else if quick() {
        "quick"
    } else {
        "full"
    }
}

/// The criterion configuration of every group, from the command line, adjusted for quick mode.
pub(crate) fn criterion() -> Criterion {
    let base = Criterion::default().configure_from_args();
    if quick() {
        base.sample_size(10)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300))
            // Criterion's bootstrap (100,000 resamples, single-threaded without rayon) costs
            // more than the measurement itself at this sample size.
            .nresamples(2_000)
    } else {
        base.sample_size(50)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
    }
}

/// Sample size in force for micro benches (must match [`criterion`]).
pub(crate) fn sample_size() -> usize {
    if quick() { 10 } else { 50 }
}

/// Per-id list of sample means (ns per iteration), in the order criterion produced them.
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    samples: Rc<RefCell<BTreeMap<String, Vec<f64>>>>,
    /// Measurement samples per id (criterion calls the routine this many times after warm-up).
    keep: Rc<RefCell<BTreeMap<String, usize>>>,
}

impl Recorder {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn push(&self, id: &str, ns_per_iter: f64) {
        self.samples
            .borrow_mut()
            .entry(id.to_owned())
            .or_default()
            .push(ns_per_iter);
    }

    /// Times `routine` in a plain loop of criterion's iteration count.
    pub(crate) fn bench<O>(
        &self,
        group: &mut BenchmarkGroup<'_, WallTime>,
        id: &str,
        mut routine: impl FnMut() -> O,
    ) {
        self.keep.borrow_mut().insert(id.to_owned(), sample_size());
        let this = self.clone();
        group.bench_function(id, move |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(routine());
                }
                let elapsed = start.elapsed();
                this.push(id, elapsed.as_nanos() as f64 / iters as f64);
                elapsed
            })
        });
    }

    /// Like [`bench`](Self::bench), but `routine(iters)` does its own setup and returns only the
    /// time of the measured part of `iters` iterations. `samples` is the group's sample size.
    pub(crate) fn bench_custom(
        &self,
        group: &mut BenchmarkGroup<'_, WallTime>,
        id: &str,
        samples: usize,
        mut routine: impl FnMut(u64) -> Duration,
    ) {
        self.keep.borrow_mut().insert(id.to_owned(), samples);
        let this = self.clone();
        group.bench_function(id, move |b| {
            b.iter_custom(|iters| {
                let elapsed = routine(iters);
                this.push(id, elapsed.as_nanos() as f64 / iters as f64);
                elapsed
            })
        });
    }

    /// Median ns per iteration over the measurement samples of `id`, if it ran.
    pub(crate) fn median(&self, id: &str) -> Option<f64> {
        let samples = self.samples.borrow();
        let all = samples.get(id)?;
        let keep = self.keep.borrow().get(id).copied().unwrap_or(all.len());
        let mut last: Vec<f64> = all[all.len().saturating_sub(keep)..].to_vec();
        median(&mut last)
    }
}

/// Median of `values` (mean of the middle two for an even count).
pub(crate) fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// `a / b` formatted as a ratio, or `-` when either side did not run.
pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".to_owned(),
    }
}

/// A nanosecond figure, or `-`.
pub(crate) fn ns(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// Prints the machine line every table starts with.
pub(crate) fn print_machine_line(title: &str) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "== {title} == (CPU: {cpu}, {cores} cores, hardware CRC32C: {}, mode: {})",
        vmbsrv::hwcrc::available(),
        mode()
    );
}
