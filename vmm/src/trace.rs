//! `--gpu-trace PATH`: the GPU's fault timeline (`faultline_device::trace`)
//! as Chrome trace-event JSON, written at exit on every exit path of `run`
//! and `serve`, like `--stats-json`.

use std::io::Write;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::gpu::GpuLock;

/// Where the trace goes at exit.
pub struct Out {
    path: PathBuf,
    /// Created (truncated) before anything runs, so a bad path fails fast.
    file: std::fs::File,
}

impl Out {
    pub fn open(path: PathBuf) -> Result<Self> {
        match crate::stats::open_output(&path) {
            Ok(file) => Ok(Self { path, file }),
            Err(source) => Err(Error::TraceWrite { path, source }),
        }
    }

    /// Write the GPU's trace; without a GPU (or one that never started
    /// tracing) a trace without events that says why.
    pub fn write(self, gpu: Option<&GpuLock>) -> Result<()> {
        let Self { path, file } = self;
        let mut w = std::io::BufWriter::new(file);
        let wrote = match gpu {
            Some(g) => faultline_device::sync::lock(g).write_trace(&mut w),
            None => Ok(false),
        };
        wrote
            .and_then(|wrote| {
                if !wrote {
                    w.write_all(
                        b"{\"traceEvents\":[],\"otherData\":{\"gpu\":\"no GPU attached, or \
                          the VMM stopped before it reported\"}}\n",
                    )?;
                }
                w.flush()
            })
            .map_err(|source| Error::TraceWrite {
                path: path.clone(),
                source,
            })
    }
}
