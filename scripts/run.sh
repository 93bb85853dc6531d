#!/usr/bin/env bash
# Builds the firmware and the VMM (cargo only rebuilds what changed), then
# boots the default firmware in faultline. Extra arguments go to
# `faultline run`, e.g. --cmdline "test=heap" or --memory 1G.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

kvm_usable || die "/dev/kvm is missing or not accessible: faultline needs KVM"
"$FAULTLINE_ROOT/scripts/build-firmware.sh" >/dev/null
build_vmm
exec "$FAULTLINE_BIN" run --firmware "$FIRMWARE_IMAGE" "$@"
