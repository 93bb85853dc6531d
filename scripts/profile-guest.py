#!/usr/bin/env python3
"""Names the functions of a `faultline run --profile-guest` profile.

    scripts/profile-guest.py PROFILE [IMAGE] [--top N]

IMAGE defaults to the firmware scripts/build-firmware.sh builds. Symbols
come from binutils' `nm -C -n` (demangled, address order); each sample goes
to the function whose range holds its RIP (CPL3 samples of the firmware's
agent show as the agent's symbols, RIPs outside every symbol as `?`).
Prints samples, percent and function, most first; standard library only.
"""

import argparse
import bisect
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IMAGE = os.path.join(
    ROOT, "firmware/target/x86_64-unknown-none/release/faultline-firmware")


def symbols(image):
    out = subprocess.run(["nm", "-C", "-n", "--defined-only", image],
                         check=True, capture_output=True, text=True).stdout
    addrs, names = [], []
    for line in out.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in "tTwW":
            addrs.append(int(parts[0], 16))
            names.append(parts[2])
    return addrs, names


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile")
    ap.add_argument("image", nargs="?", default=DEFAULT_IMAGE)
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    try:
        addrs, names = symbols(a.image)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"profile-guest: reading symbols of {a.image}: {e}")
    per_fn, total, header = {}, 0, ""
    with open(a.profile) as f:
        for line in f:
            if line.startswith("#"):
                header = header or line.strip()
                continue
            n, rip, cpl = line.split()
            n, rip = int(n), int(rip, 16)
            i = bisect.bisect_right(addrs, rip) - 1
            name = names[i] if i >= 0 else "?"
            key = f"{name}{' [CPL3]' if cpl == '3' else ''}"
            per_fn[key] = per_fn.get(key, 0) + n
            total += n
    print(header)
    if not total:
        sys.exit("profile-guest: no samples")
    for name, n in sorted(per_fn.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"{n:8} {100 * n / total:6.2f}%  {name}")


if __name__ == "__main__":
    main()
