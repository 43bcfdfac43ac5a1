#!/usr/bin/env python3
"""The tables of bench/run-dns.sh from its raw lines (bench/out/dns-runs.txt).

Lines: `qps ROUND SERVER MODE QPS AVG_LATENCY_S COMPLETED LOST SERVER_CPU_S MACHINE_BUSY_S`
and `lat ROUND SERVER MODE P50_S P99_S RESPONSES`.
"""

import statistics
import sys
from collections import defaultdict


def spread(values, fmt):
    values = [v for v in values if v == v]
    if not values:
        return "—"
    return f"{fmt(statistics.median(values))} [{fmt(min(values))}–{fmt(max(values))}]"


def main(path):
    qps = defaultdict(dict)  # (server, mode) -> round -> row
    lat = defaultdict(dict)
    servers = []
    for line in open(path):
        f = line.split()
        if not f:
            continue
        if f[0] == "qps":
            _, r, server, mode, q, avg, done, lost, cpu, busy = f
            qps[(server, mode)][int(r)] = dict(
                qps=float(q), avg=float(avg) * 1e3, done=int(done), lost=int(lost), cpu=float(cpu), busy=float(busy)
            )
        elif f[0] == "lat":
            _, r, server, mode, p50, p99, n = f
            lat[(server, mode)][int(r)] = dict(p50=float(p50) * 1e3, p99=float(p99) * 1e3, n=int(n))
        else:
            continue
        if server not in servers:
            servers.append(server)

    def us_per_query(row):
        return row["cpu"] / row["done"] * 1e6 if row["done"] else float("nan")

    for mode, title in (("plain", "plain queries"), ("ecs", "ECS on every query (192.0.2.0/24)")):
        if not any(m == mode for (_, m) in qps):
            continue
        ref = qps.get(("gdnsd", mode), {})
        print(f"\n**{title}** (`www.cdn.test A`; median [min–max] over rounds)\n")
        print(
            "| server | queries/s | ÷ gdnsd (per round) | server CPU-µs per query | ÷ gdnsd CPU per query |"
            " avg latency at saturation, ms | p50 / p99 ms at a fixed load | lost | rounds |"
        )
        print("|---|---:|---:|---:|---:|---:|---|---:|---:|")
        for server in servers:
            rows = qps.get((server, mode))
            if not rows:
                continue
            rounds = sorted(rows)
            ratio = [rows[r]["qps"] / ref[r]["qps"] for r in rounds if r in ref and ref[r]["qps"]]
            cpu = [us_per_query(rows[r]) for r in rounds]
            cpu_ratio = [us_per_query(rows[r]) / us_per_query(ref[r]) for r in rounds if r in ref]
            lats = lat.get((server, mode), {})
            p50 = statistics.median([v["p50"] for v in lats.values()]) if lats else float("nan")
            p99 = statistics.median([v["p99"] for v in lats.values()]) if lats else float("nan")
            print(
                f"| {server} | {spread([rows[r]['qps'] for r in rounds], lambda v: f'{v:,.0f}')} "
                f"| {spread(ratio, lambda v: f'{v:.2f}')} "
                f"| {spread(cpu, lambda v: f'{v:.2f}')} "
                f"| {spread(cpu_ratio, lambda v: f'{v:.2f}')} "
                f"| {spread([rows[r]['avg'] for r in rounds], lambda v: f'{v:.2f}')} "
                f"| {p50:.3f} / {p99:.3f} "
                f"| {sum(rows[r]['lost'] for r in rounds)} | {len(rounds)} |"
            )
    print("\nPer round (queries/s; server CPU-s; machine busy CPU-s during the run):\n")
    print("| server | mode | " + " | ".join(f"round {r}" for r in sorted({r for v in qps.values() for r in v})) + " |")
    print("|---|---|" + "---|" * len({r for v in qps.values() for r in v}))
    for (server, mode), rows in sorted(qps.items(), key=lambda kv: (kv[0][1], servers.index(kv[0][0]))):
        cells = [f"{rows[r]['qps']:,.0f}; {rows[r]['cpu']:.2f}; {rows[r]['busy']:.2f}" for r in sorted(rows)]
        print(f"| {server} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
