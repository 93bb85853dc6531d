#!/usr/bin/env bash
# Builds the minimal PVH image (pvh-min.S) with binutils and prints its path.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
src="$FAULTLINE_ROOT/scripts/pvh-min"
out="${CARGO_TARGET_DIR:-$FAULTLINE_ROOT/target}/pvh-min"
mkdir -p "$out"
command -v as >/dev/null && command -v ld >/dev/null || apt_install binutils ||
  die "building the minimal PVH image needs binutils (as, ld)"
as --64 -o "$out/pvh-min.o" "$src/pvh-min.S"
ld -T "$src/pvh-min.ld" -o "$out/pvh-min" "$out/pvh-min.o"
echo "$out/pvh-min"
