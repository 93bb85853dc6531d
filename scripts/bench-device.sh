#!/usr/bin/env bash
# Device benchmark: COPY through the emulated GPU's MMU (warm TLB) against a
# plain host memcpy of the same bytes, 4 KiB and 2 MiB mappings, as ratios;
# MIGRATE system -> VRAM and VRAM -> system against the same memcpy; then the coherence checker's cost (--gpu-check): COPY and a device-only
# single fault with the checker on against off, measured side by side; and
# the same two with the fault timeline (--gpu-trace) on against off.
# Prints markdown tables on stdout. Usage: scripts/bench-device.sh [reps]
set -euo pipefail
cd "$(dirname "$0")/.."
reps="${1:-9}"
# Build output goes to stderr so stdout stays a clean table.
cargo build --release -p faultline-device --example bench_copy >&2
# The host is shared: its load says how far the absolute figures are off.
echo "Measured $(date -u +%Y-%m-%d) at $(git rev-parse --short HEAD) on $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start."
echo
exec cargo run --quiet --release -p faultline-device --example bench_copy -- "$reps"
