//! `--stats` and `--stats-json`: the GPU's counters (whatever (name, value)
//! pairs the device's `counters().named()` returns), the guest driver's
//! statistics per test and summed (its `stats` console lines, read by
//! `results`; `run` only) and the process's own, written at exit on every
//! exit path of `run` and `serve`.

use std::io::Write;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::output;
use crate::results::{GuestStats, TestStats};

/// Lines of guest statistics `--stats` prints at most (the driver's own
/// make about 60).
const MAX_GUEST_LINES: usize = 256;

/// Where the counters go at exit.
pub struct Out {
    print: bool,
    /// Created (truncated) before anything runs, so a bad path fails fast.
    json: Option<(PathBuf, std::fs::File)>,
    /// The GPU's fault-injection spec (`--gpu-inject`), canonical form.
    gpu_inject: Option<String>,
}

/// Creates (or truncates) an output file the VMM writes at exit. With
/// O_NONBLOCK, a FIFO nobody reads is an error now, not a hang.
pub fn open_output(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

impl Out {
    pub fn open(print: bool, json: Option<PathBuf>) -> Result<Self> {
        let json = match json {
            Some(path) => match open_output(&path) {
                Ok(f) => Some((path, f)),
                Err(source) => return Err(Error::StatsWrite { path, source }),
            },
            None => None,
        };
        Ok(Self {
            print,
            json,
            gpu_inject: None,
        })
    }

    /// Report the GPU's fault-injection spec with the counters (a line in
    /// `--stats`, `"gpu_inject"` in `--stats-json`, null without one).
    pub fn gpu_inject(mut self, spec: Option<String>) -> Self {
        self.gpu_inject = spec;
        self
    }

    /// `counters`: None without a GPU (`run --no-gpu`, or a run that
    /// failed before its GPU reported).
    pub fn write(self, counters: Option<&[(String, u64)]>) -> Result<()> {
        let process = process();
        let guest = crate::results::guest();
        if self.print {
            match counters {
                None => output::line(
                    "no GPU counters (no GPU attached, or the VMM stopped before it reported)",
                ),
                Some(c) => {
                    if let Some(spec) = &self.gpu_inject {
                        output::line(&format!("GPU fault injection: {spec}"));
                    }
                    output::line("GPU counters:");
                    // One column for the values however long the names
                    // (inject.spec.* run past 24).
                    let w = c.iter().map(|(n, _)| n.len()).max().unwrap_or(0).max(24);
                    for (name, v) in c {
                        output::text(&format!("  {name:<w$} {v}"));
                    }
                }
            }
            if let Some(g) = guest.as_ref().filter(|g| !g.tests.is_empty()) {
                output::line(&format!(
                    "guest driver, {} test(s) (latencies: count total_us max_us):",
                    g.tests.len()
                ));
                for line in guest_lines(g) {
                    output::text(&line);
                }
            }
            output::line("process:");
            for (name, v) in &process {
                output::text(&format!("  {name:<24} {v}"));
            }
        }
        if let Some((path, mut file)) = self.json {
            let pairs = |c: &[(String, u64)]| {
                c.iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::from(*v)))
                    .collect::<serde_json::Map<_, _>>()
            };
            let process: Vec<(String, u64)> = process
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            let doc = serde_json::json!({
                "gpu": counters.map(pairs),
                "gpu_inject": self.gpu_inject,
                "guest": guest.as_ref().map(guest_json),
                "process": pairs(&process),
            });
            let text = serde_json::to_string_pretty(&doc).expect("a JSON value always serialises");
            writeln!(file, "{text}").map_err(|source| Error::StatsWrite { path, source })?;
        }
        Ok(())
    }
}

/// The `--stats` lines of the guest's summed statistics. The names are the
/// guest's: at most `MAX_GUEST_LINES` of them, then one line counting the
/// rest (`--stats-json` has them all).
fn guest_lines(g: &GuestStats) -> Vec<String> {
    let all = g.total.counters.len() + g.total.latency.len();
    let mut lines: Vec<String> =
        g.total
            .counters
            .iter()
            .map(|(name, v)| format!("  {name:<24} {v}"))
            .chain(
                g.total.latency.iter().map(|(name, l)| {
                    format!("  {name:<24} {} {} {}", l.count, l.total_us, l.max_us)
                }),
            )
            .take(MAX_GUEST_LINES)
            .collect();
    if all > MAX_GUEST_LINES {
        lines.push(format!(
            "  ... {} more guest statistics (--stats-json has them all)",
            all - MAX_GUEST_LINES
        ));
    }
    lines
}

/// `"guest"` of `--stats-json`: `{"tests": {"<test>": {"policy": ...,
/// "counters": {...}, "latency": {"<cell>": {"count", "total_us",
/// "max_us"}}}}, "total": {"counters": ..., "latency": ...}}`.
fn guest_json(g: &GuestStats) -> serde_json::Value {
    let one = |s: &TestStats| {
        let latency: serde_json::Map<_, _> = s
            .latency
            .iter()
            .map(|(k, l)| {
                let v = serde_json::json!({
                    "count": l.count,
                    "total_us": l.total_us,
                    "max_us": l.max_us,
                });
                (k.clone(), v)
            })
            .collect();
        let mut o = serde_json::json!({ "counters": s.counters, "latency": latency });
        if let Some(p) = &s.policy {
            o["policy"] = p.as_str().into();
        }
        o
    };
    let tests: serde_json::Map<_, _> = g.tests.iter().map(|(n, s)| (n.clone(), one(s))).collect();
    serde_json::json!({ "tests": tests, "total": one(&g.total) })
}

/// The process's own counters: peak resident memory (the kernel's
/// high-water mark, `ru_maxrss`), CPU time, and what the output streams
/// dropped (`output`) or refused (the line console).
pub fn process() -> Vec<(&'static str, u64)> {
    // SAFETY: getrusage fills the struct we pass; zeroed is a valid value.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    let (console, log) = output::dropped();
    vec![
        ("peak_rss_kib", ru.ru_maxrss.max(0) as u64),
        ("user_cpu_ms", ms(ru.ru_utime)),
        ("system_cpu_ms", ms(ru.ru_stime)),
        ("log_records_dropped", log.items),
        ("console_bytes_dropped", console.bytes),
        (
            "console_writes_rejected",
            crate::devices::linecon::rejected(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::Latency;

    /// A guest that names thousands of statistics gets a bounded
    /// `--stats` print, the rest counted.
    #[test]
    fn guest_lines_are_bounded() {
        let mut g = GuestStats::default();
        g.total.counters = (0..1000).map(|i| (format!("c{i}"), i)).collect();
        g.total.latency = (0..10)
            .map(|i| (format!("l{i}"), Latency::default()))
            .collect();
        let lines = guest_lines(&g);
        assert_eq!(lines.len(), MAX_GUEST_LINES + 1);
        assert_eq!(
            lines.last().map(String::as_str),
            Some("  ... 754 more guest statistics (--stats-json has them all)")
        );
        g.total.counters.clear();
        assert_eq!(guest_lines(&g).len(), 10, "a small set is printed whole");
    }

    #[test]
    fn guest_json_has_tests_and_total_cells_by_name() {
        let t = TestStats {
            policy: Some("batch:8,replay=once".into()),
            counters: [("windows".to_string(), 2)].into(),
            latency: [(
                "window.64k".to_string(),
                Latency {
                    count: 2,
                    total_us: 30,
                    max_us: 20,
                },
            )]
            .into(),
        };
        let g = GuestStats {
            tests: vec![("a".into(), t.clone())],
            total: TestStats { policy: None, ..t },
        };
        let v = guest_json(&g);
        let a = &v["tests"]["a"];
        assert_eq!(a["policy"], "batch:8,replay=once", "{v}");
        assert_eq!(a["counters"]["windows"], 2, "{v}");
        assert_eq!(
            a["latency"]["window.64k"],
            serde_json::json!({"count": 2, "total_us": 30, "max_us": 20}),
            "{v}"
        );
        assert!(v["total"].get("policy").is_none(), "{v}");
        assert_eq!(v["total"]["latency"], a["latency"], "{v}");
    }
}
