#!/usr/bin/env python3
"""Reads bench/out/*.json from nbd-vs-peers.sh and prints the comparison table; writes summary.json."""
import json
import os
import sys

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "out")
targets = ["raw", "nbd-null", "nbdkit", "qemu-nbd", "strata-unix", "strata-tcp"]
workloads = ["randwrite-4k-qd32", "randread-4k-qd32", "write-1m-qd8", "read-1m-qd8", "randwrite-4k-qd1"]


def load(target, workload):
    path = os.path.join(out, f"{target}.{workload}.json")
    if not os.path.exists(path):
        return None
    text = open(path).read()
    job = json.loads(text[text.index("{"):])["jobs"][0]
    side = job["write"] if "write" in workload else job["read"]
    pct = side["clat_ns"].get("percentile", {})
    ios = side.get("total_ios", 0)
    return {
        # fio's own CPU (user + system) per I/O: the client's share of the machine.
        "fio_cpu_us": (job["usr_cpu"] + job["sys_cpu"]) / 100 * job["job_runtime"] * 1000 / ios if ios else 0,
        "iops": side["iops"],
        "mib_s": side["bw_bytes"] / (1 << 20),
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
    }


summary = {}
meta_path = os.path.join(out, "meta.json")
if os.path.exists(meta_path):
    summary["meta"] = json.load(open(meta_path))
    print(f"backing: {summary['meta']['backing']}, {summary['meta']['runtime_s']} s per workload\n")
print(f"{'workload':<18} {'target':<12} {'IOPS':>10} {'MiB/s':>9} {'p50 us':>9} {'p99 us':>9} {'fio us/IO':>10} {'x nbdkit':>9} {'x raw':>7}")
for w in workloads:
    base = load("nbdkit", w)
    raw = load("raw", w)
    for t in targets:
        r = load(t, w)
        if r is None:
            continue
        r["vs_nbdkit"] = r["iops"] / base["iops"] if base else None
        r["vs_raw"] = r["iops"] / raw["iops"] if raw else None
        summary.setdefault(w, {})[t] = r
        vn = f"{r['vs_nbdkit']:.2f}" if r["vs_nbdkit"] else "-"
        vr = f"{r['vs_raw']:.2f}" if r["vs_raw"] else "-"
        print(f"{w:<18} {t:<12} {r['iops']:>10.0f} {r['mib_s']:>9.1f} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['fio_cpu_us']:>10.1f} {vn:>9} {vr:>7}")
    print()
idle_path = os.path.join(out, "idle.json")
if os.path.exists(idle_path):
    idle = json.load(open(idle_path))
    summary["idle"] = idle
    print(f"idle engine, {idle['connections']} connected clients over {idle['seconds']} s: "
          f"{idle['cpu_percent_of_one_core']:.3f}% of one core, RSS {idle['rss_mib']} MiB (budget {idle['rss_budget_mib']} MiB)")
# The targets of the performance issue, for Strata over the unix socket.
checks = []
def ratio(w, key="iops"):
    s, n = summary.get(w, {}).get("strata-unix"), summary.get(w, {}).get("nbdkit")
    return s[key] / n[key] if s and n and n[key] else None
for w, need in [("randread-4k-qd32", 1.5), ("randwrite-4k-qd32", 1.5), ("read-1m-qd8", 0.95), ("write-1m-qd8", 0.95)]:
    r = ratio(w, "mib_s")
    if r is not None:
        checks.append((f"{w}: Strata/nbdkit {r:.2f} >= {need}", r >= need))
q1 = summary.get("randwrite-4k-qd1", {})
if "strata-unix" in q1 and "nbdkit" in q1:
    a, b = q1["strata-unix"]["p99_us"], q1["nbdkit"]["p99_us"]
    checks.append((f"randwrite-4k-qd1 p99: Strata {a:.0f} us <= nbdkit {b:.0f} us", a <= b))
if "idle" in summary:
    i = summary["idle"]
    checks.append((f"idle CPU {i['cpu_percent_of_one_core']:.3f}% < 1%", i["cpu_percent_of_one_core"] < 1))
    checks.append((f"idle RSS {i['rss_mib']} MiB < {i['rss_budget_mib']} MiB", i["rss_mib"] < i["rss_budget_mib"]))
print("\ntargets:")
for text, ok in checks:
    print(f"  [{'met' if ok else 'MISSED'}] {text}")
summary["targets"] = [{"target": t, "met": ok} for t, ok in checks]
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(f"\nJSON: {os.path.join(out, 'summary.json')}")
