//! In-guest benchmarks selected by `bench=` on the command line. Output is
//! one `bench <name> key=value ...` line per result for scripts to parse
//! (`scripts/bench-exits.sh`, `scripts/bench-faults.sh`), then the exit port
//! says success or failure.
//!
//! They exist only in the bench build (cargo feature `bench`,
//! `scripts/build-firmware.sh --bench`): their latencies start at a TSC
//! stamp taken before each doorbell write (`stamped::Stamped`) and end at
//! one taken in the GPU interrupt stubs, instructions the default image
//! does not put on its doorbell and interrupt paths. In the default image
//! `bench=` fails with a line saying which build it needs.

use crate::arch::exit::{exit, ExitCode};
use crate::cmdline::Bench;
use crate::println;

#[cfg(feature = "bench")]
mod exits;
#[cfg(feature = "bench")]
mod faults;
#[cfg(feature = "bench")]
mod migrate;
#[cfg(feature = "bench")]
mod policies;
#[cfg(feature = "bench")]
mod stamped;

#[cfg(feature = "bench")]
use stamped::{last_doorbell_tsc, Stamped};

#[cfg(feature = "bench")]
pub fn run(b: Bench) -> ! {
    let result = match b {
        Bench::Exits => exits::run(),
        Bench::Faults => faults::run(),
        Bench::Policies => policies::run(),
        Bench::Migrate => migrate::run(),
    };
    match result {
        Ok(()) => exit(ExitCode::Success),
        Err(e) => {
            println!("bench: FAILED: {e}");
            exit(ExitCode::TestsFailed)
        }
    }
}

#[cfg(not(feature = "bench"))]
pub fn run(b: Bench) -> ! {
    println!(
        "bench: FAILED: bench={} needs the bench build of the firmware \
         (scripts/build-firmware.sh --bench, cargo feature `bench`); this image has none",
        b.name()
    );
    exit(ExitCode::TestsFailed)
}
