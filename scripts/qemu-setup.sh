#!/usr/bin/env bash
# Provides a QEMU with the vfio-user client (vfio-user-pci, QEMU >= 10.1):
# a minimal Debian trixie root with qemu-system-x86 from trixie-backports,
# built once with debootstrap and cached outside the repository.
#
#   scripts/qemu-setup.sh            # prints the root directory on stdout
#
# Environment: FAULTLINE_QEMU_ROOT (default ~/.cache/faultline/qemu-trixie).
# The apt mirror is the one this host's own apt sources use, so the script
# works wherever the host's apt does. Needs root (debootstrap, chroot).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

root="${FAULTLINE_QEMU_ROOT:-$HOME/.cache/faultline/qemu-trixie}"
has_vfio_user() {
  [ -f "$1/.faultline-qemu-ready" ] && chroot "$1" qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vfio-user-pci"'
}

if has_vfio_user "$root"; then
  say "QEMU root $root is ready ($(chroot "$root" qemu-system-x86_64 --version | head -n 1))"
  echo "$root"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "building the QEMU root needs root (debootstrap, chroot)"

# The Debian archive URI of the host's apt sources: deb822 "URIs:" stanzas
# or one-line "deb URI suite ..." entries, skipping the security archive.
host_mirror() {
  local f uri
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' "$f" | grep -v -- '-security' | grep -i debian | head -n 1 || true)
    [ -n "$uri" ] && { echo "${uri%/}"; return; }
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' "$f" |
      grep -v -- '-security' | grep -i debian | head -n 1 || true)
    [ -n "$uri" ] && { echo "${uri%/}"; return; }
  done
  return 1
}

mirror=$(host_mirror) || die "no Debian mirror found in /etc/apt/sources.list*; cannot debootstrap"
say "building a Debian trixie root for QEMU in $root (mirror from the host's apt sources: $mirror)"
apt_install debootstrap || die "debootstrap is missing and cannot be installed"

partial="$root.partial"
cleanup() {
  mountpoint -q "$partial/proc" 2>/dev/null && umount "$partial/proc"
  return 0
}
trap cleanup EXIT
cleanup
rm -rf "$partial"
mkdir -p "$(dirname "$root")"
say "debootstrap --variant=minbase trixie (about a minute)"
debootstrap --variant=minbase trixie "$partial" "$mirror" >"$partial.log" 2>&1 ||
  die "debootstrap failed; see $partial.log"
echo "deb $mirror trixie-backports main" >"$partial/etc/apt/sources.list.d/backports.list"
mount -t proc proc "$partial/proc"
say "installing qemu-system-x86 from trixie-backports"
{
  chroot "$partial" apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive chroot "$partial" apt-get install -y -qq --no-install-recommends \
      -t trixie-backports qemu-system-x86 &&
    chroot "$partial" apt-get clean
} >>"$partial.log" 2>&1 || die "installing QEMU in the trixie root failed; see $partial.log"
cleanup
touch "$partial/.faultline-qemu-ready"
has_vfio_user "$partial" || die "the trixie-backports QEMU has no vfio-user-pci device"
rm -rf "$root"
mv "$partial" "$root"
rm -f "$partial.log"
say "QEMU root ready: $(chroot "$root" qemu-system-x86_64 --version | head -n 1)"
echo "$root"
