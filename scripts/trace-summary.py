#!/usr/bin/env python3
"""Fault-latency percentiles by window size from a `faultline --gpu-trace` file.

Usage: scripts/trace-summary.py TRACE.json

A fault's latency runs from the device raising it (its "fault 0x..." span
begins) to the REPLAY the device received after it (the span ends). Each
fault is put under the size of the driver window that serviced it: the
"window serviced" event of its context covering its page, between the raise
and the replay. Faults no window covered (cancelled ones, or a trace
without the driver's events) are listed as "none".

Exit status: 0 printed, 1 the file cannot be read or is not a trace (one
line on stderr), 2 usage.
"""

import json
import math
import signal
import sys


def percentile(sorted_values, p):
    """Nearest-rank percentile of a sorted, non-empty list."""
    k = math.ceil(p / 100.0 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, k))]


def load(path):
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    if not isinstance(events, list):
        raise ValueError("traceEvents is not a list")
    other = doc.get("otherData", {}) if isinstance(doc, dict) else {}
    return events, other


def faults_and_windows(events):
    begins = {}
    faults = []  # (context, va, raised, replayed)
    windows = []  # (context, start, size, ts)
    for e in events:
        ph, cat = e.get("ph"), e.get("cat")
        if cat == "fault" and ph == "b":
            args = e.get("args", {})
            begins[e["id"]] = (args.get("context", 0), int(args["va"], 16), e["ts"])
        elif cat == "fault" and ph == "e" and e["id"] in begins:
            ctx, va, raised = begins.pop(e["id"])
            faults.append((ctx, va, raised, e["ts"]))
        elif e.get("name") == "window serviced" and e.get("pid") == 2:
            args = e["args"]
            end = e["ts"] + e.get("dur", 0)
            windows.append((args.get("context", 0), int(args["va"], 16), args["size"], end))
    return faults, windows


def window_size(fault, windows):
    ctx, va, raised, replayed = fault
    for wctx, start, size, ts in windows:
        if wctx == ctx and start <= va < start + size and raised <= ts <= replayed:
            return size
    return None


def size_label(size):
    if size is None:
        return "none"
    if size % (1 << 20) == 0:
        return "%d MiB" % (size >> 20)
    if size % 1024 == 0:
        return "%d KiB" % (size >> 10)
    return "%d B" % size


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    try:
        events, other = load(argv[1])
        faults, windows = faults_and_windows(events)
    except OSError as err:
        print("trace-summary: cannot read %s: %s" % (argv[1], err.strerror), file=sys.stderr)
        return 1
    except (ValueError, KeyError, TypeError) as err:
        print("trace-summary: %s: not a faultline trace (%s)" % (argv[1], err), file=sys.stderr)
        return 1
    windows.sort(key=lambda w: w[3])
    groups = {}
    for f in faults:
        groups.setdefault(window_size(f, windows), []).append(f[3] - f[2])
    print("faults %d (raise -> replay), windows %d, events dropped %s (driver %s)" % (
        len(faults), len(windows), other.get("dropped", "?"), other.get("guest_dropped", "?")))
    print("| window | faults | p50 (us) | p90 (us) | p99 (us) | max (us) |")
    print("|---|---|---|---|---|---|")
    for size in sorted(groups, key=lambda s: (s is None, s or 0)):
        lat = sorted(groups[size])
        print("| %s | %d | %.1f | %.1f | %.1f | %.1f |" % (
            size_label(size), len(lat), percentile(lat, 50), percentile(lat, 90),
            percentile(lat, 99), lat[-1]))
    return 0


if __name__ == "__main__":
    # A reader that stops early (`| head`) ends the script quietly.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main(sys.argv))
