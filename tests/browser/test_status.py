"""The control node's status page in a real browser (issue 12): it renders, shows
every edge of the running cluster on its map, and reflects a drain within seconds."""

import json
import time
import urllib.request

from conftest import ARTIFACTS

CONTROL = "http://127.0.0.1:9000"
TOKEN = "browser-test-token-0123456789"
EDGES = ["us-east", "eu-west", "ap-south"]


def api(method, path):
    request = urllib.request.Request(CONTROL + path, method=method, data=b"" if method == "POST" else None,
                                     headers={"Authorization": "Bearer " + TOKEN})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


MAP_STATES = """
const out = {};
for (const g of document.querySelectorAll('#edges g.edge')) out[g.dataset.node] = g.dataset.state;
return Object.keys(out).length ? out : null;
"""


def test_e_status_page_shows_every_edge_and_a_drain(browser, cdn):
    b = browser("--disable-quic")
    # The token travels in the URL fragment, which the browser never sends.
    b.get(f"{CONTROL}/#token={TOKEN}")
    states = b.wait_for(
        MAP_STATES.replace("return Object", "return Object.keys(out).length === 3 && Object"),
        "three edges on the map", timeout=15)
    states = b.execute_script(MAP_STATES)
    assert set(states) == set(EDGES), states
    assert all(s == "alive" for s in states.values()), states
    rows = b.execute_script("return [...document.querySelectorAll('#nodes tbody tr')].map(r => r.dataset.node)")
    assert sorted(rows) == sorted(EDGES), rows
    assert "token" not in b.current_url, "the token is taken out of the address bar"
    # Some traffic, then a purge: both show up.
    for ip in ("127.0.0.11", "127.0.0.12", "127.0.0.13"):
        urllib.request.urlopen(f"http://{ip}:8080/hello.txt", timeout=5).read()
    request = urllib.request.Request(CONTROL + "/v1/purge", method="POST", data=b'{"tags": ["status-page"]}',
                                     headers={"Authorization": "Bearer " + TOKEN})
    with urllib.request.urlopen(request, timeout=5) as response:
        purge = json.loads(response.read())
    b.wait_for(f"return document.querySelector('#purges tbody').textContent.includes('{purge['id']}')",
               "the purge in the list", timeout=10)
    # The upstream column: requests per second to origins, shields and region peers,
    # the totals in its title; each edge has fetched from the origin by now.
    upstream = b.wait_for(
        "const out = {};"
        "for (const r of document.querySelectorAll('#nodes tbody tr')) {"
        "  const td = r.querySelector('td.upstream');"
        "  const m = td && /origin (\\d+), shield (\\d+), peer (\\d+)/.exec(td.title);"
        "  if (!m || !/^\\d+\\.\\d · \\d+\\.\\d · \\d+\\.\\d$/.test(td.textContent) || +m[1] < 1) return null;"
        "  out[r.dataset.node] = [td.textContent, +m[1], +m[2], +m[3]];"
        "}"
        "return Object.keys(out).length === 3 ? out : null;",
        "origin requests in every edge's upstream column", timeout=10)
    assert set(upstream) == set(EDGES), upstream
    header = b.execute_script("return document.querySelector('#nodes thead').textContent")
    assert "upstream/s" in header and "origin · shield · peer" in header, header
    # A drain shows within seconds; an undrain brings the edge back.
    started = time.monotonic()
    api("POST", "/v1/edges/eu-west/drain")
    b.wait_for("const g = document.querySelector('#edges g[data-node=\"eu-west\"]');"
               "return g && g.dataset.state === 'drained';", "eu-west drained on the map", timeout=5)
    drained_after = time.monotonic() - started
    b.save_screenshot(str(ARTIFACTS / "status-page-drained.png"))
    api("POST", "/v1/edges/eu-west/undrain")
    b.wait_for("const g = document.querySelector('#edges g[data-node=\"eu-west\"]');"
               "return g && g.dataset.state === 'alive';", "eu-west back", timeout=5)
    print(f"status page showed the drain after {drained_after:.2f} s")
    # Without the token the data stays closed.
    b.execute_script("sessionStorage.clear()")
    b.get(f"{CONTROL}/")
    b.wait_for("return getComputedStyle(document.getElementById('login')).display !== 'none'",
               "the token prompt", timeout=5)
