#!/usr/bin/env bash
# Boots the firmware under QEMU and turns the guest's verdict into an exit code.
# The command line starts with gpu=optional (see firmware/README.md).
#
#   scripts/qemu-boot.sh [microvm|q35] [cmdline words...]
#
# The guest writes v to isa-debug-exit (port 0xf4); QEMU exits (v<<1)|1:
#   1 -> all tests passed      -> exit 0
#   3 -> a test failed         -> exit 1
#   anything else (5 = guest panic/exception, 124 = timeout, ...) -> exit 2
#
# Environment: FIRMWARE_IMAGE (default: the release build), QEMU_TIMEOUT
# (seconds, default 60), QEMU_MEM (default 512M), QEMU_SMP (vCPUs, default
# 1; both machines describe them in an ACPI MADT, which the firmware reads),
# QEMU_BOOT_LOG (keep the serial log at this path), QEMU_ACCEL=tcg (force
# emulation even with KVM).
# Without usable KVM it falls back to TCG with a warning, or fails (status 2)
# when FAULTLINE_REQUIRE_KVM=1 and QEMU_ACCEL is not tcg.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

machine="${1:-microvm}"
[[ $# -gt 0 ]] && shift
# QEMU has no Faultline GPU (unless a vfio-user server provides one): its
# tests skip loudly instead of failing. A later gpu=required wins.
cmdline="gpu=optional${*:+ $*}"
case "$machine" in
    microvm | q35) ;;
    *)
        echo "usage: $0 [microvm|q35] [cmdline words...]" >&2
        exit 2
        ;;
esac

image="${FIRMWARE_IMAGE:-firmware/target/x86_64-unknown-none/release/faultline-firmware}"
if [[ ! -f "$image" ]]; then
    echo "qemu-boot: no firmware at $image; run scripts/build-firmware.sh first" >&2
    exit 2
fi

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "qemu-boot: installing qemu-system-x86 (Debian)" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >&2
    else
        echo "qemu-boot: qemu-system-x86_64 not found; install Debian's qemu-system-x86 package" >&2
        exit 2
    fi
fi

if [[ "${QEMU_ACCEL:-kvm}" != tcg && -r /dev/kvm && -w /dev/kvm ]]; then
    # QEMU 7.2 (Debian 12) aborts setting MSR 0x10a under nested KVM unless
    # arch-capabilities is hidden; the guest does not need it.
    accel=(-accel kvm -cpu host,-arch-capabilities)
elif [[ "${QEMU_ACCEL:-kvm}" != tcg && "${FAULTLINE_REQUIRE_KVM:-0}" = 1 ]]; then
    # CI asked for a real KVM boot: a TCG fallback would be a green run that
    # never touched KVM.
    echo "qemu-boot: ERROR: /dev/kvm is not usable and FAULTLINE_REQUIRE_KVM=1 forbids the TCG fallback" >&2
    exit 2
else
    echo "qemu-boot: ##################################################################" >&2
    echo "qemu-boot: WARNING: /dev/kvm not usable (or QEMU_ACCEL=tcg); using TCG emulation." >&2
    echo "qemu-boot: This is NOT a KVM boot test: timing and CPU behaviour differ."   >&2
    echo "qemu-boot: ##################################################################" >&2
    accel=(-accel tcg -cpu max)
fi

log="${QEMU_BOOT_LOG:-$(mktemp -t qemu-boot.XXXXXX)}"
[[ -n "${QEMU_BOOT_LOG:-}" ]] || trap 'rm -f "$log"' EXIT

smp="${QEMU_SMP:-1}"
[[ "$smp" =~ ^[1-9][0-9]*$ ]] || { echo "qemu-boot: QEMU_SMP must be a positive number, not '$smp'" >&2; exit 2; }
echo "qemu-boot: $machine, -smp $smp, cmdline \"$cmdline\"" >&2
set +e
timeout "${QEMU_TIMEOUT:-60}" qemu-system-x86_64 \
    -M "$machine" "${accel[@]}" \
    -kernel "$image" -append "$cmdline" \
    -nographic -monitor none -serial stdio -display none -no-reboot \
    -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -m "${QEMU_MEM:-512M}" -smp "$smp" </dev/null | tee "$log"
status=${PIPESTATUS[0]}
set -e

# The guest prints CRLF; compare without the CR. The summary must be the
# last thing the guest printed, not just somewhere in the log.
summary=$(tr -d '\r' <"$log" | grep -v '^[[:space:]]*$' | tail -n 1 | grep -E '^[0-9]+ passed, [0-9]+ failed$' || true)
listing=0
[[ " $cmdline " == *" list=1 "* ]] && listing=1

case "$status" in
    1)
        if [[ $listing -eq 1 ]]; then
            echo "qemu-boot: PASS (test list)" >&2
            exit 0
        fi
        if [[ "$summary" =~ ^[0-9]+\ passed,\ 0\ failed$ ]]; then
            echo "qemu-boot: PASS ($summary)" >&2
            exit 0
        fi
        echo "qemu-boot: ERROR: guest reported success but did not end with 'N passed, 0 failed'" >&2
        exit 2
        ;;
    3)
        echo "qemu-boot: FAIL: guest reported failed tests (${summary:-no summary line})" >&2
        exit 1
        ;;
    5)
        echo "qemu-boot: ERROR: guest hit a panic, exception or fatal boot error (status 5)" >&2
        exit 2
        ;;
    124)
        echo "qemu-boot: ERROR: timed out after ${QEMU_TIMEOUT:-60}s" >&2
        exit 2
        ;;
    *)
        echo "qemu-boot: ERROR: QEMU exited with status $status (guest did not use the exit port?)" >&2
        exit 2
        ;;
esac
