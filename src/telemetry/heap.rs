//! jemalloc: allocator statistics for `/metrics`, and heap profiles in pprof format for `/debug/pprof/heap`.
//!
//! The daemon binary installs jemalloc as its global allocator and bakes in `malloc_conf` with
//! `prof:true,prof_active:true,lg_prof_sample:19`: jemalloc then records a stack trace for one allocation per
//! 512 KiB allocated on average, and a profile is a dump of the sampled allocations still live, scaled up by
//! the sampling rate. Sampling can be paused and resumed at runtime (`prof.active`); it cannot be *enabled* at
//! runtime when the process started with `prof:false`, because jemalloc only sets up its profiling machinery at
//! start.
//!
//! The library is also linked into programs that do not use jemalloc as their global allocator (the unit tests,
//! tools). jemalloc is still linked in there and answers `mallctl`, but it only sees its own bookkeeping, so
//! [`jemalloc_is_global_allocator`] checks which allocator Rust actually uses and everything here reports
//! "unavailable" rather than serving misleading numbers.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use tikv_jemalloc_ctl::{epoch, profiling, raw, stats, thread};

use super::metrics::{MetricKind, Registry};

/// The jemalloc options that enable heap profiling, quoted in error messages for operators.
const MALLOC_CONF_HINT: &str = "prof:true,prof_active:true,lg_prof_sample:19";

#[derive(Debug, Clone, thiserror::Error)]
pub enum HeapProfileError {
    #[error(
        "heap profiling is unavailable: jemalloc is not this program's global allocator, so it sees none of \
         the heap. The remote-network daemon sets it in main.rs (`#[global_allocator] static ALLOC: \
         tikv_jemallocator::Jemalloc`); other programs linking the library (tests, tools) have no heap profile"
    )]
    NotGlobalAllocator,
    #[error(
        "heap profiling is unavailable: jemalloc was built without profiling support (enable the `profiling` \
         feature of tikv-jemallocator and rebuild)"
    )]
    NotCompiledIn,
    #[error(
        "heap profiling is unavailable: jemalloc started with profiling disabled (opt.prof is false), and it \
         cannot be enabled in a running process. Restart with the environment variable \
         _RJEM_MALLOC_CONF={MALLOC_CONF_HINT} (or restore the binary's built-in malloc_conf)"
    )]
    DisabledAtStart,
    #[error(
        "heap profiling is paused, so there are no samples to report. Resume it with `curl -X POST \
         http://<monitoring address>/debug/pprof/heap/activate`, let the workload of interest run, then fetch \
         the profile again"
    )]
    Paused,
    #[error("another heap profile is being generated; retry in a few seconds")]
    Busy,
    #[error("generating the heap profile failed: {0}")]
    Dump(String),
    #[error("cannot switch heap sampling (jemalloc prof.active): {0}")]
    Switch(String),
}

/// Whether Rust's global allocator is jemalloc, determined once per process.
///
/// Allocates 64 KiB through the global allocator and watches jemalloc's per-thread "bytes ever allocated"
/// counter: it moves only if the allocation went through jemalloc. This needs jemalloc's statistics, which are
/// compiled in by the `stats` feature; without them the answer is `false`, which only hides features.
pub fn jemalloc_is_global_allocator() -> bool {
    static IS_GLOBAL: OnceLock<bool> = OnceLock::new();
    *IS_GLOBAL.get_or_init(|| {
        const PROBE: usize = 64 * 1024;
        let Ok(allocated) = thread::allocatedp::read() else {
            return false;
        };
        let before = allocated.get();
        let probe: Vec<u8> = std::hint::black_box(Vec::with_capacity(PROBE));
        let after = allocated.get();
        drop(probe);
        after.wrapping_sub(before) >= PROBE as u64
    })
}

/// Why a heap profile cannot be served at all (as opposed to "paused" or "busy"); `None` when profiling is
/// set up.
fn unavailable() -> Option<HeapProfileError> {
    if !jemalloc_is_global_allocator() {
        return Some(HeapProfileError::NotGlobalAllocator);
    }
    match profiling::prof::read() {
        Ok(true) => None,
        Ok(false) => Some(HeapProfileError::DisabledAtStart),
        // jemalloc answers ENOENT for `opt.prof` when built without profiling.
        Err(_) => Some(HeapProfileError::NotCompiledIn),
    }
}

/// The state of heap profiling, for the index page and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeapProfiling {
    /// Profiles cannot be produced; the text says why and what to do.
    Unavailable(String),
    Paused,
    /// Sampling one allocation per `2^lg_sample` bytes on average.
    Active {
        lg_sample: u32,
    },
}

/// The current heap profiling state.
pub fn heap_profiling() -> HeapProfiling {
    if let Some(why) = unavailable() {
        return HeapProfiling::Unavailable(why.to_string());
    }
    // SAFETY: "prof.active" is documented (jemalloc(3)) as a readable bool; it exists because opt.prof is true.
    match unsafe { raw::read::<bool>(b"prof.active\0") } {
        Ok(true) => {
            // SAFETY: "prof.lg_sample" is documented as a readable size_t.
            let lg = unsafe { raw::read::<libc::size_t>(b"prof.lg_sample\0") };
            HeapProfiling::Active { lg_sample: lg.ok().and_then(|lg| u32::try_from(lg).ok()).unwrap_or(0) }
        }
        Ok(false) => HeapProfiling::Paused,
        Err(e) => HeapProfiling::Unavailable(format!("cannot read jemalloc's prof.active: {e}")),
    }
}

/// Resumes (`true`) or pauses (`false`) heap sampling. Pausing discards the samples taken so far
/// (`prof.reset`), so a later profile only covers allocations made after sampling resumed.
pub async fn set_heap_profiling(active: bool) -> Result<(), HeapProfileError> {
    if let Some(why) = unavailable() {
        return Err(why);
    }
    let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
        return Err(HeapProfileError::DisabledAtStart);
    };
    // Waits for a dump in progress, which holds the same lock.
    let mut ctl = ctl.lock().await;
    let result = match (active, ctl.activated()) {
        (true, false) => ctl.activate(),
        (false, true) => ctl.deactivate(),
        // Already in the asked state: nothing to do, and no samples discarded by a needless reset.
        _ => return Ok(()),
    };
    result.map_err(|e| HeapProfileError::Switch(e.to_string()))?;
    tracing::info!(active, "jemalloc heap sampling switched");
    Ok(())
}

/// Allows one profile dump at a time, process-wide: a dump walks every sampled allocation, writes a file and
/// parses it back, which on a large heap takes a while and allocates itself; queueing them up helps nobody.
#[derive(Debug, Default)]
pub struct DumpGate {
    busy: AtomicBool,
}

/// Held while a dump runs; reopens the gate when dropped (also when the dump panics).
#[derive(Debug)]
pub struct DumpPermit<'a>(&'a AtomicBool);

impl Drop for DumpPermit<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl DumpGate {
    pub const fn new() -> Self {
        Self { busy: AtomicBool::new(false) }
    }

    /// A permit, or `None` while another dump holds one.
    pub fn try_acquire(&self) -> Option<DumpPermit<'_>> {
        self.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then_some(DumpPermit(&self.busy))
    }
}

static DUMP_GATE: DumpGate = DumpGate::new();

/// Dumps the sampled live heap as a gzipped pprof `Profile` (sample types `inuse_space`/`space`, in bytes;
/// addresses are not symbolised: `go tool pprof` does that with the binary). The blocking part (jemalloc
/// writes the profile to a temporary file, which is parsed and converted) runs on the blocking pool. A second
/// call while one runs gets [`HeapProfileError::Busy`] instead of queueing.
pub async fn heap_profile_pprof() -> Result<Vec<u8>, HeapProfileError> {
    if let Some(why) = unavailable() {
        return Err(why);
    }
    let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
        return Err(HeapProfileError::DisabledAtStart);
    };
    let permit = DUMP_GATE.try_acquire().ok_or(HeapProfileError::Busy)?;
    // An owned guard moves into the blocking task; the lock also keeps pause/resume out while dumping.
    let mut ctl = ctl.clone().lock_owned().await;
    if !ctl.activated() {
        return Err(HeapProfileError::Paused);
    }
    // The permit moves along too: if the client goes away, the dump still runs to its end on the blocking
    // pool, and the gate stays closed until it has.
    let dump = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        ctl.dump_pprof()
    })
    .await;
    match dump {
        Ok(Ok(pprof)) => Ok(pprof),
        // The dump goes through a temporary file; a read-only or full TMPDIR surfaces here.
        Ok(Err(e)) => Err(HeapProfileError::Dump(format!(
            "{e:#} (jemalloc writes the dump to a temporary file in TMPDIR)"
        ))),
        Err(e) => Err(HeapProfileError::Dump(format!("the dump task failed: {e}"))),
    }
}

/// jemalloc's own statistics, refreshed once per scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocatorStats {
    pub allocated: u64,
    pub active: u64,
    pub metadata: u64,
    pub resident: u64,
    pub mapped: u64,
    pub retained: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AllocatorStatsError {
    #[error("jemalloc is not the global allocator; its statistics would not describe this process' heap")]
    NotGlobalAllocator,
    #[error("cannot read jemalloc statistics: {0}")]
    Ctl(#[from] tikv_jemalloc_ctl::Error),
}

impl AllocatorStats {
    pub fn read() -> Result<Self, AllocatorStatsError> {
        if !jemalloc_is_global_allocator() {
            return Err(AllocatorStatsError::NotGlobalAllocator);
        }
        // jemalloc caches its statistics; advancing the epoch refreshes them.
        epoch::advance()?;
        let read = |v: usize| v as u64;
        Ok(Self {
            allocated: read(stats::allocated::read()?),
            active: read(stats::active::read()?),
            metadata: read(stats::metadata::read()?),
            resident: read(stats::resident::read()?),
            mapped: read(stats::mapped::read()?),
            retained: read(stats::retained::read()?),
        })
    }
}

/// Reads one family's value from the per-scrape snapshot.
type AllocatorField = fn(&AllocatorStats) -> u64;

/// Registers `rn_heap_profiling_active` and, when jemalloc is the global allocator, the `jemalloc_*_bytes`
/// families (otherwise they would describe jemalloc's own bookkeeping, not this process' heap).
pub fn register_allocator_metrics(registry: &Registry) {
    registry.register_value(
        "rn_heap_profiling_active",
        "1 while jemalloc heap sampling is active (profiles can be fetched from /debug/pprof/heap), else 0.",
        MetricKind::Gauge,
        || matches!(heap_profiling(), HeapProfiling::Active { .. }),
    );
    if !jemalloc_is_global_allocator() {
        return;
    }
    let stats = registry.snapshot("jemalloc stats", || async { AllocatorStats::read() });
    let families: [(&str, &str, AllocatorField); 6] = [
        ("jemalloc_allocated_bytes", "Bytes allocated by the application (jemalloc stats.allocated).", |s| {
            s.allocated
        }),
        (
            "jemalloc_active_bytes",
            "Bytes in active pages allocated by the application (stats.active).",
            |s| s.active,
        ),
        ("jemalloc_metadata_bytes", "Bytes dedicated to jemalloc metadata (stats.metadata).", |s| s.metadata),
        (
            "jemalloc_resident_bytes",
            "Bytes in physically resident data pages mapped by jemalloc (stats.resident).",
            |s| s.resident,
        ),
        ("jemalloc_mapped_bytes", "Bytes in active extents mapped by jemalloc (stats.mapped).", |s| s.mapped),
        (
            "jemalloc_retained_bytes",
            "Bytes in virtual memory mappings retained by jemalloc for reuse (stats.retained).",
            |s| s.retained,
        ),
    ];
    for (name, help, field) in families {
        registry.register_from(name, help, MetricKind::Gauge, &stats, field);
    }
}
