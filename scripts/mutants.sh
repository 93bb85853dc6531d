#!/usr/bin/env bash
# Runs every driver mutant (faultline_driver::gpu::mutant, cargo feature
# `mutants`) against the suite test meant to catch it, in the host loopback
# and in the guest under the coherence checker (--gpu-check=fatal) with the
# fault injection that opens the bug's window, and each test once more on
# the real driver, which must pass (so "caught" is not "always fails").
#
#   scripts/mutants.sh              all five
#   scripts/mutants.sh a c          some, by letter
#
# Prints `mutant | test | loopback caught | guest caught | violations`
# (violations: the device's coherence_violations count in the mutant's run,
# loopback/guest). Exit status 0 only if every mutant asked for was caught
# in both places and every real-driver run passed; 1 otherwise; 2 on bad
# arguments.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$FAULTLINE_ROOT"

# letter, name, the suite test that catches it (Mutant::test; the loopback
# line is checked against it), the --gpu-inject spec that opens the window
# ("-": none, the test opens it with a check hook).
MUTANTS=(
  "a no_ack_wait munmap_during_stream seed=7,tlb_ack_delay_us=20000"
  "b no_seq_check munmap_between_fault_and_map -"
  "c strongest_access window_access_per_page -"
  "d mprotect_no_flush mprotect_during_stream seed=7,tlb_ack_delay_steps=64"
  "e unmap_after_free munmap_frees_after_clear seed=7,tlb_ack_delay_steps=64"
)

want=("$@")
for w in "${want[@]}"; do
  [[ $w =~ ^[a-e]$ ]] || { echo "usage: scripts/mutants.sh [a|b|c|d|e]..." >&2; exit 2; }
done
selected() { [ ${#want[@]} -eq 0 ] || [[ " ${want[*]} " == *" $1 "* ]]; }

kvm_usable || die "/dev/kvm is missing or not accessible: the guest runs need KVM"
image=$(scripts/build-firmware.sh --mutants)
build_vmm
say "building the loopback with --features mutants"
cargo test -q -p faultline-driver --features mutants --test svm_mutants --no-run >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One guest run: test $1, injection $2, extra command-line words $3; sets
# rc, line (the test's result line) and viol (coherence violations).
guest() {
  local test=$1 spec=$2 extra=$3 args=(--gpu-check=fatal --stats-json "$work/stats.json")
  [ "$spec" = - ] || args+=(--gpu-inject "$spec")
  rm -f "$work/stats.json"
  rc=0
  timeout 600 "$FAULTLINE_BIN" run --firmware "$image" "${args[@]}" \
    --cmdline "test=$test $extra" >"$work/out" 2>&1 || rc=$?
  line=$(grep -m1 "^test $test " "$work/out" || true)
  viol=$(jq -r '.gpu["lifetime.coherence_violations"] // "?"' "$work/stats.json" 2>/dev/null || echo "?")
}

status=0
rows=()
for entry in "${MUTANTS[@]}"; do
  read -r letter name test spec <<<"$entry"
  selected "$letter" || continue
  say "mutant $letter ($name): $test, inject ${spec}"

  # Loopback: the case passes the test on the real driver, then requires
  # the mutant to fail it, both under the loopback's checker (fatal by
  # default) and this mutant's injection.
  lb=no lb_viol="?" lb_env=(env -u FAULTLINE_LOOPBACK_INJECT)
  [ "$spec" = - ] || lb_env=(env "FAULTLINE_LOOPBACK_INJECT=$spec")
  "${lb_env[@]}" cargo test -q -p faultline-driver --features mutants --test svm_mutants -- \
    --exact "$name" --nocapture >"$work/lb" 2>&1 && lb=yes
  lb_line=$(grep -m1 -o "mutant $letter $name: .*" "$work/lb" || true)
  if [ -z "$lb_line" ]; then
    lb=no
    sed 's/^/  loopback: /' "$work/lb" | tail -20 >&2
  elif [[ $lb_line != "mutant $letter $name: $test: inject $spec: "* ]]; then
    say "the loopback pairs $name with another test or injection: $lb_line"
    lb=no
  else
    lb_viol=$(sed -n 's/.*(\([0-9]*\) violations)$/\1/p' <<<"$lb_line")
    echo "  loopback: ${lb_line#*: }" >&2
  fi

  # Guest: the real driver must pass, the mutant must fail the test (exit 1:
  # the guest reported it; 6: the checker's fatal status) with its FAILED line.
  gu=no
  guest "$test" "$spec" ""
  if [ "$rc" != 0 ] || [[ $line != "test $test ... ok"* ]] || [ "$viol" != 0 ]; then
    say "real driver: $test did not pass in the guest (exit $rc, violations $viol): ${line:-no result line}"
    tail -20 "$work/out" | sed 's/^/  guest: /' >&2
  else
    # As in the loopback (svm_mutants.rs TRIES): a window a late ack
    # opens can close before the device uses it, so up to three runs.
    for try in 1 2 3; do
      guest "$test" "$spec" "mutant=$letter"
      if { [ "$rc" = 1 ] || [ "$rc" = 6 ]; } && [[ $line == "test $test ... FAILED"* ]]; then
        gu=yes
        break
      fi
    done
    if [ "$gu" = yes ]; then
      echo "  guest: ${line#*FAILED: } (exit $rc, run $try)" >&2
    else
      say "mutant $letter not caught in the guest (exit $rc): ${line:-no result line}"
      tail -20 "$work/out" | sed 's/^/  guest: /' >&2
    fi
  fi
  [ "$lb" = yes ] && [ "$gu" = yes ] || status=1
  rows+=("$letter $name|$test|$lb|$gu|$lb_viol/$viol")
done

printf '\n| mutant | test | loopback caught | guest caught | violations (loopback/guest) |\n'
printf '|---|---|---|---|---|\n'
for r in "${rows[@]}"; do
  IFS='|' read -r m t l g v <<<"$r"
  printf '| %s | %s | %s | %s | %s |\n' "$m" "$t" "$l" "$g" "$v"
done
exit "$status"
