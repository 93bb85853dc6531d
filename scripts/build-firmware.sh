#!/usr/bin/env bash
# Builds the guest firmware (PVH ELF for x86_64-unknown-none) and prints its path.
# Progress goes to stderr so callers can do: image=$(scripts/build-firmware.sh)
#
#   scripts/build-firmware.sh           the default image (tests, no benchmarks)
#   scripts/build-firmware.sh --bench   the bench image (cargo feature `bench`:
#                                       `bench=` and its TSC stamps), in its own
#                                       target dir so the default image stays
#   scripts/build-firmware.sh --mutants the mutants image (cargo feature
#                                       `mutants`: the driver's test-only bugs,
#                                       `mutant=` on the command line), in
#                                       firmware/target/mutants/
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/lib.sh

features=()
target_dir=firmware/target
image=$FIRMWARE_IMAGE
case "${1:-}" in
  "") ;;
  --bench)
    features=(--features bench)
    target_dir=firmware/target/bench
    image=$FIRMWARE_BENCH_IMAGE
    ;;
  --mutants)
    features=(--features mutants)
    target_dir=firmware/target/mutants
    image=$FIRMWARE_MUTANTS_IMAGE
    ;;
  *) die "usage: scripts/build-firmware.sh [--bench | --mutants]" ;;
esac

echo "build-firmware: ensuring rustup target x86_64-unknown-none" >&2
# Idempotent; needed where RUSTUP_AUTO_INSTALL is off. If it fails (offline
# and missing), cargo below says so clearly enough.
if ! rustup target add x86_64-unknown-none >/dev/null 2>&1; then
    echo "build-firmware: warning: 'rustup target add x86_64-unknown-none' failed" >&2
fi

echo "build-firmware: cargo build --release ${features[*]} (firmware/)" >&2
# The documented output paths assume the firmware's own target dirs.
(cd firmware && env -u CARGO_TARGET_DIR cargo build --release --locked "${features[@]}" \
    --target-dir "$FAULTLINE_ROOT/$target_dir" >&2)

[[ -f "$image" ]] || { echo "build-firmware: $image was not produced" >&2; exit 1; }
echo "$image"
