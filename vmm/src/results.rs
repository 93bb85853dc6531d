//! `faultline run --results PATH`: the guest's test lines as JUnit XML, for
//! CI systems that show test results.
//!
//! The firmware's runner prints one line per test when it ends
//! (`test <name> ... ok`, `... SKIPPED: <why>`, `... FAILED: <why>`;
//! firmware/src/tests/mod.rs). The console tap sees every byte the guest
//! writes, so it is hostile input: a line longer than `MAX_LINE` is cut
//! there, at most `MAX_CASES` test cases and `MAX_TEXT` bytes of names and
//! messages are kept (the rest counted) and every name and message is
//! escaped before it reaches the XML.
//!
//! A test's time is the host time since the previous result line (or since
//! the guest started): the runner prints nothing between tests, so that is
//! the test's run plus the runner's few instructions around it.
//!
//! A run that ends badly without the guest reporting a failed test (a
//! crash, a timeout, a signal, a VMM error) gets one extra failed case,
//! `faultline.run`, carrying the exit status and the reason: a CI reader
//! sees it as a failure, not as a shorter, green suite.
//!
//! The SVM tests print their driver's statistics just before their result
//! line, as `stats <test> policy=<policy> <name>=<value> ...` where a value
//! is a count or `<count>/<total µs>/<max µs>` (firmware/src/tests/svm.rs,
//! `faultline_driver::gpu::StatsSnapshot`). The next result line of the
//! same test takes them: they become the case's JUnit properties and, with
//! `--stats`/`--stats-json`, the `"guest"` part of the stats ([`guest`]).
//! Same rules: at most `MAX_ITEMS` items per line, names of at most
//! `MAX_NAME` bytes of `[a-z0-9_.]`, and their bytes count against
//! `MAX_TEXT`; anything else on the line is ignored.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use faultline_device::sync::lock;

/// Bytes of one console line kept for parsing; the rest of it is ignored.
pub const MAX_LINE: usize = 4096;
/// Test cases kept; later ones are counted in the suite's `dropped` property.
pub const MAX_CASES: usize = 10_000;
/// Bytes of names and messages kept over all cases (the console's own
/// backlog bound): a guest cannot make the results grow past it.
pub const MAX_TEXT: usize = 1 << 20;
/// Items of one `stats` line kept (the driver prints fewer than 40).
pub const MAX_ITEMS: usize = 64;
/// Longest item name kept.
pub const MAX_NAME: usize = 48;
/// Longest policy kept.
pub const MAX_POLICY: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Skipped(String),
    Failed(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    pub name: String,
    pub verdict: Verdict,
    pub secs: f64,
    /// The test's `stats` line, if it printed one.
    pub stats: Option<TestStats>,
}

/// One latency cell of a `stats` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    pub count: u64,
    pub total_us: u64,
    pub max_us: u64,
}

/// What a `stats` line said: the policy, the counters, the latency cells.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestStats {
    pub policy: Option<String>,
    pub counters: BTreeMap<String, u64>,
    pub latency: BTreeMap<String, Latency>,
}

impl TestStats {
    /// Bytes of text it holds (against `MAX_TEXT`).
    fn text(&self) -> usize {
        let p = self.policy.as_ref().map_or(0, String::len);
        let items = self.counters.keys().chain(self.latency.keys());
        p + items.map(|k| k.len() + 8).sum::<usize>()
    }

    /// Adds `other` in: counts and totals summed, maxima kept.
    fn add(&mut self, other: &TestStats) {
        for (k, v) in &other.counters {
            let c = self.counters.entry(k.clone()).or_default();
            *c = c.saturating_add(*v);
        }
        for (k, l) in &other.latency {
            let c = self.latency.entry(k.clone()).or_default();
            c.count = c.count.saturating_add(l.count);
            c.total_us = c.total_us.saturating_add(l.total_us);
            c.max_us = c.max_us.max(l.max_us);
        }
    }

    /// The items as (name, value) pairs: the policy, the counters, then
    /// each latency cell as `<cell>.count`, `.total_us`, `.max_us`.
    fn properties(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = Vec::new();
        if let Some(p) = &self.policy {
            v.push(("policy".into(), p.clone()));
        }
        v.extend(
            self.counters
                .iter()
                .map(|(k, n)| (k.clone(), n.to_string())),
        );
        for (k, l) in &self.latency {
            for (what, n) in [
                ("count", l.count),
                ("total_us", l.total_us),
                ("max_us", l.max_us),
            ] {
                v.push((format!("{k}.{what}"), n.to_string()));
            }
        }
        v
    }
}

/// The guest's statistics of a run, per test (in result order) and summed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    pub tests: Vec<(String, TestStats)>,
    /// Counters and cells summed over the tests (no policy).
    pub total: TestStats,
}

impl Verdict {
    fn text(&self) -> &str {
        match self {
            Verdict::Passed => "",
            Verdict::Skipped(why) | Verdict::Failed(why) => why,
        }
    }
}

/// Parses console bytes into test cases.
pub struct Collector {
    line: Vec<u8>,
    since: Instant,
    cases: Vec<Case>,
    /// Bytes of names and messages in `cases`.
    text: usize,
    dropped: u64,
    /// The last `stats` line, until its test's result line.
    pending: Option<(String, TestStats)>,
}

impl Default for Collector {
    fn default() -> Self {
        Self::new()
    }
}

impl Collector {
    pub fn new() -> Self {
        Self {
            line: Vec::new(),
            since: Instant::now(),
            cases: Vec::new(),
            text: 0,
            dropped: 0,
            pending: None,
        }
    }

    pub fn feed(&mut self, data: &[u8]) {
        for &b in data {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }

    fn end_line(&mut self) {
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        let line = line.trim_end_matches('\r');
        let Some(case) = parse(line) else {
            if let Some(stats) = parse_stats(line) {
                self.pending = Some(stats);
            }
            return;
        };
        let now = Instant::now();
        let secs = now.duration_since(self.since).as_secs_f64();
        self.since = now;
        let stats = self
            .pending
            .take()
            .filter(|(name, _)| *name == case.name)
            .map(|(_, s)| s);
        let text =
            case.name.len() + case.verdict.text().len() + stats.as_ref().map_or(0, TestStats::text);
        if self.cases.len() >= MAX_CASES || self.text + text > MAX_TEXT {
            self.dropped += 1;
            return;
        }
        self.text += text;
        self.cases.push(Case {
            secs,
            stats,
            ..case
        });
    }

    /// The statistics of the cases that had a `stats` line.
    pub fn guest_stats(&self) -> GuestStats {
        let mut g = GuestStats::default();
        for c in &self.cases {
            if let Some(s) = &c.stats {
                g.total.add(s);
                g.tests.push((c.name.clone(), s.clone()));
            }
        }
        g
    }

    #[cfg(test)]
    pub fn cases(&self) -> &[Case] {
        &self.cases
    }

    /// The JUnit XML document. `run_failure` is the exit status and reason
    /// of a run that ended badly, if it did.
    pub fn to_xml(&self, run_failure: Option<&(u8, String)>) -> String {
        let guest_failed = self
            .cases
            .iter()
            .any(|c| matches!(c.verdict, Verdict::Failed(_)));
        let run_case = run_failure
            .filter(|_| !guest_failed)
            .map(|(code, why)| Case {
                name: "faultline.run".into(),
                verdict: Verdict::Failed(format!("exit status {code}: {why}")),
                secs: 0.0,
                stats: None,
            });
        let cases: Vec<&Case> = self.cases.iter().chain(&run_case).collect();
        let failures = cases
            .iter()
            .filter(|c| matches!(c.verdict, Verdict::Failed(_)))
            .count();
        let skipped = cases
            .iter()
            .filter(|c| matches!(c.verdict, Verdict::Skipped(_)))
            .count();
        let total = cases.iter().fold(0.0, |t, c| t + c.secs);
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            x,
            "<testsuites tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{total:.3}\">",
            cases.len()
        );
        let _ = writeln!(
            x,
            "  <testsuite name=\"faultline\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" errors=\"0\" time=\"{total:.3}\">",
            cases.len()
        );
        if self.dropped > 0 {
            let _ = writeln!(
                x,
                "    <properties><property name=\"dropped\" value=\"{}\"/></properties>",
                self.dropped
            );
        }
        for c in cases {
            let _ = write!(
                x,
                "    <testcase classname=\"faultline.guest\" name=\"{}\" time=\"{:.3}\"",
                escape(&c.name),
                c.secs
            );
            let props = c.stats.as_ref().map(TestStats::properties);
            if matches!(c.verdict, Verdict::Passed) && props.is_none() {
                x.push_str("/>\n");
                continue;
            }
            x.push('>');
            if let Some(props) = props {
                x.push_str("<properties>");
                for (k, v) in props {
                    let _ = write!(
                        x,
                        "<property name=\"{}\" value=\"{}\"/>",
                        escape(&k),
                        escape(&v)
                    );
                }
                x.push_str("</properties>");
            }
            match &c.verdict {
                Verdict::Passed => {}
                Verdict::Skipped(why) => {
                    let _ = write!(x, "<skipped message=\"{}\"/>", escape(why));
                }
                Verdict::Failed(why) => {
                    let _ = write!(x, "<failure message=\"{}\"/>", escape(why));
                }
            }
            x.push_str("</testcase>\n");
        }
        x.push_str("  </testsuite>\n</testsuites>\n");
        x
    }
}

/// One result line of the firmware's runner, or `None` for any other line.
fn parse(line: &str) -> Option<Case> {
    let rest = line.strip_prefix("test ")?;
    let (name, outcome) = rest.split_once(" ... ")?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    let verdict = if outcome == "ok" {
        Verdict::Passed
    } else if let Some(why) = outcome.strip_prefix("SKIPPED: ") {
        Verdict::Skipped(why.into())
    } else if let Some(why) = outcome.strip_prefix("FAILED: ") {
        Verdict::Failed(why.into())
    } else if outcome == "FAILED" {
        Verdict::Failed(String::new())
    } else {
        return None;
    };
    Some(Case {
        name: name.into(),
        verdict,
        secs: 0.0,
        stats: None,
    })
}

/// A `stats <test> <item> ...` line: the test's name and its items, or
/// `None` for any other line. Items that are not `<name>=<count>`,
/// `<name>=<count>/<total>/<max>` or `policy=<text>` are ignored.
fn parse_stats(line: &str) -> Option<(String, TestStats)> {
    let mut words = line.strip_prefix("stats ")?.split(' ');
    let name = words
        .next()
        .filter(|n| !n.is_empty() && !n.contains(char::is_whitespace))?;
    let mut s = TestStats::default();
    for item in words.filter(|w| !w.is_empty()).take(MAX_ITEMS) {
        let Some((k, v)) = item.split_once('=') else {
            continue;
        };
        if k == "policy" {
            if v.len() <= MAX_POLICY && !v.contains(char::is_whitespace) {
                s.policy = Some(v.into());
            }
            continue;
        }
        let good_name = !k.is_empty()
            && k.len() <= MAX_NAME
            && k.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
        if !good_name {
            continue;
        }
        let n = |t: &str| t.parse::<u64>().ok();
        let parts: Vec<&str> = v.splitn(4, '/').collect();
        match parts[..] {
            [c] => {
                if let Some(c) = n(c) {
                    s.counters.insert(k.into(), c);
                }
            }
            [c, t, m] => {
                if let (Some(count), Some(total_us), Some(max_us)) = (n(c), n(t), n(m)) {
                    s.latency.insert(
                        k.into(),
                        Latency {
                            count,
                            total_us,
                            max_us,
                        },
                    );
                }
            }
            _ => {}
        }
    }
    Some((name.into(), s))
}

/// Escapes for an XML attribute; characters XML 1.0 cannot hold at all
/// (most C0 controls) become U+FFFD.
fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            '\t' => o.push_str("&#9;"),
            '\n' => o.push_str("&#10;"),
            '\r' => o.push_str("&#13;"),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

static TAP: OnceLock<Mutex<Collector>> = OnceLock::new();

/// Starts collecting the console's test lines; call before the guest runs.
pub fn enable() {
    let _ = TAP.set(Mutex::new(Collector::new()));
}

/// Console bytes, from the console's writers (a cheap check when `--results`
/// is off).
pub fn feed(data: &[u8]) {
    if let Some(t) = TAP.get() {
        lock(t).feed(data);
    }
}

/// The guest's statistics so far, or `None` when nothing collects the
/// console (`serve`, whose guest console is QEMU's).
pub fn guest() -> Option<GuestStats> {
    TAP.get().map(|t| lock(t).guest_stats())
}

/// Where the XML goes, opened (created) before the guest runs so a bad path
/// is a usage-time error, not a lost result at the end.
pub struct Out {
    path: PathBuf,
}

impl Out {
    pub fn open(path: &Path) -> Result<Self, String> {
        std::fs::File::create(path).map_err(|e| format!("--results {}: {e}", path.display()))?;
        enable();
        Ok(Self { path: path.into() })
    }

    pub fn write(&self, run_failure: Option<&(u8, String)>) -> Result<(), String> {
        let xml = match TAP.get() {
            Some(t) => lock(t).to_xml(run_failure),
            None => Collector::new().to_xml(run_failure),
        };
        std::fs::write(&self.path, xml)
            .map_err(|e| format!("--results {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(text: &[u8]) -> Collector {
        let mut c = Collector::new();
        // In pieces, the way a console delivers it.
        for piece in text.chunks(3) {
            c.feed(piece);
        }
        c
    }

    #[test]
    fn result_lines_become_cases_and_other_lines_do_not() {
        let c = collect(
            b"faultline firmware\ntest heap ... ok\ntest gpu_x ... SKIPPED: no GPU\n\
              test anon_read ... FAILED: page 3: got 0\r\ntest with space ... ok\n\
              running test foo ... ok\ntest half ...",
        );
        let names: Vec<_> = c.cases().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["heap", "gpu_x", "anon_read"]);
        assert_eq!(c.cases()[1].verdict, Verdict::Skipped("no GPU".into()));
        assert_eq!(
            c.cases()[2].verdict,
            Verdict::Failed("page 3: got 0".into())
        );
    }

    #[test]
    fn hostile_text_is_escaped_and_bounded() {
        let mut text = b"test a ... FAILED: <x y=\"1\"> & \x01\x1b[31m\n".to_vec();
        text.extend(std::iter::repeat_n(b'z', 3 * MAX_LINE));
        text.extend(b"\ntest b ... ok\n");
        let c = collect(&text);
        let xml = c.to_xml(None);
        assert!(
            xml.contains("message=\"&lt;x y=&quot;1&quot;&gt; &amp; \u{fffd}\u{fffd}[31m\""),
            "{xml}"
        );
        assert_eq!(c.cases().len(), 2, "the long line is no case and no harm");
        assert!(c.line.len() <= MAX_LINE);
    }

    #[test]
    fn cases_beyond_the_cap_are_counted_not_kept() {
        let mut c = Collector::new();
        for i in 0..MAX_CASES + 5 {
            c.feed(format!("test t{i} ... ok\n").as_bytes());
        }
        assert_eq!(c.cases().len(), MAX_CASES);
        assert!(c
            .to_xml(None)
            .contains("<property name=\"dropped\" value=\"5\"/>"));
    }

    #[test]
    fn text_beyond_the_budget_is_counted_not_kept() {
        let mut c = Collector::new();
        let why = "x".repeat(MAX_LINE - 64);
        let fits = MAX_TEXT / (why.len() + 8);
        for i in 0..fits + 3 {
            c.feed(format!("test t{i:05} ... FAILED: {why}\n").as_bytes());
        }
        assert!(c.text <= MAX_TEXT);
        assert_eq!(c.cases().len(), fits, "{} cases kept", c.cases().len());
        assert_eq!(c.dropped, 3);
    }

    #[test]
    fn a_stats_line_goes_to_its_tests_case() {
        let c = collect(
            b"stats anon_read policy=batch:8,replay=batch faults_read=8 \
              window.64k=8/78012/12041 replay=4/92/26\n[INFO ] between\n\
              test anon_read ... ok\n\
              stats other x=1\ntest heap ... ok\ntest other ... ok\n\
              stats t2 retries=2\ntest t2 ... FAILED: why\n",
        );
        let s = c.cases()[0].stats.as_ref().expect("anon_read's stats");
        assert_eq!(s.policy.as_deref(), Some("batch:8,replay=batch"));
        assert_eq!(s.counters, BTreeMap::from([("faults_read".into(), 8)]));
        assert_eq!(
            s.latency["window.64k"],
            Latency {
                count: 8,
                total_us: 78012,
                max_us: 12041
            }
        );
        assert_eq!(s.latency["replay"].count, 4);
        // A stats line goes only to the next result line, and only if that
        // is its test's.
        assert_eq!(c.cases()[1].stats, None, "heap");
        assert_eq!(c.cases()[2].stats, None, "other");
        let xml = c.to_xml(None);
        assert!(
            xml.contains(
                "name=\"anon_read\" time=\"0.000\"><properties>\
                 <property name=\"policy\" value=\"batch:8,replay=batch\"/>\
                 <property name=\"faults_read\" value=\"8\"/>\
                 <property name=\"replay.count\" value=\"4\"/>"
            ) && xml.contains(
                "<property name=\"window.64k.max_us\" value=\"12041\"/></properties></testcase>"
            ),
            "{xml}"
        );
        assert!(
            xml.contains("<property name=\"retries\" value=\"2\"/></properties><failure message=\"why\"/></testcase>"),
            "{xml}"
        );
        assert!(xml.contains("name=\"heap\" time=\"0.000\"/>"), "{xml}");
        let g = c.guest_stats();
        assert_eq!(g.tests.len(), 2);
        assert_eq!(g.total.counters["faults_read"], 8);
        assert_eq!(g.total.counters["retries"], 2);
        assert_eq!(g.total.policy, None);
    }

    #[test]
    fn hostile_stats_lines_are_bounded_and_ignored_in_part() {
        let mut text = b"stats t a=1 B=2 c<=3 d=x e=1/2 f=1/2/3/4 g=99999999999999999999 \
                         h=5/6/7 \x01=1 policy=\"<&> i=4"
            .to_vec();
        text.extend(b" ".repeat(10));
        text.extend(format!(" {}=1", "n".repeat(MAX_NAME + 1)).bytes());
        text.extend(b"\ntest t ... ok\n");
        let c = collect(&text);
        let s = c.cases()[0].stats.as_ref().unwrap();
        assert_eq!(
            s.counters,
            BTreeMap::from([("a".into(), 1), ("i".into(), 4)])
        );
        assert_eq!(s.latency.keys().collect::<Vec<_>>(), ["h"]);
        assert_eq!(s.policy.as_deref(), Some("\"<&>"));
        let xml = c.to_xml(None);
        assert!(xml.contains("value=\"&quot;&lt;&amp;&gt;\""), "{xml}");

        // More items than kept, and a line longer than parsed.
        let mut line = String::from("stats u");
        for i in 0..MAX_ITEMS + 10 {
            let _ = write!(line, " k{i}={i}/{i}/{i}");
        }
        line.push_str(&" x=1".repeat(MAX_LINE));
        let c = collect(format!("{line}\ntest u ... ok\n").as_bytes());
        let s = c.cases()[0].stats.as_ref().unwrap();
        assert_eq!(s.latency.len(), MAX_ITEMS);
        assert!(s.counters.is_empty());

        // Totals saturate; maxima are kept, not summed.
        let c = collect(
            b"stats a n=18446744073709551615 w=1/18446744073709551615/7\ntest a ... ok\n\
              stats b n=1 w=1/1/3\ntest b ... ok\n",
        );
        let g = c.guest_stats();
        assert_eq!(g.total.counters["n"], u64::MAX);
        assert_eq!(
            g.total.latency["w"],
            Latency {
                count: 2,
                total_us: u64::MAX,
                max_us: 7
            }
        );
    }

    #[test]
    fn stats_count_against_the_text_budget() {
        let mut c = Collector::new();
        let items: String = (0..MAX_ITEMS)
            .map(|i| format!(" {}{i:02}=1", "k".repeat(MAX_NAME - 2)))
            .collect();
        let per_case = MAX_ITEMS * (MAX_NAME + 8) + 6;
        let fits = MAX_TEXT / per_case;
        for i in 0..fits + 2 {
            c.feed(format!("stats t{i:05}{items}\ntest t{i:05} ... ok\n").as_bytes());
        }
        assert!(c.text <= MAX_TEXT);
        assert_eq!(c.cases().len(), fits);
        assert_eq!(c.dropped, 2);
    }

    #[test]
    fn a_bad_end_without_a_failed_test_is_a_failed_case() {
        let c = collect(b"test heap ... ok\n");
        let xml = c.to_xml(Some(&(5, "guest did not exit before --timeout".into())));
        assert!(xml.contains("failures=\"1\""), "{xml}");
        assert!(xml.contains(
            "name=\"faultline.run\" time=\"0.000\"><failure message=\"exit status 5: guest did not exit before --timeout\"/>"
        ));
        // A guest that reported its failure already says why the run failed.
        let c = collect(b"test heap ... FAILED: x\n");
        let xml = c.to_xml(Some(&(1, "guest reported failure".into())));
        assert!(!xml.contains("faultline.run"), "{xml}");
    }
}
