#!/usr/bin/env bash
# Seeded hostile-guest soak: runs the firmware's gpu_hostile test (a
# malicious driver: random BAR0 traffic, rings and page tables at random
# addresses, random commands, RESETs; then RESET, reset values, probe,
# FILL + COPY) for each seed, under `faultline run` and under
# `faultline serve` + QEMU 11 (scripts/qemu-run.sh), and checks each run:
#
#   exit status 0, the guest's "test gpu_hostile ... ok" (the device
#   recovered), no panic, no timeout (a hang), peak RSS of the VMM / the
#   server <= SOAK_MAX_RSS_KIB (default 65536), log lines <= SOAK_MAX_LOG
#   (default 100).
#
# With -f CYCLES it also runs gpu_fault_flood (a never-drained 2-entry
# fault buffer flooded by 512 faulting threads per cycle, then a context
# cancel or a channel restart) for CYCLES cycles per host, with the same
# checks: there the peak-RSS bound is what shows the device's fault
# bookkeeping stays bounded.
#
#   scripts/soak.sh [-s "SEED..."] [-n ITERATIONS] [-f CYCLES] [-H "run serve"]
#
# Defaults: seeds "1 2 3", 20000 iterations, no flood, both hosts. -s ""
# runs no gpu_hostile seed (a flood alone). One line per run,
# then a summary; exit 0 when every check of every run passed, 1 otherwise,
# 2 on bad usage or a missing prerequisite.
#
# Peak RSS: `process.peak_rss_kib` from --stats-json (the VMM's or the
# server's getrusage maximum); if a file lacks it, for `run` /usr/bin/time's
# maximum RSS, and for `serve` the server's VmHWM from /proc, sampled every
# 0.2 s while it runs. Log lines: the VMM's (or server's) stderr lines,
# without the --stats block and the scripts' own "==>" lines.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$FAULTLINE_ROOT"

seeds="1 2 3"
iterations=20000
hosts="run serve"
cycles=0
while getopts "s:n:f:H:h" opt; do
  case $opt in
    s) seeds=$OPTARG ;;
    n) iterations=$OPTARG ;;
    f) cycles=$OPTARG ;;
    H) hosts=$OPTARG ;;
    *) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
[[ "$iterations" =~ ^[0-9]+$ ]] || { say "soak: -n wants a number, got '$iterations'"; exit 2; }
[[ "$cycles" =~ ^[0-9]+$ ]] || { say "soak: -f wants a number, got '$cycles'"; exit 2; }
for h in $hosts; do
  [ "$h" = run ] || [ "$h" = serve ] || { say "soak: unknown host '$h' (run, serve)"; exit 2; }
done
max_rss=${SOAK_MAX_RSS_KIB:-65536}
max_log=${SOAK_MAX_LOG:-100}
# Generous: ~2 ms an iteration (10 ms a flood cycle) where KVM is
# nested, more under load.
timeout_s=$((120 + iterations / 100 + cycles / 20))

kvm_usable || { say "soak: /dev/kvm is not usable"; exit 2; }
[ -x /usr/bin/time ] || apt_install time || { say "soak: /usr/bin/time is missing"; exit 2; }
scripts/build-firmware.sh >/dev/null || exit 2
build_vmm || exit 2
# A serve run needs QEMU 11 with vfio-user-pci: a missing one is a missing
# prerequisite, not a failed run.
if [[ " $hosts " == *" serve "* ]]; then
  scripts/qemu-setup.sh >/dev/null || { say "soak: no QEMU with vfio-user-pci (scripts/qemu-setup.sh failed)"; exit 2; }
fi

work=$(mktemp -d /tmp/faultline-soak.XXXXXX)
trap 'rm -rf "$work"' EXIT
runs=0
bad=0

# peak_rss_kib from a --stats-json file, or nothing.
json_rss() {
  [ -s "$1" ] || return 0
  sed -n 's/.*"peak_rss_kib"[[:space:]]*:[[:space:]]*\([0-9]*\).*/\1/p' "$1" | head -n 1
}

log_lines() {
  grep -v -e '^==>' -e '^build-firmware: ' -e '^  ' -e '^faultline: GPU counters' -e '^faultline: process:$' -e '^[[:space:]]*$' "$1" | wc -l
}

# check HOST STATUS SERIAL STDERR RSS_KIB (uses $test, $what)
check() {
  local name=$1 status=$2 serial=$3 err=$4 rss=$5 fails=()
  local lines recovered=no
  lines=$(log_lines "$err")
  tr -d '\r' <"$serial" | grep -q "^test $test \.\.\. ok$" && recovered=yes
  [ "$status" = 0 ] || fails+=("exit status $status")
  [ "$recovered" = yes ] || fails+=("not recovered")
  if grep -aq -e 'PANIC' -e 'panicked' "$serial" "$err"; then fails+=("panic"); fi
  if grep -aq -e 'timeout expired' -e 'timed out' -e 'QEMU timeout' "$err" || [ "$status" = 124 ] || [ "$status" = 5 ]; then
    fails+=("hang")
  fi
  if [ -z "$rss" ]; then
    fails+=("peak RSS not measured")
  elif [ "$rss" -gt "$max_rss" ]; then
    fails+=("peak RSS $rss KiB > $max_rss")
  fi
  [ "$lines" -le "$max_log" ] || fails+=("$lines log lines > $max_log")
  runs=$((runs + 1))
  local verdict=ok
  if [ ${#fails[@]} -gt 0 ]; then
    bad=$((bad + 1))
    verdict="FAILED: $(IFS=';'; echo "${fails[*]}")"
  fi
  printf 'soak %-5s %s: exit %s, recovered %s, peak RSS %s KiB, %s log lines ... %s\n' \
    "$name" "$what" "$status" "$recovered" "${rss:-?}" "$lines" "$verdict"
}

todo=()
for seed in $seeds; do todo+=("hostile:$seed"); done
[ "$cycles" -gt 0 ] && todo+=("flood:$cycles")

for job in "${todo[@]}"; do
  case $job in
    hostile:*)
      seed=${job#hostile:}
      test=gpu_hostile
      what="gpu_hostile seed $seed, $iterations iterations"
      cmd="test=gpu_hostile seed=$seed iterations=$iterations"
      ;;
    flood:*)
      test=gpu_fault_flood
      what="gpu_fault_flood, $cycles cycles"
      cmd="test=gpu_fault_flood cycles=$cycles"
      ;;
  esac
  for h in $hosts; do
    d="$work/$h-${job/:/-}"
    mkdir -p "$d"
    if [ "$h" = run ]; then
      /usr/bin/time -o "$d/time" -f '%M' "$FAULTLINE_BIN" run --firmware "$FIRMWARE_IMAGE" \
        --timeout "$timeout_s" --stats-json "$d/stats.json" --cmdline "$cmd" \
        >"$d/serial" 2>"$d/err"
      status=$?
      rss=$(json_rss "$d/stats.json")
      [ -n "$rss" ] || rss=$(tail -n 1 "$d/time" 2>/dev/null | grep -E '^[0-9]+$' || true)
      check run "$status" "$d/serial" "$d/err" "$rss"
    else
      # shellcheck disable=SC2086 # qemu-run.sh takes the command line as words
      QEMU_TIMEOUT=$timeout_s QEMU_RUN_LOG="$d/serial" \
        FAULTLINE_SERVE_ARGS="--stats-json $d/stats.json" \
        scripts/qemu-run.sh $cmd >/dev/null 2>"$d/err" &
      qpid=$!
      hwm=""
      while kill -0 "$qpid" 2>/dev/null; do
        # The server is qemu-run.sh's child; VmHWM only grows.
        for c in $(cat "/proc/$qpid/task/$qpid/children" 2>/dev/null); do
          if [ "$(cat "/proc/$c/comm" 2>/dev/null)" = faultline ]; then
            v=$(awk '/^VmHWM:/ {print $2}' "/proc/$c/status" 2>/dev/null || true)
            [ -n "$v" ] && hwm=$v
          fi
        done
        sleep 0.2
      done
      wait "$qpid"
      status=$?
      rss=$(json_rss "$d/stats.json")
      [ -n "$rss" ] || rss=$hwm
      [ -f "$d/serial" ] || : >"$d/serial"
      check serve "$status" "$d/serial" "$d/err" "$rss"
    fi
    if [ "${SOAK_KEEP:-}" ]; then
      mkdir -p "$SOAK_KEEP" && cp -r "$d" "$SOAK_KEEP/"
    fi
  done
done

echo "soak: $((runs - bad)) passed, $bad failed"
[ "$bad" -eq 0 ]
