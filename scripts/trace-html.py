#!/usr/bin/env python3
"""A static picture of a `faultline --gpu-trace` file: one HTML page with an
SVG timeline, a track per process and thread as Perfetto's UI lays them out,
for where that UI is not at hand (docs/fault-timeline.png is made with it).

Usage: scripts/trace-html.py TRACE.json OUT.html [FROM_US TO_US]

Without a time range it shows the first fault the device raised, from a
little before its raise to the end of the command that waited on it.
Standard library only. Exit status: 0 written, 1 unreadable trace or no
fault in it (one line on stderr), 2 usage.
"""

import html
import json
import signal
import sys

WIDTH = 1500
LEFT = 230
ROW = 34


def first_fault_range(events):
    raised = next(e for e in events if e.get("ph") == "b" and e.get("cat") == "fault")
    t0, ch = raised["ts"], raised["args"]["channel"]
    ends = [e["ts"] + e.get("dur", 0) for e in events
            if e.get("ph") == "X" and e.get("pid") == 1 and e.get("tid") == 10 + ch
            and e["ts"] <= t0 <= e["ts"] + e.get("dur", 0)]
    t1 = ends[0] if ends else t0 + 1000
    pad = (t1 - t0) * 0.04
    return t0 - pad, t1 + pad


def main(argv):
    if len(argv) not in (3, 5):
        print(__doc__.strip().splitlines()[4], file=sys.stderr)
        return 2
    try:
        with open(argv[1], encoding="utf-8") as f:
            doc = json.load(f)
        events = doc["traceEvents"]
        lo, hi = (float(argv[3]), float(argv[4])) if len(argv) == 5 else first_fault_range(events)
    except (OSError, ValueError, KeyError, TypeError, StopIteration) as err:
        print("trace-html: %s: no fault to show (%s)" % (argv[1], err or "no fault raised"),
              file=sys.stderr)
        return 1
    names, tracks = {}, []
    for e in events:
        if e.get("ph") == "M":
            key = (e["pid"], e.get("tid"))
            names[key] = e["args"]["name"]
    used = sorted({(e["pid"], e["tid"]) for e in events if e.get("ph") != "M"})
    for key in used:
        tracks.append(key)
    row = {k: i for i, k in enumerate(tracks)}
    scale = (WIDTH - LEFT - 20) / max(hi - lo, 1e-9)
    x = lambda t: LEFT + (t - lo) * scale
    height = 50 + ROW * len(tracks)
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
           'font-family="sans-serif" font-size="12">' % (WIDTH, height)]
    out.append('<rect width="100%" height="100%" fill="white"/>')
    out.append('<text x="6" y="16" font-weight="bold">%s</text>' % html.escape(
        "%s: %.0f µs from %.0f µs" % (argv[1].rsplit("/", 1)[-1], hi - lo, lo)))
    for k, i in row.items():
        y = 40 + i * ROW
        label = "%s / %s" % (names.get((k[0], None), "pid %d" % k[0]),
                             names.get(k, "tid %d" % k[1]))
        out.append('<rect x="0" y="%d" width="%d" height="%d" fill="%s"/>' % (
            y, WIDTH, ROW, "#f4f6f8" if i % 2 else "#ffffff"))
        out.append('<text x="6" y="%d">%s</text>' % (y + 21, html.escape(label)))
    # Time axis, from the left edge.
    step = 10 ** max(0, len(str(int((hi - lo) / 5))) - 1)
    rel = step
    while lo + rel < hi:
        t = lo + rel
        out.append('<line x1="%.1f" y1="30" x2="%.1f" y2="%d" stroke="#ddd"/>' % (x(t), x(t), height))
        out.append('<text x="%.1f" y="24" fill="#555">+%g µs</text>' % (x(t) + 2, rel))
        rel += step
    opened = {}
    # Per track: where the last instant label ended, and the async lane.
    label_end, lane = {}, {}
    for e in events:
        ph = e.get("ph")
        if ph == "M" or (e["pid"], e["tid"]) not in row:
            continue
        y = 40 + row[(e["pid"], e["tid"])] * ROW
        name = html.escape(e.get("name", ""))
        if ph == "b":
            opened[e["id"]] = e
            continue
        if ph == "e" and e["id"] in opened:
            b = opened.pop(e["id"])
            s, f = max(b["ts"], lo), min(e["ts"], hi)
            if s < f:
                # Spans that overlap (faults of one batch) take turns in two
                # lanes, so both show.
                key = (e["pid"], e["tid"])
                k = lane.get(key, (0, -1.0))
                k = (1 - k[0], f) if b["ts"] < k[1] else (0, f)
                lane[key] = k
                yy = y + 20 + 7 * k[0]
                out.append('<rect x="%.1f" y="%d" width="%.1f" height="6" fill="%s" '
                           'opacity="0.85"/>' % (x(s), yy, (f - s) * scale,
                                                 "#e8833a" if k[0] == 0 else "#b85c1e"))
                out.append('<text x="%.1f" y="%d" font-size="9">%s</text>' % (
                    x(s) + 2, yy + 6, html.escape(b["name"])))
            continue
        if ph == "X":
            s, f = max(e["ts"], lo), min(e["ts"] + e.get("dur", 0), hi)
            if s >= f:
                continue
            color = "#4a90d9" if e["pid"] == 1 else "#5cb85c"
            out.append('<rect x="%.1f" y="%d" width="%.1f" height="18" fill="%s" rx="2"/>' % (
                x(s), y + 4, max((f - s) * scale, 1), color))
            args = e.get("args", {})
            extra = args.get("size_kib") and " %s KiB" % args["size_kib"] or ""
            out.append('<text x="%.1f" y="%d" fill="white">%s%s</text>' % (
                x(s) + 3, y + 17, name, extra))
        elif ph == "i" and lo <= e["ts"] <= hi:
            key = (e["pid"], e["tid"])
            out.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#c0392b" '
                       'stroke-width="2"/>' % (x(e["ts"]), y + 2, x(e["ts"]), y + 18))
            if x(e["ts"]) > label_end.get(key, 0):
                out.append('<text x="%.1f" y="%d" font-size="11">%s</text>' % (
                    x(e["ts"]) + 3, y + 13, name))
                label_end[key] = x(e["ts"]) + 7 * len(e.get("name", "")) + 6
    out.append("</svg>")
    page = ("<!doctype html><meta charset=utf-8><title>faultline trace</title>"
            "<body style='margin:0'>%s</body>" % "\n".join(out))
    with open(argv[2], "w", encoding="utf-8") as f:
        f.write(page)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main(sys.argv))
