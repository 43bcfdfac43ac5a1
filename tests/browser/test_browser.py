"""Real-browser tests: Chromium plays, seeks and downloads through the edges of `cdn dev`.

Run by `cargo test --test browser` (tests/browser.rs), or directly with
`python3 -m pytest -q tests/browser` after `cargo build`. Screenshots, the chromedriver
logs and the `cdn dev` log go to target/browser-artifacts/.
"""

import hashlib
import re
import time

from conftest import EDGES, ORIGIN, VIDEO_SECONDS, VIDEO_STATE, http_get

# The download rate the browser is throttled to for the big video: slow enough that a
# seek to 8 s lands beyond what is buffered, so the browser must send a Range request.
THROTTLE = 4_000_000
SEEK_TO = 8

VIDEO = "const v = document.getElementById('video');"


def play_and_seek(b, path: str):
    """Plays the page's video, seeks to SEEK_TO s and checks that playback goes on."""
    b.wait_for(
        f"{VIDEO} return v.readyState >= 3 && v.currentSrc.endsWith({path!r}) && v.readyState",
        "readyState >= 3 (HAVE_FUTURE_DATA)",
        timeout=15,
    )
    duration = b.execute_script(f"{VIDEO} return v.duration;")
    assert abs(duration - VIDEO_SECONDS) < 0.5, f"the video lasts {duration} s, not {VIDEO_SECONDS}"
    played = b.run_async(f"{VIDEO} await v.play(); return 'playing';")
    assert played == "playing", f"play() failed: {played}"
    start = b.execute_script(f"{VIDEO} return v.currentTime;")
    b.wait_for(f"{VIDEO} return v.currentTime > {start} + 0.5", "playback to advance 0.5 s", timeout=10)

    state = b.execute_script(VIDEO_STATE)
    assert not any(s <= SEEK_TO <= e for s, e in state["buffered"]), (
        f"{SEEK_TO} s is buffered before the seek, so no Range request is needed (throttling off?): {state}"
    )
    b.execute_script(f"{VIDEO} v.currentTime = {SEEK_TO};")
    b.wait_for(
        f"{VIDEO} return !v.seeking && v.currentTime >= {SEEK_TO} && v.readyState >= 3",
        f"the seek to {SEEK_TO} s to complete",
        timeout=10,
    )
    b.wait_for(
        f"{VIDEO} return v.currentTime >= {SEEK_TO + 0.5} && !v.paused",
        "playback to continue after the seek",
        timeout=10,
    )
    state = b.execute_script(VIDEO_STATE)
    assert state["error"] is None, state


def mid_file_range_response(b, path: str, size: int):
    """The 206 answering the seek: a Range starting in the second half of the file."""
    responses = b.responses(path)
    assert responses, f"no response for {path} in the performance log"
    ranged = []
    for r in responses:
        m = re.match(r"bytes (\d+)-(\d+)/(\d+)", r["headers"].get("content-range", ""))
        if r["status"] == 206 and m and int(m.group(1)) >= size // 2:
            assert int(m.group(3)) == size, r["headers"]
            ranged.append(r)
    summary = [(r["status"], r["headers"].get("content-range"), r["headers"].get("x-cache")) for r in responses]
    assert ranged, f"no mid-file Range request answered 206 for {path}: {summary}"
    return ranged[0], responses


def demo_panel(b):
    """The demo page's "who served it" panel once its check has finished."""
    b.wait_for("return document.body.dataset.checked", "the demo page's check", timeout=15)
    ids = ["served-by", "video-protocol", "x-cache", "page-protocol", "cache-status", "range"]
    return {i: b.find_element("id", i).text for i in ids}


def resource_protocols(b):
    return b.execute_script(
        "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))"
        ".map(e => [e.name, e.nextHopProtocol]);"
    )


def video_through_edge(b, cdn, edge: str, protocol: str):
    """Shared part of (a) and (b): the demo page plays the big video through `edge`."""
    size = (cdn.content / "v" / "big.mp4").stat().st_size
    before = cdn.requests(edge)
    b.throttle(THROTTLE)
    b.get(cdn.url(edge, "index.html?video=v/big.mp4"))
    nav = b.navigation_protocol()
    assert nav == protocol, f"the page came over {nav}, not {protocol}"

    play_and_seek(b, "/v/big.mp4")

    seek, responses = mid_file_range_response(b, "/v/big.mp4", size)
    for r in responses:
        assert r["headers"].get("x-served-by") == edge, r["headers"]
        assert r["protocol"] == protocol, (r["url"], r["protocol"])
    # The edge stored the object's head on the first (sliced) miss: the seek is a range
    # answered from the cache (its slices are fetched from the origin as they are read).
    assert seek["headers"].get("x-cache") == "HIT", seek["headers"]

    panel = demo_panel(b)
    assert panel["served-by"] == edge, panel
    assert panel["page-protocol"] == protocol, panel
    assert panel["video-protocol"] == protocol, panel
    assert panel["x-cache"] in ("HIT", "MISS"), panel
    assert panel["range"].startswith("206 bytes 0-1023/"), panel

    delta = cdn.requests_delta(edge, before)
    assert delta.get((protocol, "hit"), 0) >= 1, f"{edge} metrics show no {protocol} hits: {delta}"
    assert delta.get((protocol, "miss"), 0) >= 1, f"{edge} metrics show no {protocol} miss (first fill): {delta}"
    other = {k: v for k, v in delta.items() if k[0] != protocol}
    assert not other, f"{edge} served requests over other protocols: {other}"
    return responses


def test_a_video_over_h2_seeks_with_a_range_request(browser, cdn):
    b = browser("--disable-quic")
    video_through_edge(b, cdn, "us-east", "h2")


def test_b_video_over_h3_forced(browser, cdn):
    ip = EDGES["eu-west"]
    b = browser(f"--origin-to-force-quic-on={ip}:8443")
    responses = video_through_edge(b, cdn, "eu-west", "h3")
    entries = resource_protocols(b)
    assert len(entries) >= 3, entries
    assert all(p == "h3" for _, p in entries), f"not every entry came over h3: {entries}"
    all_responses = b.responses(f"{ip}:8443")
    assert len(all_responses) >= len(responses)
    assert all(r["protocol"] == "h3" for r in all_responses), [(r["url"], r["protocol"]) for r in all_responses]


FETCH_PROTOCOL = """
const url = new URL('info.json?probe=' + args[0], location.href).href;
const response = await fetch(url, {cache: 'no-store'});
await response.text();
let entry;
for (let i = 0; i < 100 && !entry; i++) {
  entry = performance.getEntriesByName(url).pop();
  if (!entry) await new Promise((r) => setTimeout(r, 10));
}
return [response.status, response.headers.get('x-served-by'), entry ? entry.nextHopProtocol : null];
"""


def test_c_alt_svc_discovery_switches_to_h3(browser, cdn):
    edge = "ap-south"
    ip = EDGES[edge]
    before = cdn.requests(edge)
    # Listing the host with an unused port allows QUIC to it (self-signed certificate)
    # without forcing it: the browser has to learn h3 from Alt-Svc.
    b = browser(f"--origin-to-force-quic-on={ip}:9")
    b.get(cdn.url(edge, "index.html"))
    nav = b.navigation_protocol()
    assert nav == "h2", f"the first navigation came over {nav}, expected h2 (no Alt-Svc known yet)"
    page = b.responses(f"{ip}:8443/index.html")
    assert page and page[0]["headers"].get("alt-svc", "").startswith('h3=":8443"'), page and page[0]["headers"]

    fetches = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        result = b.run_async(FETCH_PROTOCOL, len(fetches))
        fetches.append(result)
        assert result[:2] == [200, edge], result
        if result[2] == "h3":
            break
        time.sleep(0.1)
    assert fetches[-1][2] == "h3", f"fetch() never switched to h3 within 10 s: {fetches}"

    # A video loaded now comes over h3 too.
    b.execute_script(f"{VIDEO} v.querySelectorAll('source').forEach((s) => s.remove()); v.src = 'v/demo.mp4'; v.load();")
    b.wait_for(f"{VIDEO} return v.readyState >= 3", "the video to load", timeout=10)
    played = b.run_async(f"{VIDEO} await v.play(); return 'playing';")
    assert played == "playing", played
    b.wait_for(f"{VIDEO} return v.currentTime > 0.5", "playback to advance", timeout=10)
    video = b.responses("/v/demo.mp4")
    assert video, "no response for v/demo.mp4 in the performance log"
    assert all(r["protocol"] == "h3" for r in video), [(r["status"], r["protocol"]) for r in video]
    assert all(r["headers"].get("x-served-by") == edge for r in video)
    timing = b.wait_for(
        "return performance.getEntriesByType('resource').filter((e) => e.name.endsWith('/v/demo.mp4'))"
        ".map((e) => e.nextHopProtocol);",
        "a resource timing entry for the video",
    )
    assert all(p == "h3" for p in timing), timing

    # And so does the next navigation.
    b.get(cdn.url(edge, "index.html?again"))
    nav = b.navigation_protocol()
    assert nav == "h3", f"the navigation after Alt-Svc discovery came over {nav}"
    panel = demo_panel(b)
    assert panel["served-by"] == edge and panel["page-protocol"] == "h3", panel

    delta = cdn.requests_delta(edge, before)
    assert delta.get(("h2", "miss"), 0) + delta.get(("h2", "hit"), 0) >= 1, delta
    assert sum(v for (p, _), v in delta.items() if p == "h3") >= 3, delta


# no-store: past the browser's cache. The neutral Cache-Control keeps the browser from
# adding "no-cache" (which makes a cache revalidate); only same-origin (no preflight).
DIGEST = """
const neutral = args[0].startsWith('http') ? {} : {'Cache-Control': 'min-fresh=0'};
const response = await fetch(args[0], {cache: 'no-store', headers: neutral});
const body = await response.arrayBuffer();
const hash = new Uint8Array(await crypto.subtle.digest('SHA-256', body));
return {status: response.status, length: body.byteLength,
        sha256: Array.from(hash, (x) => x.toString(16).padStart(2, '0')).join(''),
        servedBy: response.headers.get('x-served-by'), cache: response.headers.get('x-cache')};
"""


def test_d_download_through_the_edge_is_byte_identical(browser, cdn):
    edge = "us-east"
    on_disk = (cdn.content / "blob.bin").read_bytes()
    status, from_origin = http_get(f"{ORIGIN}/blob.bin")
    assert status == 200 and from_origin == on_disk
    want = hashlib.sha256(on_disk).hexdigest()

    b = browser("--disable-quic")
    b.get(cdn.url(edge, "index.html"))
    b.wait_for("return document.body.dataset.checked", "the demo page's check", timeout=15)
    before = cdn.requests(edge)
    # A real download: the browser saves the file through the edge (a miss that streams
    # from the origin while it fills the cache).
    b.execute_script(
        "const a = document.createElement('a'); a.href = 'blob.bin'; a.download = 'blob.bin';"
        "a.textContent = 'blob.bin'; document.body.append(a); a.click();"
    )
    target = b.downloads / "blob.bin"
    deadline = time.monotonic() + 20
    while not (target.exists() and not list(b.downloads.glob("*.crdownload"))):
        assert time.monotonic() < deadline, (
            f"download not finished after 20 s: {[(f.name, f.stat().st_size) for f in b.downloads.iterdir()]}"
            f" of {len(on_disk)} bytes; {edge} requests since the click: {cdn.requests_delta(edge, before)}"
            f"\n{cdn.diagnose(edge, 'blob.bin')}"
        )
        time.sleep(0.1)
    downloaded = target.read_bytes()
    assert len(downloaded) == len(on_disk), (len(downloaded), len(on_disk))
    assert hashlib.sha256(downloaded).hexdigest() == want, "the downloaded file differs from the origin's"
    delta = cdn.requests_delta(edge, before)
    assert delta.get(("h2", "miss"), 0) >= 1, f"the download was no miss at {edge}: {delta}"

    # Again with fetch(), now from the edge's cache, hashed in the page.
    try:
        again = b.run_async(DIGEST, "blob.bin")
    except AssertionError as e:
        raise AssertionError(f"{e}\n{cdn.diagnose(edge, 'blob.bin')}") from None
    assert again == {"status": 200, "length": len(on_disk), "sha256": want, "servedBy": edge, "cache": "HIT"}, again

    # Generated content: the edge's copy equals the origin's.
    through_edge = b.run_async(DIGEST, "_gen/3MiB?v=7")
    direct = b.run_async(DIGEST, f"{ORIGIN}/_gen/3MiB?v=7")
    assert through_edge["status"] == direct["status"] == 200, (through_edge, direct)
    assert through_edge["length"] == direct["length"] == 3 * 1024 * 1024, (through_edge, direct)
    assert through_edge["sha256"] == direct["sha256"], (through_edge, direct)
    assert through_edge["servedBy"] == edge and direct["servedBy"] is None, (through_edge, direct)
