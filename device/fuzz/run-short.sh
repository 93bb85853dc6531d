#!/usr/bin/env bash
# Build and run the device fuzzer for a short while (default 30 s).
# Without nightly or cargo-fuzz this prints SKIP and exits 0; the caller
# decides whether a skip is acceptable.
set -uo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
skip() {
    echo "=================================================================="
    echo "SKIP: device fuzzer not run: $1"
    echo "=================================================================="
    exit 0
}
cargo +nightly --version >/dev/null 2>&1 || skip "no nightly toolchain"
cargo +nightly fuzz --version >/dev/null 2>&1 || skip "cargo-fuzz not installed (cargo install cargo-fuzz)"
mkdir -p corpus/device artifacts/device
cargo +nightly fuzz build device || { echo "FAIL: fuzz target does not build"; exit 1; }
cargo +nightly fuzz run device corpus/device -- -max_total_time="$secs" -rss_limit_mb=4096 \
    -artifact_prefix=artifacts/device/ || { echo "FAIL: fuzzer found a crash (see device/fuzz/artifacts/device)"; exit 1; }
echo "fuzz: device target ran ${secs}s without a crash"
