#!/usr/bin/env bash
# Migration benchmark (issue 17): the copy engine's MIGRATE system -> VRAM
# and VRAM -> system against host memcpy of the same bytes, device-only
# (device/examples/bench_copy.rs) and through the driver in the host
# loopback (guest-driver/examples/bench_migrate.rs: one MigrateList batch
# of 2 MiB pages); then migrate_vma of a process range both ways
# (hmm-tests' benchmark_thp_migration: 1/4 .. 128 x 2 MiB) in the loopback,
# and 64 MiB in the guest under faultline (firmware bench=migrate), against
# the CPU's own pass over the same bytes, each size with 4 KiB pages and
# (from 2 MiB up) with 2 MiB pages (a HUGE VMA), the two interleaved, their
# ratio per direction; and the first-touch policy's cost
# per 64 KiB fault window against the default policy's (loopback). Every
# run checks the data after the round trip. Prints markdown on stdout; build output goes to stderr.
# Usage: scripts/bench-migrate.sh [runs]   (called by `scripts/bench.sh migrate`;
# the guest takes at most 3 runs: a 64 MiB migration is minutes there)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$FAULTLINE_ROOT"

runs=$(runs_arg 3 "${1:-}")
kvm_usable || die "the migrate benchmark needs /dev/kvm (its guest part)"
guest_runs=$((runs < 3 ? runs : 3))
cargo build --release -p faultline-device --example bench_copy >&2
cargo build --release -p faultline-driver --example bench_migrate >&2
scripts/build-firmware.sh --bench >/dev/null
build_vmm
target="${CARGO_TARGET_DIR:-$FAULTLINE_ROOT/target}/release"

echo "Measured $(date -u +%Y-%m-%d) at $(git rev-parse --short HEAD) on $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start; medians of $runs runs ($guest_runs in the guest)."
echo
echo "**Device only** (the device model and a host memcpy, no driver):"
echo
BENCH_ROWS=migrate "$target/examples/bench_copy" "$runs"
say "migrate: loopback"
lb=$("$target/examples/bench_migrate" "$runs") || die "bench_migrate failed"
say "migrate: guest, 64 MiB x $guest_runs"
guest=$("$FAULTLINE_BIN" run --firmware "$FIRMWARE_BENCH_IMAGE" --memory 512M --timeout 3600 \
  --cmdline "bench=migrate mib=64 iterations=$guest_runs" 2>&1) ||
  die "faultline run bench=migrate failed: $(printf '%s\n' "$guest" | grep -E 'bench|FAIL|panic|error' | tail -3)"
printf '%s\n%s\n' "$lb" "$guest" | tr -d '\r' | python3 -c '
import statistics, sys
rows = {}
for line in sys.stdin:
    f = line.split()
    if len(f) < 3 or f[:2] != ["bench", "migrate"]:
        continue
    kv = dict(x.split("=", 1) for x in f[2:])
    key = (kv.pop("host"), int(kv.pop("bytes")))
    if "pages" in kv:
        key += (kv.pop("pages"),)
    for k, v in kv.items():
        rows.setdefault(key, {}).setdefault(k, []).append(int(v))
med = lambda key, k: statistics.median(rows[key][k])
gibs = lambda b, ns: b / ns * 1e9 / 2**30
size = lambda b: f"{b / 2**21:g} × 2 MiB ({b >> 20} MiB)" if b >= 2**20 else f"{b / 2**21:g} × 2 MiB ({b >> 10} KiB)"
print("**Through the driver, host loopback** (`MigrateList`: one batch of 32 × 2 MiB pages each way; the device model on its worker thread):")
print()
print("| bytes | direction | MIGRATE (GiB/s) | host memcpy (GiB/s) | ratio |")
print("|---|---|---|---|---|")
for (host, b) in sorted(k for k in rows if k[0] == "loopback-engine"):
    m = gibs(b, med((host, b), "memcpy_ns"))
    for d, k in (("system → VRAM", "to_device_ns"), ("VRAM → system", "to_system_ns")):
        g = gibs(b, med((host, b), k))
        print(f"| {b >> 20} MiB | {d} | {g:.2f} | {m:.2f} | **{g / m:.3f}** |")
print()
print("**migrate_vma of a process range** (4 KiB pages: collect and unmap, MIGRATE, install device-private entries; back: the same with fresh frames), against the CPU writing the fresh range (its first touch) and, in the loopback, one host memcpy of the same bytes; then the same range as a HUGE VMA (hmm-tests\x27 THP buffer), each 2 MiB page moved whole to a VRAM chunk of its own with one 2 MiB MIGRATE entry and back into a 2 MiB frame run (both checked), run right after the 4 KiB one, run by run. In the loopback each timed run is its fresh device\x27s second (the first, untimed, touches the host memory behind VRAM and the process once, as the engine rows do). 2 MiB / 4 KiB is hmm-tests\x27 \"improvement\" as a ratio of MiB/s; a range below 2 MiB holds no 2 MiB page (–):")
print()
print("| host | size | to VRAM (MiB/s) | to system (MiB/s) | CPU first-touch fill (MiB/s) | to VRAM / CPU fill | host memcpy (MiB/s) | 2 MiB pages: to VRAM (MiB/s) | 2 MiB pages: to system (MiB/s) | to VRAM, 2 MiB / 4 KiB | to system, 2 MiB / 4 KiB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
mibs = lambda b, ns: b / ns * 1e9 / 2**20
for k in sorted(rows, key=lambda k: (k[0] != "loopback", k[1])):
    if k[0] not in ("loopback", "guest") or k[2:] != ("4k",):
        continue
    host, b = k[0], k[1]
    to_d, to_s, fill = (mibs(b, med(k, x)) for x in ("to_device_ns", "to_system_ns", "cpu_fill_ns"))
    mc = "%.0f" % mibs(b, med(k, "memcpy_ns")) if "memcpy_ns" in rows[k] else "–"
    huge = "| – | – | – | –"
    h = (host, b, "2m")
    if h in rows:
        hd, hs = (mibs(b, med(h, x)) for x in ("to_device_ns", "to_system_ns"))
        huge = f"| {hd:.1f} | {hs:.1f} | **{hd / to_d:.2f}** | **{hs / to_s:.2f}**"
    print(f"| {host} | {size(b)} | {to_d:.1f} | {to_s:.1f} | {fill:.1f} | {to_d / fill:.2f} | {mc} {huge} |")
ft = sorted(k for k in rows if k[0] == "loopback-first-touch")
if ft:
    print()
    print("**Migrate on first touch** (host loopback: one GPU FILL over 256 × 64 KiB windows of a context with all of VRAM attached, each window one fault; `migrate=none` maps the pages where they are, `first_touch` migrates each window to VRAM first, its holes as zeroed VRAM pages, its CPU-written pages with their data):")
    print()
    print("| pages | none (µs per window) | first_touch (µs per window) | first_touch / none |")
    print("|---|---|---|---|")
    for k in ft:
        w = k[1] / (64 << 10)
        a, f = med(k, "none_ns") / w / 1e3, med(k, "first_touch_ns") / w / 1e3
        print(f"| {k[2]} | {a:.1f} | {f:.1f} | **{f / a:.2f}** |")
'
