#!/usr/bin/env bash
# Boots the firmware's test suite under QEMU with the Faultline GPU served by
# `faultline serve` over vfio-user (QEMU's vfio-user-pci, QEMU from the
# trixie root that scripts/qemu-setup.sh provides).
#
#   scripts/qemu-run.sh [cmdline words...]     e.g. scripts/qemu-run.sh test=gpu
#
# Exit status: 0 every guest test passed (QEMU status 1 and the guest's last
# line "N passed, 0 failed"), 1 a guest test failed (QEMU status 3), 2 any
# other outcome: guest crash (QEMU status 5), timeout, QEMU or server error;
# 130/143 stopped by SIGINT/SIGTERM (QEMU and the server are stopped, the
# mounts and the work directory removed, and a line says so).
#
# Environment: QEMU_TIMEOUT (seconds, default 480), QEMU_MEM (default 512M),
# QEMU_SMP (vCPUs, default 1; the firmware starts every CPU the MADT lists),
# FAULTLINE_SERVE_ARGS (extra `faultline serve` options, e.g. --gpu-channels 4),
# QEMU_RUN_LOG (keep the serial log at this path).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$FAULTLINE_ROOT"

cmdline="$*"
mem="${QEMU_MEM:-512M}"
smp="${QEMU_SMP:-1}"
[[ "$smp" =~ ^[1-9][0-9]*$ ]] || { say "qemu-run: QEMU_SMP must be a positive number, not '$smp'"; exit 2; }
kvm_usable || { say "qemu-run: /dev/kvm is not usable"; exit 2; }

root=$(scripts/qemu-setup.sh) || { say "qemu-run: no QEMU with vfio-user-pci"; exit 2; }
scripts/build-firmware.sh >/dev/null || exit 2
build_vmm || exit 2

work=$(mktemp -d /tmp/faultline-qemu.XXXXXX)
sock="$work/gpu.sock"
log="${QEMU_RUN_LOG:-$work/serial.log}"
server_pid=""
qemu_pid=""
tail_pid=""
mounted=()

cleanup() {
  local rc=$?
  # QEMU first (`timeout` passes the TERM on to it), then its server.
  local pid
  for pid in "$qemu_pid" "$server_pid" "$tail_pid"; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
  # Innermost first.
  local i
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" 2>/dev/null || true
  done
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
# Bash runs a trap only between commands, so QEMU runs in the background
# and the script waits for it with `wait`, which a signal interrupts.
on_signal() {
  say "qemu-run: stopped by SIG$1: stopping QEMU and the server, removing mounts"
  exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

bind() {
  mkdir -p "$2"
  mount --bind "$1" "$2"
  mounted+=("$2")
}
bind /dev "$root/dev"
bind /proc "$root/proc"
# The socket and the firmware, at the same path inside and outside.
bind "$work" "$root$work"
cp "$FIRMWARE_IMAGE" "$work/firmware"

# shellcheck disable=SC2086 # FAULTLINE_SERVE_ARGS is a list of options
"$FAULTLINE_BIN" serve --socket "$sock" --stats ${FAULTLINE_SERVE_ARGS:-} 2>"$work/serve.err" &
server_pid=$!
for _ in $(seq 100); do
  [ -S "$sock" ] && break
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if [ ! -S "$sock" ]; then
  cat "$work/serve.err" >&2
  say "qemu-run: the server did not start listening on $sock"
  exit 2
fi

say "qemu-run: QEMU $(chroot "$root" qemu-system-x86_64 --version | head -n 1 | awk '{print $4}') q35 + vfio-user-pci, $smp vCPU(s), cmdline \"$cmdline\""
# Created before QEMU starts: the background job opens it for QEMU's
# stdout only once it runs, and tail must find it there.
: >"$log"
set +e
# The default suite takes ~95 s here under PVM (the SVM suite's
# large_first_touch alone ~70 s): leave room for a loaded host.
timeout "${QEMU_TIMEOUT:-480}" chroot "$root" qemu-system-x86_64 \
  -M q35,accel=kvm,memory-backend=mem \
  -object "memory-backend-memfd,id=mem,size=$mem,share=on" -m "$mem" \
  -cpu host,-arch-capabilities -smp "$smp" -nodefaults -no-reboot \
  -kernel "$work/firmware" -append "$cmdline" \
  -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$sock\",\"type\":\"unix\"}}" \
  -serial stdio -display none -monitor none \
  -device isa-debug-exit,iobase=0xf4,iosize=4 </dev/null >"$log" &
qemu_pid=$!
# The console as it comes; tail ends once QEMU has and the log is read.
tail -n +1 -f --pid="$qemu_pid" "$log" &
tail_pid=$!
wait "$qemu_pid"
status=$?
qemu_pid=""
wait "$tail_pid"
tail_pid=""
set -e

# QEMU is gone, so the server sees its client disconnect and exits.
server_status=0
for _ in $(seq 100); do
  kill -0 "$server_pid" 2>/dev/null || break
  sleep 0.1
done
if kill -0 "$server_pid" 2>/dev/null; then
  say "qemu-run: the server did not exit after QEMU did"
  server_status=124
else
  wait "$server_pid" || server_status=$?
fi
server_pid=""
cat "$work/serve.err" >&2

summary=$(tr -d '\r' <"$log" | grep -v '^[[:space:]]*$' | tail -n 1 | grep -E '^[0-9]+ passed, [0-9]+ failed$' || true)
if [ "$server_status" != 0 ]; then
  say "qemu-run: ERROR: faultline serve exited with status $server_status"
  exit 2
fi
case "$status" in
  1)
    if [[ " $cmdline " == *" list=1 "* ]]; then
      say "qemu-run: PASS (test list)"
      exit 0
    fi
    if [[ "$summary" =~ ^[0-9]+\ passed,\ 0\ failed$ ]]; then
      say "qemu-run: PASS ($summary)"
      exit 0
    fi
    say "qemu-run: ERROR: guest reported success but did not end with 'N passed, 0 failed'"
    exit 2
    ;;
  3)
    say "qemu-run: FAIL: guest reported failed tests (${summary:-no summary line})"
    exit 1
    ;;
  5)
    say "qemu-run: ERROR: guest hit a panic, exception or fatal boot error (status 5)"
    exit 2
    ;;
  124)
    say "qemu-run: ERROR: timed out after ${QEMU_TIMEOUT:-480}s"
    exit 2
    ;;
  *)
    say "qemu-run: ERROR: QEMU exited with status $status"
    exit 2
    ;;
esac
