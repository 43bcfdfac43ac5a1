#!/usr/bin/env python3
"""Markdown tables of a bench/run-disk.sh run: disk-report.py bench/out/disk-<time>.jsonl

- Disk HITs (1 MiB, 100 MiB, random 1 MiB ranges of a 1 GiB object): MB/s of the edge
  and nginx, medians with min–max, the ratio of the medians and the ratio round by
  round (the edge's run ÷ nginx's run of the same round), CPU, where the bytes came from.
- Restart: seconds from the start to ready and to HITs for known objects, per state
  (cold: page cache dropped before the start; warm), medians with min–max.
- Memory per disk-resident object.
- The issue's targets, met or missed.
"""

import json
import statistics
import sys


def spread(values, fmt="{:.0f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def round_ratios(edge_rows, other_rows, key):
    edge = {r["rep"]: r[key] for r in edge_rows if r.get(key)}
    other = {r["rep"]: r[key] for r in other_rows if r.get(key)}
    return [edge[k] / other[k] for k in sorted(edge) if k in other]


def throughput(runs, settings, verdicts):
    cases = {}
    for r in runs:
        if r["scenario"] in ("hits", "ranges"):
            cases.setdefault((r["scenario"], r["case"], r.get("state", "warm")), {}).setdefault(r["server"], []).append(r)
    if not cases:
        return
    dur = settings.get("DURATION", "")
    print("### Disk HITs over HTTP/1.1\n")
    print(f"`loadgen --proto h1 --duration {dur}`; 1 MiB: `--connections {settings.get('CONNS_1MiB')} --objects "
          f"{settings.get('HIT_OBJECTS_1MiB')}` over `/_gen/1MiB?v={{n}}`; 100 MiB: `--connections "
          f"{settings.get('CONNS_100MiB')} --objects {settings.get('HIT_OBJECTS_100MiB')}`; ranges: `--range-random "
          f"{settings.get('RANGE_OBJECT')} [--range-unaligned] --connections {settings.get('RANGE_CONNS')}` (nginx "
          f"through `slice 1m`). The edge's memory tier: {settings.get('EDGE_MEMORY')}. MB = 10^6 bytes; medians "
          "with (min–max) over the rounds; \"per round\" is the edge's run ÷ nginx's run of the same round. "
          "\"from the disk tier\": the bytes the edge read from its cache files (`cdn_cache_disk_read_bytes_total`) "
          "÷ the bytes it served; \"device reads\": what the server's processes made the kernel read from the "
          "block device (/proc/PID/io read_bytes; 0 when the page cache held the files). When \"other CPU\" is "
          "high, trust the per-CPU-second ratio more: the edge's several threads get a larger share of a "
          "contended core than nginx's one worker does.\n")
    print("| case | server | MB/s | edge ÷ nginx | per round | p50 / p99 ms | server CPU | MB per server CPU-s "
          "| edge ÷ nginx per CPU-s, per round | HITs / requests | errors | origin GETs | from the disk tier "
          "| device reads MB | loadgen CPU | other CPU |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    order = {"hits": 0, "ranges": 1}
    for (scenario, case, state), by in sorted(cases.items(), key=lambda kv: (order[kv[0][0]], kv[0][2], kv[0][1])):
        label = f"{case} HIT" if scenario == "hits" else f"ranges, {case}"
        if state != "warm":
            label += f" ({state})"
        edge_med = med(r["mb_per_s"] for r in by.get("edge", []))
        nginx_med = med(r["mb_per_s"] for r in by.get("nginx", []))
        for server in ("edge", "nginx"):
            rows = by.get(server)
            if not rows:
                continue
            secs = lambda r: r.get("seconds") or r["wall_s"]
            cpu = med(100 * r["server_cpu_s"] / secs(r) for r in rows)
            per_cpu = med(r["bytes"] / 1e6 / r["server_cpu_s"] for r in rows if r["server_cpu_s"] > 0)
            client = med(100 * (r.get("client_cpu_s") or 0) / secs(r) for r in rows)
            other = med(100 * max(0.0, r["busy_cpu_s"] - r["server_cpu_s"] - (r.get("client_cpu_s") or 0)) / secs(r)
                        for r in rows)
            if server == "edge":
                ratio = f"**{edge_med / nginx_med:.2f}**" if edge_med and nginx_med else "—"
                rr = round_ratios(rows, by.get("nginx", []), "mb_per_s")
                per_round = spread(rr, "{:.2f}") if rr else "—"
                for r in rows + by.get("nginx", []):
                    r["mb_per_cpu_s"] = r["bytes"] / 1e6 / r["server_cpu_s"] if r["server_cpu_s"] > 0 else None
                rc = round_ratios(rows, by.get("nginx", []), "mb_per_cpu_s")
                per_cpu_round = spread(rc, "{:.2f}") if rc else "—"
                tier = med(r.get("disk_tier_read_bytes", 0) / r["bytes"] for r in rows if r["bytes"])
                tier = f"{100 * tier:.0f}%" if tier is not None else "—"
                if edge_med and nginx_med:
                    verdicts.append((f"disk HIT throughput, {label}", "≥ 1.0× nginx",
                                     f"{edge_med / nginx_med:.2f}× (per round {per_round}; per server CPU-s "
                                     f"{per_cpu_round})", edge_med / nginx_med >= 1.0))
            else:
                ratio, per_round, tier, per_cpu_round = "", "", "—", ""
            print(f"| {label} | {server} | {spread([r['mb_per_s'] for r in rows])} | {ratio} | {per_round} "
                  f"| {med(r['p50_ms'] for r in rows):.1f} / {med(r['p99_ms'] for r in rows):.1f} | {cpu:.0f}% "
                  f"| {per_cpu:.0f} | {per_cpu_round} | {sum(r['x_cache_hits'] for r in rows)} / {sum(r['requests'] for r in rows)} "
                  f"| {sum(r['errors'] for r in rows)} | {sum(r.get('origin_gets', 0) for r in rows)} | {tier} "
                  f"| {med(r.get('device_read_bytes', 0) for r in rows) / 1e6:.0f} | {client:.0f}% | {other:.0f}% |")
    print()


def fills(runs):
    rows = [r for r in runs if r["scenario"] == "fill"]
    if not rows:
        return
    print("### Fills\n")
    print("| what | server | objects requested | seconds | on disk: objects / MB | in memory: objects / MB "
          "| disk writes skipped (1024 pending) / all disk errors |")
    print("|---|---|---:|---:|---|---|---|")
    for r in rows:
        edge = r["server"] == "edge"
        mem = f"{r['memory_objects']} / {r['memory_bytes'] / 1e6:.0f}" if edge else "— (page cache)"
        errors = f"{r.get('disk_write_busy', 0)} / {r.get('disk_errors', 0)}" if edge else "—"
        print(f"| {r['case']} | {r['server']} | {r['objects']} | {r['seconds']:.1f} "
              f"| {r['disk_objects']} / {r['disk_bytes'] / 1e6:.0f} | {mem} | {errors} |")
    print("\n(cumulative over the fills of one cache: the edge's figures are its metrics, an object over "
          "`max_object` counting one entry per 1 MiB slice plus its head; nginx's are its cache directory's "
          "files and their on-disk size)\n")


def restart(runs, settings, verdicts):
    rows = [r for r in runs if r["scenario"] == "restart"]
    if not rows:
        return
    n = settings.get("RESTART_OBJECTS")
    print(f"### Restart with {n} × {settings.get('RESTART_SIZE')} objects on disk\n")
    print("Stop: `term` SIGTERM (a clean stop: the edge saves its index), `kill` SIGKILL to every process of the "
          "server (an unclean stop: the edge rebuilds its index from the files); then for `cold` "
          "`sync; echo 3 > /proc/sys/vm/drop_caches`; then the start; times from just "
          "before the start (python's Popen), polling every 2 ms. **Ready**: the edge's `/readyz` answers 200 "
          "(the index is rebuilt before that); nginx has no readiness: it serves as soon as it listens, and "
          "finds a cached file on the first request for it, before its cache loader has run. **HITs**: four "
          "known objects (first, ⅓, ⅔, last) fetched after ready until each answered; the X-Cache of their first "
          "answers must be HIT and the origin must see no GET. Medians (min–max).\n")
    print("| stop-start | server | rounds | objects on disk | listening s | **ready s** | of which the index "
          "(`cdn_cache_disk_index_seconds`) | 4 known HITs s | first X-Cache | stop s (signal → exit) | origin GETs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    known = ["term-cold", "term-warm", "kill-cold", "kill-warm", "cold", "warm"]
    for state in sorted({r["case"] for r in rows}, key=lambda c: known.index(c) if c in known else 99):
        for server in ("edge", "nginx"):
            rs = [r for r in rows if r["case"] == state and r["server"] == server]
            if not rs:
                continue
            xc = {}
            for r in rs:
                for x in r["first_x_cache"]:
                    xc[x] = xc.get(x, 0) + 1
            objects = spread([r.get("disk_objects") for r in rs]) if server == "edge" else "—"
            index = spread([r.get("index_s") for r in rs], "{:.3f}") if server == "edge" else "—"
            print(f"| {state} | {server} | {len(rs)} | {objects} | {spread([r['listen_s'] for r in rs], '{:.3f}')} "
                  f"| **{spread([r['ready_s'] for r in rs], '{:.3f}')}** | {index} "
                  f"| {spread([r['hits_s'] for r in rs], '{:.3f}')} "
                  f"| {', '.join(f'{k} {v}' for k, v in sorted(xc.items(), key=str))} "
                  f"| {spread([r['stop_s'] for r in rs], '{:.2f}')} | {sum(r['origin_gets'] for r in rs)} |")
            if server == "edge" and rs:
                worst = max(r["ready_s"] for r in rs)
                verdicts.append((f"restart to ready, {n} objects, {state}", "≤ 5 s",
                                 f"{med(r['ready_s'] for r in rs):.2f} s (max {worst:.2f} s)", worst <= 5.0))
    for r in runs:
        if r["scenario"] == "loader":
            print(f"\nnginx's cache loader ({r['case']} start): gone {r['loader_done_s']} s after nginx started "
                  "(it starts 60 s after nginx; defaults loader_files=100, loader_sleep=50ms, "
                  "loader_threshold=200ms).")
    print()


def memory(runs, settings, verdicts):
    rows = [r for r in runs if r["scenario"] == "memory"]
    if not rows:
        return
    get = lambda server, phase: [r for r in rows if r["server"] == server and r["phase"] == phase]
    print("### Memory per disk-resident object\n")
    print("Edge: VmRSS after a restart (the index rebuilt from disk, nothing else cached but the object "
          "v=0, after the same 1,000 requests for it) minus VmRSS of the empty edge (started on an empty "
          "disk directory, after those 1,000 requests), ÷ the objects on disk (`cdn_cache_objects{tier=\"disk\"}`); "
          "one value per restart. nginx: the pages of its keys zone that exist (the shared mapping's "
          "st_blocks, through /proc/PID/map_files) after the fill minus after its start, ÷ the files in the "
          "cache; after a restart the zone is refilled by its cache loader (\"loaded\"), minus the zone "
          "right after that start. Plus the change in the private memory (RssAnon) of nginx's master and "
          "worker. The files themselves are in the page cache for both, not counted. The edge's index is "
          "heap (RssAnon); its VmRSS also moves with the pages of its binary that happen to be mapped "
          "(RssFile), which do not grow with objects: the target is judged on RssAnon.\n")
    print("| server | measured | objects | before | after | per object: RSS (VmRSS) | **per object: private "
          "memory (RssAnon)** |")
    print("|---|---|---:|---:|---:|---:|---:|")
    edge_per, nginx_per = [], None
    empty = get("edge", "empty")
    if empty:
        e = empty[0]
        for phase in ("filled",) + tuple(sorted({r["phase"] for r in rows if r["phase"].startswith("restart")})):
            rs = get("edge", phase)
            if not rs:
                continue
            rss = [(r["rss_kib"] - e["rss_kib"]) * 1024 / r["objects"] for r in rs if r["objects"]]
            anon = [(r["anon_kib"] - e["anon_kib"]) * 1024 / r["objects"] for r in rs if r["objects"]]
            if phase.startswith("restart"):
                edge_per += anon
            note = " (memory tier full)" if phase == "filled" else ""
            print(f"| edge | empty → {phase}{note} | {rs[0]['objects']} | {e['rss_kib'] / 1024:.1f} MiB "
                  f"({e['anon_kib'] / 1024:.1f} anon) | {spread([r['rss_kib'] / 1024 for r in rs], '{:.1f}')} MiB "
                  f"({spread([r['anon_kib'] / 1024 for r in rs], '{:.1f}')} anon) | {spread(rss)} B | **{spread(anon)} B** |")
    n_empty, n_filled = get("nginx", "empty"), get("nginx", "filled")
    if n_empty and n_filled:
        a, b = n_empty[0], n_filled[0]
        nginx_per = (b["zone_bytes"] - a["zone_bytes"]) / b["objects"]
        print(f"| nginx | keys zone pages, start → filled | {b['objects']} | {a['zone_bytes'] / 1024:.0f} KiB "
              f"| {b['zone_bytes'] / 1024:.0f} KiB | | **{nginx_per:.0f} B** (shared) |")
        print(f"| nginx | master + worker, start → filled | {b['objects']} | {a['rss_kib'] / 1024:.1f} MiB "
              f"({a['anon_kib'] / 1024:.1f} anon) | {b['rss_kib'] / 1024:.1f} MiB ({b['anon_kib'] / 1024:.1f} anon) "
              f"| {(b['rss_kib'] - a['rss_kib']) * 1024 / b['objects']:.0f} B "
              f"| {(b['anon_kib'] - a['anon_kib']) * 1024 / b['objects']:.0f} B |")
    loaded = get("nginx", "loaded")
    fresh = [r for r in rows if r["server"] == "nginx" and r["phase"].startswith("restart") and "zone_bytes" in r]
    if loaded and fresh:
        l, f = loaded[0], fresh[-1]
        print(f"| nginx | keys zone pages, restart → loader done | {l['objects']} | {f['zone_bytes'] / 1024:.0f} KiB "
              f"| {l['zone_bytes'] / 1024:.0f} KiB | | {(l['zone_bytes'] - f['zone_bytes']) / l['objects']:.0f} B (shared) |")
    print()
    if edge_per and nginx_per:
        verdicts.append(("memory per disk-resident object", f"≤ nginx's keys zone ({nginx_per:.0f} B per key)",
                         f"{med(edge_per):.0f} B ({min(edge_per):.0f}–{max(edge_per):.0f})", med(edge_per) <= nginx_per))


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
    verdicts = []
    print(f"commit {settings.get('COMMIT', '?')}, nginx {settings.get('NGINX', '?')} (aio {settings.get('NGINX_AIO')}), "
          f"disk: {settings.get('DISK_FS', '?')}, page cache drops: {'yes' if settings.get('CAN_DROP') == '1' else 'no'}\n")
    fills(runs)
    throughput(runs, settings, verdicts)
    restart(runs, settings, verdicts)
    memory(runs, settings, verdicts)
    if verdicts:
        print("### Targets (issue 18)\n")
        print("| target | goal | measured | |")
        print("|---|---|---|---|")
        for what, goal, got, ok in verdicts:
            print(f"| {what} | {goal} | {got} | {'met' if ok else '**missed**'} |")
        print()
    print(f"raw runs: {path}")


if __name__ == "__main__":
    main()
