#!/usr/bin/env python3
"""Markdown tables of a bench/run-peers.sh run: peers-report.py bench/out/peers-<time>.jsonl

One table per scenario found in the file, medians over the rounds, with the edge's
ratio to each peer (and to `edge-base`, an older build of the edge, when the run had
BASELINE=...). For req/s and MB/s also the ratio round by round (the edge's run ÷ the
other server's run of the same round): its median and its range (min–max). CPU
columns are % of one CPU over the run's wall time; "other" is CPU the rest of the
machine used meanwhile (the load generator included where it is not reported
separately): distrust cells where it is high.
"""

import json
import statistics
import sys

SERVERS = ("edge", "edge-base", "nginx", "varnish")


def med(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def cpu_cells(rows, client_key=None):
    """Server CPU %, work per server CPU-second helper, other CPU % (medians)."""
    def secs(r):
        return r.get("seconds") or r["wall_s"]
    server = statistics.median(100 * r["server_cpu_s"] / secs(r) for r in rows)
    other = statistics.median(
        100 * max(0.0, r["busy_cpu_s"] - r["server_cpu_s"] - (r.get(client_key) or 0 if client_key else 0)) / secs(r)
        for r in rows)
    return server, other


def ratio(a, b):
    return f"**{a / b:.2f}**" if a and b else "—"


def per_server_cpu(r):
    """Requests served per CPU-second the server used (None when it used none)."""
    return r["requests"] / r["server_cpu_s"] if r["server_cpu_s"] > 0 else None


def round_ratios(rows_by, server, key):
    """The edge's value ÷ SERVER's, per round (rep) both ran: "median (min–max)".
    KEY is a field of the runs or a function of one."""
    if server == "edge":
        return "—"
    get = key if callable(key) else (lambda r: r.get(key))
    edge = {r["rep"]: get(r) for r in rows_by.get("edge", []) if get(r)}
    other = {r["rep"]: get(r) for r in rows_by.get(server, []) if get(r)}
    ratios = [edge[k] / other[k] for k in sorted(edge) if k in other]
    if not ratios:
        return "—"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def spread(rows, get, fmt="{:.0f}"):
    """ "median [min–max]" of GET over the runs."""
    values = [get(r) for r in rows]
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}–{fmt.format(max(values))}]"


def us_per_request(r, key="server_cpu_s"):
    """Server CPU microseconds per request of one run (KEY: all, user or system CPU)."""
    return 1e6 * r[key] / r["requests"] if r.get(key) is not None and r["requests"] else None


def hit_table(name, rows_by, settings):
    print("| server | req/s median [min–max] | edge ÷ this (medians) | edge ÷ this, round by round: median (min–max) "
          "| p50 ms | p99 ms | server CPU | **CPU-µs per request** [min–max] | user / system µs per request "
          "| edge ÷ this (per CPU-s), per round | errors | load generator + other CPU | runs (req/s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    edge = med(rows_by.get("edge", []), "req_per_s")
    for s in SERVERS:
        rows = rows_by.get(s)
        if not rows:
            continue
        server, other = cpu_cells(rows)
        split = "—"
        if all(r.get("server_user_s") is not None for r in rows):
            user = statistics.median(us_per_request(r, "server_user_s") for r in rows if r["requests"])
            system = statistics.median(us_per_request(r, "server_sys_s") for r in rows if r["requests"])
            split = f"{user:.2f} / {system:.2f}"
        print(f'| {s} | {spread(rows, lambda r: r["req_per_s"])} | {ratio(edge, med(rows, "req_per_s"))} '
              f'| {round_ratios(rows_by, s, "req_per_s")} | {med(rows, "p50_ms"):.3f} '
              f'| {med(rows, "p99_ms"):.3f} | {server:.0f}% | {spread(rows, us_per_request, "{:.2f}")} | {split} '
              f'| {round_ratios(rows_by, s, per_server_cpu)} '
              f'| {sum(r["errors"] for r in rows)} '
              f'| {other:.0f}% | {[round(r["req_per_s"]) for r in rows]} |')


def mb_table(rows_by):
    print("| server | MB/s | edge ÷ this (MB/s) | per round: median (min–max) | req/s | p50 ms | p99 ms | server CPU "
          "| MB per server CPU-s | HITs / requests | errors | loadgen CPU | other CPU | runs (MB/s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|")
    edge = med(rows_by.get("edge", []), "mb_per_s")
    for s in SERVERS:
        rows = rows_by.get(s)
        if not rows:
            continue
        server, other = cpu_cells(rows, "client_cpu_s")
        per_cpu = statistics.median(r["bytes"] / 1e6 / r["server_cpu_s"] for r in rows if r["server_cpu_s"] > 0)
        client = statistics.median(100 * (r.get("client_cpu_s") or 0) / r["seconds"] for r in rows)
        print(f'| {s} | {med(rows, "mb_per_s"):.0f} | {ratio(edge, med(rows, "mb_per_s"))} '
              f'| {round_ratios(rows_by, s, "mb_per_s")} | {med(rows, "req_per_s"):.0f} '
              f'| {med(rows, "p50_ms"):.2f} | {med(rows, "p99_ms"):.2f} | {server:.0f}% | {per_cpu:.0f} '
              f'| {sum(r["x_cache_hits"] for r in rows)} / {sum(r["requests"] for r in rows)} '
              f'| {sum(r["errors"] for r in rows)} | {client:.0f}% | {other:.0f}% | {[round(r["mb_per_s"]) for r in rows]} |')


def memory_table(rows_by):
    print("| server | objects stored | RSS empty MiB | RSS full MiB | ΔRSS per object (anon / shmem) "
          "| cache files per object (apparent / on disk = page cache) | **memory per object** | beyond the 1 KiB body "
          "| edge ÷ this |")
    print("|---|---:|---:|---:|---|---|---:|---:|---:|")
    per = {}
    for s in SERVERS:
        for r in rows_by.get(s, []):
            n = r["objects"]
            total = (r["rss_full_kib"] - r["rss_empty_kib"]) * 1024 / n
            if s == "nginx":
                total += r["cache_disk_bytes_delta"] / n
            per[s] = total
    for s in SERVERS:
        for r in rows_by.get(s, []):
            n = r["objects"]
            files = (f'{r["cache_apparent_bytes_delta"] / n:.0f} / {r["cache_disk_bytes_delta"] / n:.0f} B'
                     if s == "nginx" else "—")
            print(f'| {s} | {r["stored_objects"]} | {r["rss_empty_kib"] / 1024:.1f} | {r["rss_full_kib"] / 1024:.1f} '
                  f'| {(r["rss_full_kib"] - r["rss_empty_kib"]) * 1024 / n:.0f} B ({r["anon_delta_kib"] * 1024 / n:.0f} / '
                  f'{r["shmem_delta_kib"] * 1024 / n:.0f}) | {files} | {per[s]:.0f} B | {per[s] - 1024:.0f} B '
                  f'| {ratio(per.get("edge"), per[s])} |')


def storm_table(rows_by):
    print("| server | origin requests (median) | per round | total s (median) | edge's time ÷ this "
          "| per request p50 / max ms | errors | X-Cache seen | runs (s) |")
    print("|---|---:|---|---:|---:|---|---:|---|---|")
    edge = med(rows_by.get("edge", []), "seconds")
    for s in SERVERS:
        rows = rows_by.get(s)
        if not rows:
            continue
        caches = {}
        for r in rows:
            for k, v in r["x_cache"].items():
                caches[k] = caches.get(k, 0) + v
        print(f'| {s} | {med(rows, "origin_requests"):.0f} | {[r["origin_requests"] for r in rows]} '
              f'| {med(rows, "seconds"):.2f} | {ratio(edge, med(rows, "seconds"))} '
              f'| {med(rows, "p50_ms"):.0f} / {med(rows, "max_ms"):.0f} | {sum(r["errors"] for r in rows)} '
              f'| {", ".join(f"{k} {v}" for k, v in sorted(caches.items()))} | {[r["seconds"] for r in rows]} |')


def main():
    path = sys.argv[1]
    settings, runs = {}, []
    for line in open(path):
        if line.strip():
            d = json.loads(line)
            if "settings" in d:
                settings = d["settings"]
            else:
                runs.append(d)
    g = lambda k, default="": settings.get(k, default)
    cases = {}
    for r in runs:
        cases.setdefault((r["scenario"], r["case"]), {}).setdefault(r["server"], []).append(r)
    order = ["memory", "storm", "h1", "h2", "throughput", "ranges"]
    for (scenario, case), rows_by in sorted(cases.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        reps = max(len(v) for v in rows_by.values())
        if scenario == "h1":
            print(f'### {case} cache HIT over HTTP/1.1 keep-alive\n\n`wrk -t{g("THREADS")} -c{g("CONNS")} '
                  f'-d{g("DURATION")} --latency`, {reps} rounds (servers alternating), medians [min–max].\n')
            hit_table(scenario, rows_by, settings)
        elif scenario == "h2":
            print(f'### {case} cache HIT over HTTP/2 (cleartext, prior knowledge)\n\n`h2load -t1 -c{g("H2_CONNS")} '
                  f'-m{g("H2_STREAMS")} -D{g("DURATION")}` ({int(g("H2_CONNS", 0)) * int(g("H2_STREAMS", 0))} '
                  f'streams in flight), p50/p99 from its per-request log, {reps} rounds (servers alternating), '
                  f'medians [min–max].\n')
            hit_table(scenario, rows_by, settings)
        elif scenario == "throughput":
            conns = rows_by[next(iter(rows_by))][0]["connections"]
            print(f'### {case} cache HIT throughput over HTTP/1.1\n\n`loadgen --proto h1 --connections {conns} '
                  f'--duration {g("DURATION")}`, medians of {reps} rounds; MB = 10^6 bytes.\n')
            mb_table(rows_by)
        elif scenario == "ranges":
            flag = " --range-unaligned" if case == "unaligned" else ""
            print(f'### random 1 MiB ranges ({case}) of a cached {g("RANGE_OBJECT")} object over HTTP/1.1\n\n'
                  f'`loadgen --proto h1 --range-random {g("RANGE_OBJECT")}{flag} --connections {g("RANGE_CONNS")} '
                  f'--duration {g("DURATION")}`, medians of {reps} rounds; nginx through `slice 1m`, the edge '
                  f'with its own 1 MiB slices, Varnish from the whole object.\n')
            mb_table(rows_by)
        elif scenario == "memory":
            print(f'### memory per cached object ({g("MEMORY_OBJECTS")} distinct 1 KiB objects)\n\n'
                  "RSS (VmRSS) after loading minus RSS before (after 1,000 requests for one object), per object; "
                  "edge: its process; nginx: master + worker (the keys zone pages the worker touched are its "
                  "RssShmem), plus the cache files' on-disk size (4 KiB pages: what they hold in the page "
                  "cache; the levels=1:2 directories not counted); Varnish: manager + child. Kernel inodes and dentries of "
                  "nginx's files not counted either.\n")
            memory_table(rows_by)
        elif scenario == "storm":
            print(f'### miss storm: {g("STORM_OBJECTS")} new objects × {g("STORM_PER_OBJECT")} concurrent requests\n\n'
                  f'`storm --objects {g("STORM_OBJECTS")} --per-object {g("STORM_PER_OBJECT")}`: one connection '
                  f'per request, all opened first, then every request sent at once; each object is '
                  f'`/_gen/{g("STORM_SIZE")}?v=N&rate={g("STORM_RATE")}` (the origin trickles it over about '
                  f'{parse_size(g("STORM_SIZE")) / int(g("STORM_RATE", 1)):.1f} s); total time from the requests '
                  f'to the last body byte; origin requests from its access log; medians of {reps} rounds.\n')
            storm_table(rows_by)
        print()
    print(f"raw runs: {path}")


def parse_size(text):
    units = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
    for u, m in units.items():
        if text.endswith(u):
            return float(text[: -len(u)]) * m
    return float(text or 0)


if __name__ == "__main__":
    main()
