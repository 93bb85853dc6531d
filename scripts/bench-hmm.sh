#!/usr/bin/env bash
# HMM mirror-layer throughput: range_snapshot and range_fault on an
# already-populated 1 GiB range of the simulated address space, with 4 KiB and
# 2 MiB CPU pages; median of N runs (first argument, else BENCH_REPS, else 7).
# Prints markdown on stdout; build output goes to stderr.
# Called by `scripts/bench.sh hmm [runs]`; runnable on its own.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export BENCH_REPS="${1:-${BENCH_REPS:-7}}"

cargo build --release -p faultline-driver --features sim --example bench_hmm >&2

echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, $(uname -r); simulated address space" \
  "(\`faultline_driver::sim\`), 1 GiB populated writable before timing, median of $BENCH_REPS runs."
echo "\`range_fault\` requests VALID|WRITE on pages already mapped writable (no CPU faults)."
echo
cargo run --quiet --release -p faultline-driver --features sim --example bench_hmm
