#!/usr/bin/env bash
# Benchmarks, each measured side by side with its baseline in one run and
# reported as a ratio. Results are printed and written into
# docs/performance.md between the markers of each benchmark.
#
#   scripts/bench.sh [boot|device|hmm|loopback|exits|faults|policies|migrate|all] [runs]
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

us_now() { echo "${EPOCHREALTIME/./}"; }

# One `faultline run`: sets wall, entry, guest, after (µs): process start to
# the vCPU's first KVM_RUN, first KVM_RUN to the exit-port write, exit port
# to the process reaped. The VMM's `timing:` debug lines carry its clock;
# this shell's clock brackets the process.
fl_boot() {
  local image=$1 cmdline=$2 log t0 t1 e s
  log=$(mktemp)
  t0=$(us_now)
  "$FAULTLINE_BIN" run --firmware "$image" --log-level debug --cmdline "$cmdline" >/dev/null 2>"$log" ||
    { cat "$log" >&2; rm -f "$log"; die "faultline run --firmware $image failed"; }
  t1=$(us_now)
  e=$(sed -n 's/.*timing: entering the guest at \([0-9]*\) us.*/\1/p' "$log" | head -1)
  s=$(sed -n 's/.*timing: stop requested at \([0-9]*\) us.*/\1/p' "$log" | head -1)
  rm -f "$log"
  [ -n "$e" ] && [ -n "$s" ] || die "faultline printed no timing: lines (--log-level debug)"
  wall=$((t1 - t0)) entry=$((e - t0)) guest=$((s - e)) after=$((t1 - s))
}

# One QEMU microvm boot with the debug console, traced: sets wall, toexit
# (process start to the exit-port write: QEMU's own start, its firmware
# qboot, then the guest) and after (exit port to the process reaped). The
# exit-port write is the last KVM exit QEMU traces.
qm_boot() {
  local image=$1 cmdline=$2 log t0 t1 x
  log=$(mktemp)
  t0=$(us_now)
  qemu-system-x86_64 -M microvm -accel kvm -cpu host,-arch-capabilities -m 512M -nodefaults -no-reboot \
    -display none -serial null -chardev null,id=dbg -device isa-debugcon,iobase=0xe9,chardev=dbg \
    -kernel "$image" -append "$cmdline" -device isa-debug-exit,iobase=0xf4,iosize=0x04 \
    -msg timestamp=on -trace kvm_run_exit >/dev/null 2>"$log" || [ $? -eq 1 ] ||
    { tail -5 "$log" >&2; rm -f "$log"; die "QEMU microvm boot of $image failed"; }
  t1=$(us_now)
  x=$(sed -n 's/^[0-9]*@\([0-9]*\)\.\([0-9]*\):kvm_run_exit.*/\1\2/p' "$log" | tail -1)
  rm -f "$log"
  [ -n "$x" ] || die "QEMU traced no kvm_run_exit (is its trace backend 'log'?)"
  wall=$((t1 - t0)) toexit=$((x - t0)) after=$((t1 - x))
}

ms() { awk -v u="$1" 'BEGIN { printf "%.1f", u / 1000 }'; }
med() { printf '%s\n' "$@" | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

bench_boot() {
  kvm_usable || die "boot benchmark needs /dev/kvm"
  command -v qemu-system-x86_64 >/dev/null || apt_install qemu-system-x86 ||
    die "boot benchmark needs qemu-system-x86_64"
  scripts/build-firmware.sh >/dev/null
  build_vmm
  local min
  min=$(scripts/pvh-min/build.sh)
  # Debian 12's QEMU 7.2 aborts setting IA32_ARCH_CAPABILITIES under nested
  # KVM with plain `-cpu host`; the feature is irrelevant to this guest.
  local i wall entry guest after toexit
  local fd_w=() fd_e=() fd_g=() fd_a=() fm_w=() fm_e=() fm_g=() fm_a=()
  local qd_w=() qd_x=() qd_a=() qm_w=() qm_x=() qm_a=()
  say "boot: $runs runs each of faultline and QEMU microvm on the default image (list=1) and a minimal PVH image, interleaved"
  for i in $(seq "$runs"); do
    fl_boot "$FIRMWARE_IMAGE" list=1
    fd_w+=("$wall") fd_e+=("$entry") fd_g+=("$guest") fd_a+=("$after")
    fl_boot "$min" ""
    fm_w+=("$wall") fm_e+=("$entry") fm_g+=("$guest") fm_a+=("$after")
    qm_boot "$FIRMWARE_IMAGE" list=1
    qd_w+=("$wall") qd_x+=("$toexit") qd_a+=("$after")
    qm_boot "$min" ""
    qm_w+=("$wall") qm_x+=("$toexit") qm_a+=("$after")
  done
  local fdw fde fdg fda fmw fme fmg fma qdw qdx qda qmw qmx qma fl_over qm_over
  fdw=$(med "${fd_w[@]}") fde=$(med "${fd_e[@]}") fdg=$(med "${fd_g[@]}") fda=$(med "${fd_a[@]}")
  fmw=$(med "${fm_w[@]}") fme=$(med "${fm_e[@]}") fmg=$(med "${fm_g[@]}") fma=$(med "${fm_a[@]}")
  qdw=$(med "${qd_w[@]}") qdx=$(med "${qd_x[@]}") qda=$(med "${qd_a[@]}")
  qmw=$(med "${qm_w[@]}") qmx=$(med "${qm_x[@]}") qma=$(med "${qm_a[@]}")
  fl_over=$(med $(for i in "${!fm_e[@]}"; do echo $((fm_e[i] + fm_a[i])); done))
  qm_over=$(med $(for i in "${!qm_x[@]}"; do echo $((qm_x[i] + qm_a[i])); done))
  # Where the default image's guest time goes: one more boot at
  # loglevel=debug, whose "boot phases" line the firmware times with TSC
  # marks (that run's own debug lines add to its phases; not in the medians).
  local phases
  phases=$("$FAULTLINE_BIN" run --firmware "$FIRMWARE_IMAGE" --cmdline "list=1 loglevel=debug" |
    sed -n 's/.*boot phases: //p' | head -1)
  [ -n "$phases" ] || die "the firmware printed no boot phases at loglevel=debug"

  # The whole default suite on both, as before: same work on both sides, no
  # GPU, so the GPU tests skip on both.
  local fl=() qm=() t0
  for i in $(seq "$runs"); do
    t0=$(us_now)
    "$FAULTLINE_BIN" run --firmware "$FIRMWARE_IMAGE" --memory 512M --no-gpu --cmdline gpu=optional >/dev/null ||
      die "faultline run failed"
    fl+=($((($(us_now) - t0) / 1000)))
    t0=$(us_now)
    qemu-system-x86_64 -M microvm -accel kvm -cpu host,-arch-capabilities -m 512M -nodefaults -no-reboot \
      -display none -serial null -chardev null,id=dbg -device isa-debugcon,iobase=0xe9,chardev=dbg \
      -kernel "$FIRMWARE_IMAGE" -append gpu=optional \
      -device isa-debug-exit,iobase=0xf4,iosize=0x04 >/dev/null 2>&1 || [ $? -eq 1 ] ||
      die "QEMU microvm boot failed"
    qm+=($((($(us_now) - t0) / 1000)))
  done
  local f q
  f=$(printf '%s\n' "${fl[@]}" | median)
  q=$(printf '%s\n' "${qm[@]}" | median)
  record boot <<MD
Measured $stamp; $runs runs of each row, interleaved; 512 MiB, 1 vCPU;
medians in ms. "default" is the firmware image with \`list=1\` (boot,
print the test names, exit); "minimal" is \`scripts/pvh-min\`, a PVH
image whose only work is writing the exit port. Under faultline the
firmware prints through its line console on port 0xe0 (one exit per
print; the \`list=1\` listing is built with the image and leaves in one
write); under QEMU through the debug console on port 0xe9 (one
\`rep outsb\` per print, one exit per byte under this host's KVM). For
faultline, "start → entry" is process start to the vCPU's first KVM_RUN
and "guest" from there to the exit-port write (the VMM's \`timing:\` debug
lines); QEMU cannot show where our image starts, so its "start → exit port"
holds its own start, its firmware (qboot) and the guest. "exit → reaped" is
the exit-port write to the process reaped.

| host | image | wall | start → entry | guest | start → exit port | exit → reaped |
|---|---|---|---|---|---|---|
| \`faultline run\` | default | $(ms "$fdw") | $(ms "$fde") | $(ms "$fdg") | $(ms $((fde + fdg))) | $(ms "$fda") |
| \`faultline run\` | minimal | $(ms "$fmw") | $(ms "$fme") | $(ms "$fmg") | $(ms $((fme + fmg))) | $(ms "$fma") |
| QEMU $(qemu-system-x86_64 --version | head -1 | awk '{print $4}') \`-M microvm\` | default | $(ms "$qdw") | – | – | $(ms "$qdx") | $(ms "$qda") |
| QEMU \`-M microvm\` | minimal | $(ms "$qmw") | – | – | $(ms "$qmx") | $(ms "$qma") |

- **default / minimal under faultline (wall): $(ratio "$fdw" "$fmw")** (target ≤ 2).
- **VMM overhead, faultline / QEMU microvm: $(ratio "$fl_over" "$qm_over")** (target ≤ 0.3):
  faultline's start → entry plus exit → reaped on the minimal image
  ($(ms "$fl_over") ms) against QEMU's start → exit port plus exit → reaped
  on the same image ($(ms "$qm_over") ms).

The default image's guest time by boot phase (µs), from one more boot at
\`loglevel=debug\` (the firmware's TSC marks; that run's debug lines add
to its phases): $phases.

The whole default self-test suite, \`gpu=optional\` and no GPU on either side
(the GPU tests skip), wall time from process start to exit:

| host | median (ms) | all runs (ms) |
|---|---|---|
| \`faultline run\` | $f | ${fl[*]} |
| QEMU \`-M microvm\` | $q | ${qm[*]} |

**faultline / QEMU microvm median ratio: $(ratio "$f" "$q")** (below 1: faultline is faster).
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
  device | hmm | loopback | exits | faults | policies | migrate) bench_script "$what" ;;
  all)
    bench_boot
    for b in device hmm loopback exits faults policies migrate; do bench_script "$b"; done
    ;;
  *) die "unknown benchmark '$what' (boot, device, hmm, loopback, exits, faults, policies, migrate, all)" ;;
esac
