# Shared helpers for the Faultline scripts. Source it; do not run it.

FAULTLINE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FIRMWARE_IMAGE="$FAULTLINE_ROOT/firmware/target/x86_64-unknown-none/release/faultline-firmware"
# The same with the in-guest benchmarks (`scripts/build-firmware.sh --bench`).
FIRMWARE_BENCH_IMAGE="$FAULTLINE_ROOT/firmware/target/bench/x86_64-unknown-none/release/faultline-firmware"
# The same with the driver's test-only mutants (`scripts/build-firmware.sh --mutants`).
FIRMWARE_MUTANTS_IMAGE="$FAULTLINE_ROOT/firmware/target/mutants/x86_64-unknown-none/release/faultline-firmware"
# The fault-injection mix CI judges the suite under (docs/testing.md): late
# acks and MSIs, reordered, duplicated and spurious faults, early overflow,
# paused engines; with `--gpu-check=fatal` a correct driver passes it.
FAULTLINE_INJECT_MIX="${FAULTLINE_INJECT_MIX:-seed=7,tlb_ack_delay_steps=16,fault_msi_delay_us=50,fault_reorder=1,fault_dup=0.05,spurious=0.001,fault_overflow_at=16,engine_stall_us=20,engine_stall=0.01}"
FAULTLINE_BIN="${CARGO_TARGET_DIR:-$FAULTLINE_ROOT/target}/release/faultline"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# A benchmark script's `runs` argument ($2, default $1), checked:
# `runs=$(runs_arg 3 "${1:-}")`.
runs_arg() {
  local runs=${2:-$1}
  [[ "$runs" =~ ^[1-9][0-9]*$ ]] || die "runs must be a positive number, not '$runs'"
  echo "$runs"
}

# True when /dev/kvm can be opened read-write by this user.
kvm_usable() { [ -r /dev/kvm ] && [ -w /dev/kvm ]; }

# A missing prerequisite (KVM, QEMU) is a loud SKIP, or a failure when
# FAULTLINE_REQUIRE_KVM=1 (CI sets it so that a green run always booted).
skip_or_fail() {
  if [ "${FAULTLINE_REQUIRE_KVM:-0}" = 1 ]; then
    die "$* (FAULTLINE_REQUIRE_KVM=1 turns this skip into a failure)"
  fi
  printf '\n*** SKIP: %s ***\n\n' "$*" >&2
}

# Installs Debian packages when missing and we may (root); otherwise says
# what to install.
apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  else
    return 1
  fi
}

ensure_guest_target() {
  rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-none ||
    rustup target add x86_64-unknown-none >&2
}

build_vmm() {
  say "building the faultline VMM (release)"
  (cd "$FAULTLINE_ROOT" && cargo build --release -q -p faultline)
}
