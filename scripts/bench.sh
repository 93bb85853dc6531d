#!/usr/bin/env bash
# Benchmarks, each measured side by side with its baseline in one run and
# reported as a ratio. Results are printed and written into
# docs/performance.md between the markers of each benchmark.
#
#   scripts/bench.sh [boot|device|hmm|exits|faults|all] [runs]
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$FAULTLINE_ROOT"

what=${1:-all}
runs=${2:-10}
stamp="$(date -u +%Y-%m-%d) on $(nproc) cores, $(uname -r)"

# Replaces the text between <!-- bench:NAME --> and <!-- /bench:NAME --> in
# docs/performance.md with stdin.
record() {
  local name=$1 doc=docs/performance.md body
  body=$(cat)
  printf '%s\n' "$body"
  grep -q "<!-- bench:$name -->" "$doc" || die "$doc has no <!-- bench:$name --> section"
  BODY="$body" awk -v name="$name" '
    $0 == "<!-- bench:" name " -->" { print; print ENVIRON["BODY"]; skip = 1; next }
    $0 == "<!-- /bench:" name " -->" { skip = 0 }
    !skip { print }' "$doc" >"$doc.tmp" && mv "$doc.tmp" "$doc"
  say "recorded in $doc"
}

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

now_ms() { echo $(($(date +%s%N) / 1000000)); }

bench_boot() {
  kvm_usable || die "boot benchmark needs /dev/kvm"
  command -v qemu-system-x86_64 >/dev/null || apt_install qemu-system-x86 ||
    die "boot benchmark needs qemu-system-x86_64"
  scripts/build-firmware.sh >/dev/null
  build_vmm
  # Debian 12's QEMU 7.2 aborts setting IA32_ARCH_CAPABILITIES under nested
  # KVM with plain `-cpu host`; the feature is irrelevant to this guest.
  local fl=() qm=() t0 i
  say "boot: $runs runs each of faultline and QEMU microvm, interleaved"
  for i in $(seq "$runs"); do
    t0=$(now_ms)
    # Same work on both sides: no GPU, so the GPU tests skip on both.
    "$FAULTLINE_BIN" run --firmware "$FIRMWARE_IMAGE" --memory 512M --no-gpu --cmdline gpu=optional >/dev/null ||
      die "faultline run failed"
    fl+=($(($(now_ms) - t0)))
    t0=$(now_ms)
    qemu-system-x86_64 -M microvm -accel kvm -cpu host,-arch-capabilities -m 512M -nodefaults -no-reboot \
      -display none -serial null -kernel "$FIRMWARE_IMAGE" -append gpu=optional \
      -device isa-debug-exit,iobase=0xf4,iosize=0x04 >/dev/null 2>&1 || [ $? -eq 1 ] ||
      die "QEMU microvm boot failed"
    qm+=($(($(now_ms) - t0)))
  done
  local f q
  f=$(printf '%s\n' "${fl[@]}" | median)
  q=$(printf '%s\n' "${qm[@]}" | median)
  record boot <<MD
Measured $stamp; $runs runs each, interleaved; wall time from process start
to guest exit, same firmware image, 512 MiB, 1 vCPU, default self-test suite
with \`gpu=optional\` and no GPU on either side (the GPU tests skip).

| host | median (ms) | all runs (ms) |
|---|---|---|
| \`faultline run\` | $f | ${fl[*]} |
| QEMU $(qemu-system-x86_64 --version | head -1 | awk '{print $4}') \`-M microvm\` | $q | ${qm[*]} |

**faultline / QEMU microvm median ratio: $(awk -v a="$f" -v b="$q" 'BEGIN { printf "%.2f", a / b }')** (below 1: faultline is faster).
MD
}

bench_script() {
  local name=$1 script=scripts/bench-$1.sh
  [ -x "$script" ] || die "$script is missing"
  local out
  # A failed run must not overwrite the recorded figures with nothing.
  out=$("$script" "$runs") || die "$script failed"
  printf '%s\n' "$out" | record "$name"
}

case "$what" in
  boot) bench_boot ;;
  device | hmm | exits | faults) bench_script "$what" ;;
  all)
    bench_boot
    for b in device hmm exits faults; do bench_script "$b"; done
    ;;
  *) die "unknown benchmark '$what' (boot, device, hmm, exits, faults, all)" ;;
esac
