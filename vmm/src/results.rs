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
        let Some(case) = parse(line.trim_end_matches('\r')) else {
            return;
        };
        let now = Instant::now();
        let secs = now.duration_since(self.since).as_secs_f64();
        self.since = now;
        let text = case.name.len() + case.verdict.text().len();
        if self.cases.len() >= MAX_CASES || self.text + text > MAX_TEXT {
            self.dropped += 1;
            return;
        }
        self.text += text;
        self.cases.push(Case { secs, ..case });
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
            match &c.verdict {
                Verdict::Passed => x.push_str("/>\n"),
                Verdict::Skipped(why) => {
                    let _ = writeln!(x, "><skipped message=\"{}\"/></testcase>", escape(why));
                }
                Verdict::Failed(why) => {
                    let _ = writeln!(x, "><failure message=\"{}\"/></testcase>", escape(why));
                }
            }
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
    })
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
