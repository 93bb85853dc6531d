#!/usr/bin/env bash
# The fault pipeline's policies compared (issue 19): four workloads
# (sequential first touch, random 4 KiB touches, 64 KiB strides, a pointer
# chase; guest-driver/src/gpu/suite/workloads.rs) × the policies below, in
# the host loopback (examples/bench_policies.rs) and in the guest (the
# firmware's bench build, `bench=policies svm=P`, one boot per policy).
# One run of each; pages/s counts distinct 4 KiB pages the GPU touched,
# faults/page is device faults raised per such page.
# Prints markdown on stdout; progress and build output go to stderr.
# Usage: scripts/bench-policies.sh [runs]   (called by `scripts/bench.sh policies`;
# runs is ignored: one run). FAULTLINE_BENCH_MIB=N sizes each workload (64).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$FAULTLINE_ROOT"

mib="${FAULTLINE_BENCH_MIB:-64}"
[[ "$mib" =~ ^[1-9][0-9]*$ ]] && [ $((mib & (mib - 1))) -eq 0 ] ||
  die "FAULTLINE_BENCH_MIB must be a power of two in MiB, not '$mib'"
kvm_usable || die "the policies benchmark needs /dev/kvm"
policies=(
  default
  replay=block
  replay=batch_flush
  replay=once
  batch:32
  prefetch=none
  prefetch=density:51
  batch:32,replay=batch_flush,prefetch=density:51
)
scripts/build-firmware.sh --bench >/dev/null
build_vmm
say "policies: loopback, ${#policies[@]} policies × 4 workloads of $mib MiB"
lines=$(cargo run -q --release -p faultline-driver --example bench_policies -- "$mib" "${policies[@]}") ||
  die "the loopback half failed"
for p in "${policies[@]}"; do
  say "policies: guest, $p"
  cmdline="bench=policies mib=$mib"
  [ "$p" = default ] || cmdline="$cmdline svm=$p"
  out=$("$FAULTLINE_BIN" run --firmware "$FIRMWARE_BENCH_IMAGE" --memory 512M --timeout 3600 --cmdline "$cmdline" 2>&1) ||
    die "faultline run $cmdline failed: $(printf '%s\n' "$out" | grep -E 'bench|FAIL|panic|error' | tail -3)"
  # The guest prints its canonical policy; label the rows as asked.
  lines+=$'\n'$(printf '%s\n' "$out" | tr -d '\r' | grep '^bench policies host=guest' |
    sed "s/ policy=[^ ]* / policy=$p /")
done

commit=$(git rev-parse --short HEAD)
results=$(mktemp)
trap 'rm -f "$results"' EXIT
printf '%s\n' "$lines" >"$results"
MIB=$mib COMMIT=$commit RESULTS=$results python3 - "${policies[@]}" <<'PY'
import os, sys
from datetime import datetime, timezone
policies = sys.argv[1:]
rows = {}
for line in open(os.environ["RESULTS"]):
    f = dict(kv.split("=", 1) for kv in line.split()[2:] if "=" in kv)
    if not f:
        continue
    rows[(f["host"], f["policy"], f["workload"])] = f
workloads = ["sequential", "random", "strided", "chase"]
hosts = ["loopback", "guest"]
missing = [(h, p, w) for h in hosts for p in policies for w in workloads if (h, p, w) not in rows]
if missing:
    sys.exit(f"bench-policies: no result for {missing[:3]}")
def rate(r):
    return int(r["pages"]) / (int(r["ns"]) / 1e9)
def fpp(r):
    return int(r["faults"]) / int(r["pages"])
mib = os.environ["MIB"]
print(f"Measured {datetime.now(timezone.utc):%Y-%m-%d} at commit {os.environ['COMMIT']}, {os.cpu_count()} cores; one run; "
      f"each workload over {mib} MiB of fresh anonymous memory, 4 KiB CPU pages, a fresh driver per workload "
      "(fault buffer 256 entries). Loopback: the host loopback (`examples/bench_policies.rs`); guest: the firmware's "
      "bench build under faultline, 1 vCPU, 512 MiB (`bench=policies svm=P`). pages/s counts the distinct 4 KiB pages "
      "the GPU touched (random: all of them, one 8-byte FILL each in a scrambled order; strided: one per 64 KiB; "
      "chase: those the list's nodes fall in); faults/page is the device's faults raised per such page.")
print()
print("| workload | policy | loopback pages/s | loopback faults/page | guest pages/s | guest faults/page |")
print("|---|---|---|---|---|---|")
for w in workloads:
    for p in policies:
        lb, g = rows[("loopback", p, w)], rows[("guest", p, w)]
        print(f"| {w} | `{p}` | {rate(lb):.0f} | {fpp(lb):.3f} | {rate(g):.0f} | {fpp(g):.3f} |")
print()
print("Fastest policy per workload and host (pages/s, against `default`):")
print()
wins = {}
for h in hosts:
    for w in workloads:
        best = max(policies, key=lambda p: rate(rows[(h, p, w)]))
        wins[(h, best)] = wins.get((h, best), 0) + 1
        ratio = rate(rows[(h, best, w)]) / rate(rows[(h, "default", w)])
        print(f"- {h}, {w}: `{best}`, {ratio:.2f}× `default`")
print()
top = max(policies, key=lambda p: sum(wins.get((h, p), 0) for h in hosts))
print(f"Most wins (of {len(hosts) * len(workloads)} workload × host cells): `{top}` "
      f"({sum(wins.get((h, top), 0) for h in hosts)}).")
PY
