#!/usr/bin/env bash
# SVM fault and invalidation costs, measured in the guest with the TSC (the
# firmware's bench build, `bench=faults`, see firmware/src/bench/faults.rs):
# single-fault round trip through the full HMM path against a null fault
# handler, sequential first-touch throughput of 64 MiB per fault-around size,
# and munmap → device-acknowledged TLB invalidation; the guest CPU's own
# first touch of 64 MiB from user mode as the yardstick for the GPU's; and
# the SVM suite's 256 MiB large_first_touch (default image). `runs` boots; each boot
# gives medians over 100 faults / 50 munmaps and one 64 MiB pass per
# fault-around size; the tables give the median over the boots.
# Prints markdown on stdout; progress and build output go to stderr.
# Usage: scripts/bench-faults.sh [runs]   (called by `scripts/bench.sh faults`)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$FAULTLINE_ROOT"

runs=$(runs_arg 3 "${1:-}")
kvm_usable || die "the faults benchmark needs /dev/kvm"
scripts/build-firmware.sh --bench >/dev/null
scripts/build-firmware.sh >/dev/null
build_vmm
bin="${CARGO_TARGET_DIR:-$FAULTLINE_ROOT/target}/release/faultline"
memory=512M

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# One boot; prints "id.key value" for every numeric field of every bench
# line (id: the bench name plus its variant or fault-around/CPU page).
boot() {
  local out
  out=$("$bin" run --firmware "$FIRMWARE_BENCH_IMAGE" --memory "$memory" --timeout 1800 --cmdline bench=faults 2>&1) ||
    die "faultline run bench=faults failed: $(printf '%s\n' "$out" | grep -E 'bench|FAIL|panic|error' | tail -3)"
  printf '%s\n' "$out" | tr -d '\r' | awk '$1 == "bench" {
    id = $2; delete f
    for (i = 3; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
    if ("variant" in f) id = id "." f["variant"]
    if ("fault_around" in f) id = id "." f["fault_around"] "." f["cpu_page"]
    for (k in f) if (f[k] ~ /^[0-9]+$/) print id "." k, f[k]
  }'
}

# The SVM suite's large_first_touch on the default image: its own line
# "large_first_touch: 256 MiB in N ms, ..." (the GPU FILLs 256 MiB the CPU
# never touched at the default 64 KiB fault-around).
large() {
  local out ms
  out=$("$bin" run --firmware "$FIRMWARE_IMAGE" --memory "$memory" --timeout 1800 --cmdline test=large_first_touch 2>&1) ||
    die "faultline run test=large_first_touch failed: $(printf '%s\n' "$out" | grep -E 'FAIL|panic|error' | tail -3)"
  ms=$(printf '%s\n' "$out" | sed -n 's/.*large_first_touch: 256 MiB in \([0-9]*\) ms.*/\1/p' | tail -1)
  [ -n "$ms" ] || die "test=large_first_touch printed no time"
  echo "large_first_touch.ms $ms"
}

declare -A all
for r in $(seq "$runs"); do
  say "faults: boot $r/$runs"
  res=$(boot) || exit 1
  while read -r key val; do all[$key]+="$val "; done <<<"$res"
  say "faults: large_first_touch $r/$runs"
  res=$(large) || exit 1
  while read -r key val; do all[$key]+="$val "; done <<<"$res"
done

need() { [ -n "${all[$1]:-}" ] || die "no '$1' result from the guest"; }
# Checked here, not in the $(...) below, where die would not end the script.
for k in single_fault.{null,svm_resident,svm_first_touch}.{median_ns,min_ns,fault_irq_ns,service_ns,replay_done_ns,late_fault_msi} \
  first_touch.{4096.4096,65536.4096,2097152.4096,65536.2097152}.{pages,ns,batches} \
  munmap.mirror.{ack_ns,ack_irq_ns,return_ns} munmap.nomirror.return_ns invalidate.{ack_ns,ack_irq_ns} \
  cpu_first_touch.{pages,ns} large_first_touch.ms; do
  need "$k"
done
med() { need "$1"; tr ' ' '\n' <<<"${all[$1]}" | grep . | median; }
us() { med "$1" | awk '{ printf "%.1f", $1 / 1000 }'; }
each_us() { need "$1"; tr ' ' '\n' <<<"${all[$1]}" | grep . | awk '{ printf "%s%.1f", sep, $1 / 1000; sep = ", " }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

null=$(med single_fault.null.median_ns)
echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, $(uname -r); in the guest with the TSC (firmware \`bench=faults\`),"
echo "1 vCPU, $memory, release firmware, GPU defaults (fault buffer 256 entries, TLB 4096 entries/context); $runs boots,"
echo "each giving medians over 100 single faults per variant and 50 munmaps; the tables give the median of the boot medians."
echo
echo "**Single fault** (one FILL of one 4 KiB page with no device translation; TSC at the channel doorbell write → FAULT MSI stub → REPLAY doorbell write → completion MSI stub; segment columns are medians of their own, so they need not add up):"
echo
echo "| variant | round trip (µs) | ratio to null | fastest (µs) | doorbell → fault MSI | fault MSI → replay doorbell | replay → completion MSI | FAULT MSI after the replay | per-boot round trips (µs) |"
echo "|---|---|---|---|---|---|---|---|---|"
for v in null svm_resident svm_first_touch; do
  k=single_fault.$v
  echo "| \`$v\` | $(us $k.median_ns) | **$(ratio "$(med $k.median_ns)" "$null")** | $(us $k.min_ns) | $(us $k.fault_irq_ns) | $(us $k.service_ns) | $(us $k.replay_done_ns) | $(tr ' ' '\n' <<<"${all[$k.late_fault_msi]}" | awk '{ s += $1 } END { print s }') of $((runs * 100)) | $(each_us $k.median_ns) |"
done
echo
echo "**Sequential first touch** (one FILL over 64 MiB the CPU never touched; time from submit to completion seen by the driver; pages/s counts 4 KiB pages):"
echo
echo "| CPU pages | fault-around | fault batches (= windows) | time (s) | pages/s | per-boot pages/s |"
echo "|---|---|---|---|---|---|"
for row in "4096 4096 4 KiB|4 KiB" "65536 4096 4 KiB|64 KiB" "2097152 4096 4 KiB|2 MiB" "65536 2097152 2 MiB (\`MapFlags::HUGE\`)|64 KiB (a huge VMA widens it to 2 MiB)"; do
  read -r fa cp label <<<"$row"
  k=first_touch.$fa.$cp
  pages=$(med $k.pages)
  ns=$(med $k.ns)
  per=$(tr ' ' '\n' <<<"${all[$k.ns]}" | grep . | awk -v p="$pages" '{ printf "%s%.0f", sep, p / ($1 / 1e9); sep = ", " }')
  echo "| ${label%%|*} | ${label#*|} | $(med $k.batches) | $(awk -v n="$ns" 'BEGIN { printf "%.2f", n / 1e9 }') | **$(awk -v p="$pages" -v n="$ns" 'BEGIN { printf "%.0f", p / (n / 1e9) }')** | $per |"
done
gpu_pp=$(awk -v n="$(med first_touch.65536.4096.ns)" -v p="$(med first_touch.65536.4096.pages)" 'BEGIN { print n / p }')
cpu_pp=$(awk -v n="$(med cpu_first_touch.ns)" -v p="$(med cpu_first_touch.pages)" 'BEGIN { print n / p }')
echo
echo "**First touch per 4 KiB page, GPU against the guest CPU** (same boot, same 64 MiB of fresh 4 KiB pages; the CPU writes them from user mode through the process agent, one user page fault per page; the GPU FILLs them at the default 64 KiB fault-around):"
echo
echo "| who | per page (µs) | per-boot totals (s) |"
echo "|---|---|---|"
echo "| GPU, 64 KiB fault-around | $(awk -v x="$gpu_pp" 'BEGIN { printf "%.1f", x / 1000 }') | $(tr ' ' '\n' <<<"${all[first_touch.65536.4096.ns]}" | grep . | awk '{ printf "%s%.2f", sep, $1 / 1e9; sep = ", " }') |"
echo "| CPU, user mode | $(awk -v x="$cpu_pp" 'BEGIN { printf "%.1f", x / 1000 }') | $(tr ' ' '\n' <<<"${all[cpu_first_touch.ns]}" | grep . | awk '{ printf "%s%.2f", sep, $1 / 1e9; sep = ", " }') |"
echo
echo "**GPU / CPU first touch per page: $(ratio "$gpu_pp" "$cpu_pp")×** (target ≤ 1.5)."
echo
echo "**large_first_touch** (SVM suite, default image, 256 MiB, 65,536 pages at 64 KiB fault-around): **$(med large_first_touch.ms | awk '{ printf "%.1f", $1 / 1000 }') s** (per boot: $(tr ' ' '\n' <<<"${all[large_first_touch.ms]}" | grep . | awk '{ printf "%s%.1f", sep, $1 / 1000; sep = ", " }') s; target < 20 s)."
echo
echo "**Invalidation** (munmap of a 64 KiB mapping the device has mapped through the mirror, one TLB invalidation each):"
echo
echo "| measurement | median (µs) | per-boot medians (µs) |"
echo "|---|---|---|"
echo "| munmap start → driver sees the device's TLB-invalidate ack | **$(us munmap.mirror.ack_ns)** | $(each_us munmap.mirror.ack_ns) |"
echo "| munmap start → CONTROL MSI taken | $(us munmap.mirror.ack_irq_ns) | $(each_us munmap.mirror.ack_irq_ns) |"
echo "| munmap start → munmap returns, mirrored | $(us munmap.mirror.return_ns) | $(each_us munmap.mirror.return_ns) |"
echo "| munmap start → munmap returns, no mirror (baseline) | $(us munmap.nomirror.return_ns) | $(each_us munmap.nomirror.return_ns) |"
echo "| \`Context::invalidate\` alone (no munmap, no lock held) → ack seen | $(us invalidate.ack_ns) | $(each_us invalidate.ack_ns) |"
echo "| \`Context::invalidate\` alone → CONTROL MSI taken | $(us invalidate.ack_irq_ns) | $(each_us invalidate.ack_irq_ns) |"
echo
echo "**HMM single fault / null (target ≤ 1.5): $(ratio "$(med single_fault.svm_resident.median_ns)" "$null")× (resident page), $(ratio "$(med single_fault.svm_first_touch.median_ns)" "$null")× (first touch)** (fastest samples: $(ratio "$(med single_fault.svm_resident.min_ns)" "$(med single_fault.null.min_ns)")×, $(ratio "$(med single_fault.svm_first_touch.min_ns)" "$(med single_fault.null.min_ns)")×); munmap with a mirror / without: $(ratio "$(med munmap.mirror.return_ns)" "$(med munmap.nomirror.return_ns)")×."
