#!/usr/bin/env python3
"""Starts a server and times how long it takes to be ready (bench/run-disk.sh's restarts).

    startup.py --pidfile F --log F [--ready URL] [--hit URL ...] [--timeout S] -- COMMAND...

Starts COMMAND (stdout and stderr to --log), writes its pid to --pidfile at once (the
caller tracks and stops it; this script does not wait for it), and measures from just
before the start:

- `listen_s`: the first HTTP answer of any status from the host of the first --hit URL
  (the listener is up);
- `ready_s`: --ready URL answers 200 (e.g. the edge's `/readyz`); without --ready, the
  same as `listen_s`;
- `hits_s`: after ready, every --hit URL, fetched in turn until it answers 2xx; the
  time when the last one did. `first_x_cache` lists the X-Cache header of each one's
  first 2xx answer (a MISS there means the server did not know the object yet and
  fetched it again).

Polls every 2 ms (connection refused) on fresh connections. Prints one JSON line.
"""

import argparse
import http.client
import json
import subprocess
import sys
import time
import urllib.parse


def get(url, timeout=2.0):
    """(status, x-cache) of a GET, or None when the connection fails."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        path = u.path + ("?" + u.query if u.query else "")
        conn.request("GET", path or "/")
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("X-Cache")
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pidfile", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--ready")
    p.add_argument("--hit", action="append", default=[])
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args()
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command or not a.hit:
        sys.exit("startup.py: needs a command and at least one --hit URL")
    log = open(a.log, "ab")
    t0 = time.monotonic()
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=False)
    with open(a.pidfile, "w") as f:
        f.write(f"{proc.pid}\n")
    deadline = t0 + a.timeout
    out = {"listen_s": None, "ready_s": None, "hits_s": None, "first_x_cache": []}

    def poll(url, accept):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                sys.exit(f"startup.py: {command[0]} exited with {proc.returncode} (log: {a.log})")
            got = get(url)
            if got is not None and out["listen_s"] is None:
                out["listen_s"] = round(time.monotonic() - t0, 4)
            if got is not None and accept(got):
                return got
            time.sleep(0.002)
        sys.exit(f"startup.py: {url} not as expected within {a.timeout} s (log: {a.log})")

    base = urllib.parse.urlsplit(a.hit[0])
    poll(f"{base.scheme}://{base.netloc}/", lambda got: True)
    if a.ready:
        poll(a.ready, lambda got: got[0] == 200)
    out["ready_s"] = round(time.monotonic() - t0, 4)
    for url in a.hit:
        status, x_cache = poll(url, lambda got: 200 <= got[0] < 300)
        out["first_x_cache"].append(x_cache)
    out["hits_s"] = round(time.monotonic() - t0, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
