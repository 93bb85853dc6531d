#!/usr/bin/env bash
# VM-exit costs of the GPU paths, measured in the guest with the TSC (the
# firmware's bench build, `bench=exits`): one BAR0 register read (an MMIO
# exit round trip), and doorbell-to-completion-interrupt latency of a no-op
# command (zero-length FILL) with the fast path (doorbell ioeventfd, MSI
# irqfd) and without it (`faultline run --gpu-no-fastpath`: doorbell as an
# MMIO exit, MSI by KVM_SIGNAL_MSI), and the register read again while 8
# channels stream large FILL/COPY (p50 and p99: how long a vCPU's MMIO
# waits for the device lock; the device hands it over after each bounded
# step). Both variants are booted alternately,
# `runs` times each; each boot reports medians over hundreds of operations,
# and the table gives the median of those.
# Prints markdown on stdout; build output goes to stderr.
# Usage: scripts/bench-exits.sh [runs]   (called by `scripts/bench.sh exits`)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$FAULTLINE_ROOT"

runs=$(runs_arg 5 "${1:-}")
kvm_usable || die "the exits benchmark needs /dev/kvm"
scripts/build-firmware.sh --bench >/dev/null
build_vmm
bin="${CARGO_TARGET_DIR:-$FAULTLINE_ROOT/target}/release/faultline"

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# One boot; prints "name median_ns" per bench line (and "name.p99 p99_ns"
# where the line has one), fails without them.
boot() {
  local out
  out=$("$bin" run --firmware "$FIRMWARE_BENCH_IMAGE" --timeout 120 --cmdline bench=exits "$@" 2>&1) ||
    die "faultline run $* bench=exits failed: $(printf '%s\n' "$out" | tail -3)"
  printf '%s\n' "$out" | awk '$1 == "bench" { for (i = 3; i <= NF; i++) {
    if ($i ~ /^median_ns=/) { sub(/median_ns=/, "", $i); print $2, $i }
    if ($i ~ /^p99_ns=/) { sub(/p99_ns=/, "", $i); print $2 ".p99", $i } } }'
}

declare -A all
for r in $(seq "$runs"); do
  say "exits: run $r/$runs"
  for mode in fast slow; do
    args=()
    [ "$mode" = slow ] && args=(--gpu-no-fastpath)
    res=$(boot "${args[@]}")
    for name in mmio_read doorbell_irq noop_total mmio_read_busy mmio_read_busy.p99; do
      v=$(printf '%s\n' "$res" | awk -v n="$name" '$1 == n { print $2 }')
      [ -n "$v" ] || die "no '$name' result from the guest ($mode)"
      all[$mode.$name]+="$v "
    done
  done
done

us() { tr ' ' '\n' <<<"${all[$1]}" | grep . | median | awk '{ printf "%.1f", $1 / 1000 }'; }
runs_us() { tr ' ' '\n' <<<"${all[$1]}" | grep . | awk '{ printf "%s%.1f", sep, $1 / 1000; sep = ", " }'; }

fast=$(us fast.doorbell_irq)
slow=$(us slow.doorbell_irq)
echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, $(uname -r); in the guest with the TSC (firmware \`bench=exits\`),"
echo "1 vCPU, release firmware; $runs boots per variant, alternating. Each boot gives the median over 2000 register"
echo "reads and 300 no-op commands (zero-length FILL), and 2000 register reads while 8 channels stream (p50/p99 per boot);"
echo "the table gives the median of the $runs boot figures."
echo
echo "| measurement | fast path (µs) | \`--gpu-no-fastpath\` (µs) | per-boot medians, fast / no-fastpath (µs) |"
echo "|---|---|---|---|"
echo "| BAR0 register read (MMIO exit round trip) | $(us fast.mmio_read) | $(us slow.mmio_read) | $(runs_us fast.mmio_read) / $(runs_us slow.mmio_read) |"
echo "| no-op command: doorbell write → completion MSI taken | $fast | $slow | $(runs_us fast.doorbell_irq) / $(runs_us slow.doorbell_irq) |"
echo "| no-op command: driver submit start → completion MSI taken | $(us fast.noop_total) | $(us slow.noop_total) | $(runs_us fast.noop_total) / $(runs_us slow.noop_total) |"
echo "| BAR0 register read while 8 channels stream 256 MiB FILL/COPY, p50 | $(us fast.mmio_read_busy) | $(us slow.mmio_read_busy) | $(runs_us fast.mmio_read_busy) / $(runs_us slow.mmio_read_busy) |"
echo "| BAR0 register read while 8 channels stream 256 MiB FILL/COPY, p99 | $(us fast.mmio_read_busy.p99) | $(us slow.mmio_read_busy.p99) | $(runs_us fast.mmio_read_busy.p99) / $(runs_us slow.mmio_read_busy.p99) |"
echo
echo "**Doorbell → interrupt, no-fastpath / fast path: $(awk -v a="$slow" -v b="$fast" 'BEGIN { printf "%.2f", a / b }')×** (what ioeventfd + irqfd buy)."
