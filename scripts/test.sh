#!/usr/bin/env bash
# Everything: lints, host tests (unit, integration, property, loopback),
# firmware build, the in-guest suite judged by the coherence checker under
# fault injection, the driver mutants, boot tests in faultline and in QEMU,
# a short hostile-guest soak, a short fuzz run.
#
# FAULTLINE_REQUIRE_KVM=1 turns a missing /dev/kvm, QEMU or fuzzer into a
# failure instead of a SKIP (CI sets it).
set -uo pipefail
. "$(dirname "$0")/lib.sh"
cd "$FAULTLINE_ROOT"

passed=0
failed=0
failures=()

step() {
  local name=$1
  shift
  say "[$name] $*"
  local t0=$SECONDS
  if "$@"; then
    passed=$((passed + 1))
    say "[$name] ok ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1))
    failures+=("$name")
    say "[$name] FAILED ($((SECONDS - t0)) s)"
  fi
}

toolchain() {
  ensure_guest_target || return 1
  if ! rustup component list --installed | grep -q '^clippy'; then
    rustup component add clippy rustfmt >&2 || return 1
  fi
}

# The device's test rigs (feature test-utils) are for tests, benchmarks and
# the fuzzer only: the faultline binary must not pull them in.
no_test_rigs_in_vmm() {
  if cargo tree -q -p faultline -e features -i faultline-device | grep -q test-utils; then
    say "the faultline binary enables faultline-device's test-utils"
    return 1
  fi
}

# The driver's test-only mutants (cargo feature `mutants`) exist in no
# default build: neither the host workspace nor the default firmware
# enables the feature (scripts/mutants.sh builds them on purpose).
no_mutants_by_default() {
  if cargo tree -q -e features -i faultline-driver | grep -q 'feature "mutants"' ||
    (cd firmware && cargo tree -q -e features -i faultline-driver) | grep -q 'feature "mutants"'; then
    say "a default build enables faultline-driver's mutants"
    return 1
  fi
}

lint() {
  no_test_rigs_in_vmm &&
    no_mutants_by_default &&
    cargo fmt --all -- --check &&
    (cd firmware && cargo fmt -- --check) &&
    cargo clippy -q --workspace --all-targets -- -D warnings &&
    (cd firmware && cargo clippy -q --release -- -D warnings) &&
    # The benchmarks compile only in the bench build; lint them there.
    (cd firmware && cargo clippy -q --release --features bench -- -D warnings) &&
    # Likewise the mutants and the tests that run them.
    (cd firmware && cargo clippy -q --release --features mutants -- -D warnings) &&
    cargo clippy -q -p faultline-driver --features mutants --all-targets -- -D warnings
}

qemu_boot() {
  if ! command -v qemu-system-x86_64 >/dev/null && ! apt_install qemu-system-x86; then
    skip_or_fail "qemu-system-x86_64 is not installed and cannot be installed here"
    return
  fi
  if ! kvm_usable; then
    skip_or_fail "/dev/kvm is not usable: QEMU boot tests need KVM"
    return
  fi
  # Two vCPUs: both machines list them in their ACPI MADT, the firmware
  # starts the second, and test=smp (in the default suite) checks both.
  # The timeout only catches a hang: each boot takes ~15-35 s here, and a
  # host busy with other work has made q35 take 70 s.
  export QEMU_TIMEOUT="${QEMU_TIMEOUT:-240}"
  QEMU_SMP=2 scripts/qemu-boot.sh microvm cpus=2 && QEMU_SMP=2 scripts/qemu-boot.sh q35 cpus=2 &&
    # TCG's software TLB changes only on invlpg / CR3 writes, so it catches a
    # missing TLB flush in the process mm that PVM's shadow paging hides.
    QEMU_ACCEL=tcg scripts/qemu-boot.sh microvm test=process
}

# SMP bring-up under faultline: every vCPU of --vcpus 2 comes up, reports
# itself through its per-CPU data and runs functions sent by IPI (test=smp,
# cpus=2: exactly two), and the MADT reader rejects hostile tables.
guest_smp() {
  if ! kvm_usable; then
    skip_or_fail "/dev/kvm is not usable: the SMP boot test needs KVM"
    return
  fi
  scripts/run.sh --vcpus 2 --cmdline "test=smp cpus=2"
}

# The default in-guest suite (self-tests, process mm, GPU, SVM) under
# faultline, judged by the device's coherence checker (fatal: a violation
# fails its command and makes faultline exit 6) under the injection mix,
# with its per-test lines in the log; vmm/tests also boots it plainly but
# only shows a failure's output.
guest_suite() {
  if ! kvm_usable; then
    skip_or_fail "/dev/kvm is not usable: the in-guest suite needs KVM"
    return
  fi
  local results="${TMPDIR:-/tmp}/faultline-results-$$.xml"
  # Two vCPUs (the second idles; test=smp checks it is up); vmm/tests
  # boots the suite at one.
  scripts/run.sh --vcpus 2 --results "$results" --gpu-check=fatal --gpu-inject "$FAULTLINE_INJECT_MIX" &&
    python3 -c 'import sys, xml.etree.ElementTree as E
r = E.parse(sys.argv[1]).getroot()
cases = r.findall(".//testcase")
bad = [c.get("name") for c in cases if c.find("failure") is not None]
print(f"results: {len(cases)} test cases in JUnit XML, {len(bad)} failed")
sys.exit(1 if bad or not cases else 0)' "$results"
  local rc=$?
  rm -f "$results"
  return $rc
}

# The shared SVM suite in the guest under two non-default fault-pipeline
# policies (docs/architecture.md "Fault pipeline policies"), under the
# fatal coherence checker. The names come from `svm_suite!`, less
# large_first_touch (256 MiB, minutes under a slow policy; the guest-suite
# step runs it under the default one).
POLICY_MIX=("batch:32,replay=batch_flush,prefetch=density:51" "batch:8,batches:4,replay=block")
guest_policies() {
  if ! kvm_usable; then
    skip_or_fail "/dev/kvm is not usable: the in-guest suite needs KVM"
    return
  fi
  local names p
  names=$(awk '/\$m! \{/ { on = 1; next } on && /\}/ { exit } on { gsub(/[ ,]/, ""); if ($0 != "" && $0 != "large_first_touch") printf "%s%s", sep, $0; sep = "," }' \
    guest-driver/src/gpu/suite/mod.rs)
  [ -n "$names" ] || { echo "no svm_suite! names found" >&2; return 1; }
  for p in "${POLICY_MIX[@]}"; do
    echo "svm=$p"
    scripts/run.sh --gpu-check=fatal --cmdline "test=$names svm=$p" || return 1
  done
}

# The judge judged: each of the driver's five test-only mutants must be
# caught by its suite test, in the loopback and in the guest, and each test
# must pass on the real driver (docs/testing.md "Mutants").
mutants() {
  if ! kvm_usable; then
    skip_or_fail "/dev/kvm is not usable: the mutants' guest runs need KVM"
    return
  fi
  scripts/mutants.sh
}

# The GPU served to QEMU 11 (vfio-user-pci) by `faultline serve`; the QEMU
# comes from a cached trixie root (scripts/qemu-setup.sh). A coherence
# violation makes the server exit 6, which qemu-run.sh reports as an error.
qemu_vfio_user() {
  if ! kvm_usable; then
    skip_or_fail "/dev/kvm is not usable: the vfio-user QEMU run needs KVM"
    return
  fi
  if ! scripts/qemu-setup.sh >/dev/null; then
    skip_or_fail "no QEMU with vfio-user-pci (scripts/qemu-setup.sh failed)"
    return
  fi
  # The same judge and injection mix as the guest suite under faultline,
  # at two vCPUs, with a smaller VRAM than the default so device memory runs at another
  # size than under `faultline run`.
  QEMU_SMP="${QEMU_SMP:-2}" \
    FAULTLINE_SERVE_ARGS="--gpu-check=fatal --gpu-inject $FAULTLINE_INJECT_MIX --gpu-vram 64M ${FAULTLINE_SERVE_ARGS:-}" \
    scripts/qemu-run.sh
}

# The seeded hostile-guest soak, short: gpu_hostile on two seeds and the
# fault flood, under `run` and under `serve` + QEMU (scripts/soak.sh checks
# exit status, recovery, panics, hangs, peak RSS and log lines of each run).
hostile_soak() {
  if ! kvm_usable; then
    skip_or_fail "/dev/kvm is not usable: the hostile-guest soak needs KVM"
    return
  fi
  local hosts="run serve"
  if ! scripts/qemu-setup.sh >/dev/null; then
    skip_or_fail "no QEMU with vfio-user-pci: the soak runs under faultline run only"
    hosts=run
  fi
  scripts/soak.sh -s "101 202" -n "${FAULTLINE_HOSTILE_ITERATIONS:-3000}" \
    -f "${FAULTLINE_FLOOD_CYCLES:-5000}" -H "$hosts"
}

# cargo-fuzz needs nightly for its sanitizer flags; the same harness also
# runs on stable inside the device's tests (fuzz_smoke).
fuzz_short() {
  if ! cargo +nightly --version >/dev/null 2>&1; then
    skip_or_fail "no nightly toolchain: the device fuzzer cannot be built"
    return
  fi
  if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz"
    cargo install --locked cargo-fuzz >&2 || return 1
  fi
  device/fuzz/run-short.sh "${FAULTLINE_FUZZ_SECS:-30}"
}

if ! kvm_usable; then
  skip_or_fail "/dev/kvm is not usable: boot tests will be skipped"
fi

step toolchain toolchain
step firmware scripts/build-firmware.sh
step lint lint
# Host tests include the boot tests in faultline (vmm/tests), which use the
# firmware built above.
step host-tests cargo test -q --workspace
step guest-smp guest_smp
step guest-suite guest_suite
step guest-policies guest_policies
step mutants mutants
step qemu-boot qemu_boot
step qemu-vfio-user qemu_vfio_user
step hostile-soak hostile_soak
step fuzz fuzz_short

echo
[ ${#failures[@]} -eq 0 ] || say "failed steps: ${failures[*]}"
echo "steps: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
