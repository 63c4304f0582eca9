//! Process metrics read from `/proc/self` at scrape time, under the names every Prometheus client library uses
//! (`process_resident_memory_bytes`, `process_cpu_seconds_total`, ...), so stock dashboards and alerts work.
//!
//! `/proc/self/stat` is read once per scrape into a [`Snapshot`] and every family reads from it, so the values
//! are mutually consistent and the file is not re-read per family. On systems without `/proc` the families are
//! rendered without samples.

use std::sync::Arc;

use super::metrics::{MetricKind, Registry, SampleValue, Snapshot};

/// The fields of `/proc/self/stat` (and friends) that the metrics use, converted to base units.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub threads: u64,
    /// Unix time in seconds.
    pub start_time_seconds: f64,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessStatsError {
    #[error("cannot read {path}: {source}")]
    Read { path: &'static str, source: std::io::Error },
    #[error("unexpected format of {path}: {what}")]
    Format { path: &'static str, what: &'static str },
}

impl ProcessStats {
    /// Reads the current process' statistics.
    pub fn read() -> Result<Self, ProcessStatsError> {
        let stat = read_proc("/proc/self/stat")?;
        let proc_stat = read_proc("/proc/stat")?;
        let boot_time = boot_time_seconds(&proc_stat)?;
        let fields = StatFields::parse(&stat)?;
        let ticks = clock_ticks_per_second();
        let open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|dir| dir.count() as u64);
        // Reading the directory held one descriptor of its own open; it is closed again, so do not count it.
        let open_fds = open_fds.map(|n| n.saturating_sub(1));
        let max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|l| max_open_files(&l));
        Ok(Self {
            cpu_seconds: (fields.utime + fields.stime) as f64 / ticks,
            resident_memory_bytes: fields.rss_pages.saturating_mul(page_size()),
            virtual_memory_bytes: fields.vsize,
            threads: fields.threads,
            start_time_seconds: boot_time as f64 + fields.starttime as f64 / ticks,
            open_fds,
            max_fds,
        })
    }
}

/// Reads one family's value from the per-scrape snapshot (`None`: not available on this system).
type ProcessField = fn(&ProcessStats) -> Option<SampleValue>;

/// Registers `process_*` families fed by one `/proc` read per scrape.
pub fn register_process_metrics(registry: &Registry) {
    let stats: Arc<Snapshot<ProcessStats>> =
        registry.snapshot("process stats", || async { ProcessStats::read() });
    let families: [(&str, &str, MetricKind, ProcessField); 7] = [
        (
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            MetricKind::Counter,
            |s| Some(s.cpu_seconds.into()),
        ),
        ("process_resident_memory_bytes", "Resident memory size in bytes.", MetricKind::Gauge, |s| {
            Some(s.resident_memory_bytes.into())
        }),
        ("process_virtual_memory_bytes", "Virtual memory size in bytes.", MetricKind::Gauge, |s| {
            Some(s.virtual_memory_bytes.into())
        }),
        ("process_threads", "Number of OS threads in the process.", MetricKind::Gauge, |s| {
            Some(s.threads.into())
        }),
        (
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            MetricKind::Gauge,
            |s| Some(s.start_time_seconds.into()),
        ),
        ("process_open_fds", "Number of open file descriptors.", MetricKind::Gauge, |s| {
            s.open_fds.map(Into::into)
        }),
        ("process_max_fds", "Maximum number of open file descriptors.", MetricKind::Gauge, |s| {
            s.max_fds.map(Into::into)
        }),
    ];
    // Tasks alive in the runtime serving the scrape (the daemon has one): a count that only grows under steady
    // churn is a leaked task, which holds whatever it captured.
    registry.register(
        "rn_runtime_alive_tasks",
        "Tasks alive in the daemon's async runtime.",
        MetricKind::Gauge,
        Box::new(|w| {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                w.value(runtime.metrics().num_alive_tasks());
            }
        }),
    );
    for (name, help, kind, field) in families {
        // A field that is `None` (no such limit, no /proc/self/fd) leaves the family without a sample.
        registry.register(
            name,
            help,
            kind,
            Box::new({
                let stats = stats.clone();
                move |w| {
                    if let Some(value) = stats.get().as_deref().and_then(field) {
                        w.value(value);
                    }
                }
            }),
        );
    }
}

fn read_proc(path: &'static str) -> Result<String, ProcessStatsError> {
    std::fs::read_to_string(path).map_err(|source| ProcessStatsError::Read { path, source })
}

struct StatFields {
    utime: u64,
    stime: u64,
    threads: u64,
    starttime: u64,
    vsize: u64,
    rss_pages: u64,
}

impl StatFields {
    /// Parses `/proc/self/stat` (see proc(5)). The second field, the command name, is in parentheses and may
    /// itself contain spaces and parentheses, so fields are counted from after the *last* `)`.
    fn parse(stat: &str) -> Result<Self, ProcessStatsError> {
        const PATH: &str = "/proc/self/stat";
        let after_comm = stat
            .rfind(')')
            .map(|i| &stat[i + 1..])
            .ok_or(ProcessStatsError::Format { path: PATH, what: "no `)` after the command name" })?;
        // After the command come field 3 (state) onwards, so field N (1-based, as in proc(5)) is at N - 3.
        let fields: Vec<&str> = after_comm.split_ascii_whitespace().collect();
        let field = |n: usize, what: &'static str| -> Result<u64, ProcessStatsError> {
            fields
                .get(n - 3)
                .and_then(|f| f.parse().ok())
                .ok_or(ProcessStatsError::Format { path: PATH, what })
        };
        Ok(Self {
            utime: field(14, "utime")?,
            stime: field(15, "stime")?,
            threads: field(20, "num_threads")?,
            starttime: field(22, "starttime")?,
            vsize: field(23, "vsize")?,
            rss_pages: field(24, "rss")?,
        })
    }
}

fn boot_time_seconds(proc_stat: &str) -> Result<u64, ProcessStatsError> {
    proc_stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or(ProcessStatsError::Format { path: "/proc/stat", what: "no btime line" })
}

/// The soft limit from the "Max open files" line of `/proc/self/limits`; `None` when unlimited.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_ascii_whitespace().next()?.parse().ok()
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for unknown names, handled below.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    // 100 is what Linux reports on every mainstream architecture; only used if sysconf fails.
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn page_size() -> u64 {
    // SAFETY: as above.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_command_name() {
        // Field 2 contains spaces and a `)`; fields 3.. follow proc(5)'s layout.
        let stat = "1234 (rn) worker) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 5000 \
                    123456789 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let f = StatFields::parse(stat).expect("parses");
        assert_eq!(
            (f.utime, f.stime, f.threads, f.starttime, f.vsize, f.rss_pages),
            (250, 50, 7, 5000, 123456789, 2048)
        );
    }

    #[test]
    fn reads_limits_and_boot_time() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024));
        assert_eq!(max_open_files("Max open files  unlimited  unlimited  files\n"), None);
        assert_eq!(boot_time_seconds("cpu 1 2 3\nbtime 1700000000\n").ok(), Some(1_700_000_000));
    }

    #[test]
    fn reads_own_process() {
        let s = ProcessStats::read().expect("/proc is mounted on Linux test machines");
        assert!(s.resident_memory_bytes > 0 && s.virtual_memory_bytes >= s.resident_memory_bytes);
        assert!(s.threads >= 1);
        assert!(s.open_fds.is_some_and(|n| n >= 3), "stdin, stdout, stderr at least: {:?}", s.open_fds);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64());
        let now = now.expect("clock after 1970");
        assert!(s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86_400.0 * 365.0);
    }
}
