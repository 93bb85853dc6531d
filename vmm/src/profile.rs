//! `faultline run --profile-guest PATH`: a sampling profiler of the guest.
//!
//! Guest kernel code is emulated on this class of host (each CPL0
//! instruction costs thousands of cycles), so where the guest spends its
//! time is where its instructions go; the VMM sees that better than the
//! guest can. A sampler thread kicks every vCPU thread `hz` times a second
//! with the same signal `VcpuThreads::stop` uses (it only makes KVM_RUN
//! return EINTR); the vCPU records its RIP and CPL and goes straight back
//! in. A vCPU halted in the in-kernel irqchip is sampled too, at the
//! instruction after its `hlt`: idle time shows as the function that waits.
//!
//! The file is text, one line per distinct (RIP, CPL), most samples first,
//! under a `#` header; `scripts/profile-guest.py` maps the RIPs to the
//! image's symbols. Memory is bounded: at most `MAX_SITES` distinct RIPs
//! per vCPU, later new ones are counted in the header's `other` figure.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use faultline_device::sync::lock;

/// Distinct RIPs kept per vCPU.
pub const MAX_SITES: usize = 1 << 16;
/// Accepted sampling rates; the default costs ~2 % of a vCPU here (an
/// exit is ~10–14 µs on nested KVM).
pub const MIN_HZ: u32 = 1;
pub const MAX_HZ: u32 = 10_000;
pub const DEFAULT_HZ: u32 = 1000;

/// One vCPU's samples, kept on its own thread (no lock per sample).
#[derive(Default)]
pub struct Samples {
    sites: HashMap<(u64, u8), u64>,
    other: u64,
}

impl Samples {
    pub fn record(&mut self, rip: u64, cpl: u8) {
        let full = self.sites.len() >= MAX_SITES;
        match self.sites.get_mut(&(rip, cpl)) {
            Some(n) => *n += 1,
            None if full => self.other += 1,
            None => {
                self.sites.insert((rip, cpl), 1);
            }
        }
    }
}

/// The samples of every vCPU, merged as each leaves its run loop.
pub struct Profile {
    path: PathBuf,
    file: File,
    pub hz: u32,
    merged: Mutex<Samples>,
}

impl Profile {
    /// Creates `path` up front, so an unwritable path fails before the VM
    /// starts.
    pub fn create(path: &Path, hz: u32) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            file: crate::stats::open_output(path)?,
            hz,
            merged: Mutex::new(Samples::default()),
        })
    }

    pub fn merge(&self, s: Samples) {
        let mut m = lock(&self.merged);
        m.other += s.other;
        for (site, n) in s.sites {
            if let Some(c) = m.sites.get_mut(&site) {
                *c += n;
            } else if m.sites.len() < MAX_SITES * 4 {
                m.sites.insert(site, n);
            } else {
                m.other += n;
            }
        }
    }

    /// Writes the histogram; the error names the path.
    pub fn write(&self) -> Result<(), String> {
        let m = lock(&self.merged);
        let mut sites: Vec<_> = m
            .sites
            .iter()
            .map(|(&(rip, cpl), &n)| (n, rip, cpl))
            .collect();
        sites.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let total: u64 = sites.iter().map(|s| s.0).sum::<u64>() + m.other;
        let user: u64 = sites.iter().filter(|s| s.2 == 3).map(|s| s.0).sum();
        let mut w = BufWriter::new(&self.file);
        let r = (|| {
            writeln!(
                w,
                "# faultline guest profile: {total} samples at {} Hz, {user} at CPL3, {} other (beyond {MAX_SITES} distinct RIPs)",
                self.hz, m.other
            )?;
            writeln!(w, "# samples rip cpl")?;
            for (n, rip, cpl) in sites {
                writeln!(w, "{n} {rip:#x} {cpl}")?;
            }
            w.flush()
        })();
        r.map_err(|e| format!("writing the guest profile {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_are_bounded_and_merged() {
        let mut s = Samples::default();
        for i in 0..(MAX_SITES as u64 + 10) {
            s.record(0x1000 + i, 0);
        }
        s.record(0x1000, 0);
        assert_eq!(s.sites.len(), MAX_SITES);
        assert_eq!(s.other, 10);
        assert_eq!(s.sites[&(0x1000, 0)], 2);

        let dir = std::env::temp_dir().join(format!("faultline-profile-{}", std::process::id()));
        let p = Profile::create(&dir, 1000).unwrap();
        p.merge(s);
        let mut t = Samples::default();
        t.record(0x1000, 0);
        t.record(0x7f80_0000_0000, 3);
        p.merge(t);
        p.write().unwrap();
        let text = std::fs::read_to_string(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let mut lines = text.lines();
        let total = MAX_SITES as u64 + 10 + 1 + 2;
        assert_eq!(
            lines.next().unwrap(),
            format!("# faultline guest profile: {total} samples at 1000 Hz, 1 at CPL3, 10 other (beyond {MAX_SITES} distinct RIPs)")
        );
        lines.next();
        assert_eq!(lines.next().unwrap(), "3 0x1000 0");
        assert!(text.contains("\n1 0x7f8000000000 3\n"));
    }
}
