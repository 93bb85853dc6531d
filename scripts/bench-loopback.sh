#!/usr/bin/env bash
# Host loopback of the SVM fault path (guest-driver/examples/bench_svm.rs:
# the real driver, the device model on its worker thread, simulated
# processes): single-fault round trips against the host's wake-up floor (a
# two-thread Mutex + Condvar ping-pong) measured in the same run, taking
# turns in chunks of 100 round trips; first-touch throughput; munmap → TLB ack.
# Prints markdown on stdout; build output goes to stderr.
# Usage: scripts/bench-loopback.sh [runs]   (called by `scripts/bench.sh loopback`)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$FAULTLINE_ROOT"

runs=$(runs_arg 5 "${1:-}")
cargo build --release -p faultline-driver --example bench_svm >&2
echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, $(uname -r), commit $(git rev-parse --short HEAD);" \
  "$runs runs, each of 20 chunks of 100 single faults per variant and 100 ping-pong round trips, taking turns chunk by chunk;" \
  "medians over all chunks, the fastest chunk, and each run's median."
echo
BENCH_REPS="$runs" cargo run --quiet --release -p faultline-driver --example bench_svm
