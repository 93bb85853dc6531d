#!/usr/bin/env bash
# Builds the guest firmware (PVH ELF for x86_64-unknown-none) and prints its path.
# Progress goes to stderr so callers can do: image=$(scripts/build-firmware.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "build-firmware: ensuring rustup target x86_64-unknown-none" >&2
# Idempotent; needed where RUSTUP_AUTO_INSTALL is off. If it fails (offline
# and missing), cargo below says so clearly enough.
if ! rustup target add x86_64-unknown-none >/dev/null 2>&1; then
    echo "build-firmware: warning: 'rustup target add x86_64-unknown-none' failed" >&2
fi

echo "build-firmware: cargo build --release (firmware/)" >&2
# The documented output path assumes the firmware's own target dir.
(cd firmware && env -u CARGO_TARGET_DIR cargo build --release --locked >&2)

image="$PWD/firmware/target/x86_64-unknown-none/release/faultline-firmware"
[[ -f "$image" ]] || { echo "build-firmware: $image was not produced" >&2; exit 1; }
echo "$image"
