"""Fixtures of the browser tests: one `cdn dev` for the session, and Chromium browsers.

`cdn dev` (the binary from $CDN_BIN, default target/debug/cdn) serves a temporary
content folder: a copy of examples/content plus a generated ~25 MB 720p video
(v/big.mp4) and a ~5 MB random file (blob.bin). Chromium is Debian's, driven by its
chromedriver through selenium; scripts/test-deps.sh installs all of them.

tests/browser.rs runs this suite in a private network namespace where it can (see
there why); run by hand, `unshare --net -- sh -c 'ip link set lo up && exec python3 -m
pytest -q tests/browser'` does the same.
"""

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

REPO = Path(__file__).resolve().parents[2]
CDN_BIN = Path(os.environ.get("CDN_BIN") or REPO / "target" / "debug" / "cdn")
ARTIFACTS = REPO / "target" / "browser-artifacts"
CHROMIUM = "/usr/lib/chromium/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

ORIGIN = "http://127.0.0.1:8080"
EDGES = {"us-east": "127.0.0.11", "eu-west": "127.0.0.12", "ap-south": "127.0.0.13"}
HTTPS_PORT = 8443

# Every address `cdn dev` binds (src/dev.rs).
TCP_PORTS = [("127.0.0.1", p) for p in (8080, 8081, 9000, 9001, 9053, 9091, 9092, 5300)] + [
    (ip, p) for ip in EDGES.values() for p in (8080, 8443, 9090)
]
UDP_PORTS = [("127.0.0.1", p) for p in (5300, 7946, 7947)] + [
    (ip, p) for ip in EDGES.values() for p in (8443, 7946)
]

VIDEO_SECONDS = 10


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def busy_ports():
    """The `cdn dev` addresses something else already holds."""
    busy = []
    for kind, addrs in ((socket.SOCK_STREAM, TCP_PORTS), (socket.SOCK_DGRAM, UDP_PORTS)):
        for addr in addrs:
            with socket.socket(socket.AF_INET, kind) as s:
                if kind == socket.SOCK_STREAM:
                    # Connections of an earlier run in TIME_WAIT must not count.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(addr)
                except OSError:
                    busy.append(f"{'tcp' if kind == socket.SOCK_STREAM else 'udp'} {addr[0]}:{addr[1]}")
    return busy


def make_content(root: Path) -> Path:
    content = root / "content"
    shutil.copytree(REPO / "examples" / "content", content)
    # ~25 MB, 720p, 20 Mbit/s, a keyframe every second, moov first: big enough that a
    # throttled browser must seek with a Range request. Noise keeps the encoder at rate.
    subprocess.run(
        [
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30,noise=alls=30:allf=t",
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
            "-t", str(VIDEO_SECONDS),
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "30",
            "-b:v", "20M", "-minrate", "20M", "-maxrate", "20M", "-bufsize", "20M",
            "-x264-params", "nal-hrd=cbr",
            "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart",
            str(content / "v" / "big.mp4"),
        ],
        check=True,
        timeout=120,
    )
    (content / "blob.bin").write_bytes(os.urandom(5 * 1024 * 1024 + 12345))
    return content


def spki_hash(banner: str, cert: Path) -> str:
    found = re.search(r"--ignore-certificate-errors-spki-list=([A-Za-z0-9+/]+=*)", banner)
    if found:
        return found.group(1)
    # Fallback: compute it from the certificate.
    pubkey = subprocess.run(
        ["openssl", "x509", "-pubkey", "-noout", "-in", str(cert)], check=True, capture_output=True
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"], input=pubkey, check=True, capture_output=True
    ).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Cdn:
    """The running `cdn dev`."""

    def __init__(self, content: Path, spki: str, log: Path):
        self.content = content
        self.spki = spki
        self.log = log

    @staticmethod
    def url(edge: str, path: str) -> str:
        return f"https://{EDGES[edge]}:{HTTPS_PORT}/{path.lstrip('/')}"

    @staticmethod
    def requests(edge: str) -> dict:
        """`cdn_requests_total` of an edge: {(protocol, cache): count}."""
        _, body = http_get(f"http://{EDGES[edge]}:9090/metrics")
        counts = {}
        for line in body.decode().splitlines():
            if line.startswith("cdn_requests_total{"):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                counts[(labels["protocol"], labels["cache"])] = float(line.rsplit(" ", 1)[1])
        return counts

    @staticmethod
    def diagnose(edge: str, path: str) -> str:
        """What the edge and the origin say now, for a failure message."""
        lines = []
        for name, url in ((edge, f"http://{EDGES[edge]}:9090/metrics"), ("origin", "http://127.0.0.1:9091/metrics")):
            try:
                text = http_get(url)[1].decode()
                lines += [f"{name}: {l}" for l in text.splitlines() if re.match(r"cdn_(origin_requests|connections|cache)", l)]
            except OSError as e:
                lines.append(f"{name} metrics: {e}")
        try:
            start = time.monotonic()
            status, body = http_get(f"http://{EDGES[edge]}:8080/{path}", timeout=10)
            lines.append(f"GET http://{EDGES[edge]}:8080/{path} now: {status}, {len(body)} bytes in {time.monotonic() - start:.2f} s")
        except OSError as e:
            lines.append(f"GET http://{EDGES[edge]}:8080/{path} now: {e}")
        return "\n".join(lines)

    @classmethod
    def requests_delta(cls, edge: str, before: dict) -> dict:
        after = cls.requests(edge)
        return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


@pytest.fixture(scope="session")
def cdn():
    if not CDN_BIN.is_file():
        pytest.fail(f"{CDN_BIN} does not exist: run `cargo build` first (or set CDN_BIN)")
    busy = busy_ports()
    if busy:
        pytest.fail(
            "cannot start `cdn dev`, its fixed addresses are in use (is another `cdn dev` running?): "
            + ", ".join(busy)
        )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="cdn-browser-"))
    log = ARTIFACTS / "cdn-dev.log"
    try:
        content = make_content(root)
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(CDN_BIN), "dev", "--content", str(content), "--data-dir", str(root / "data"),
                 "--token", "browser-test-token-0123456789"],
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NO_COLOR": "1", "RUST_LOG": os.environ.get("RUST_LOG", "info")},
            )
        try:
            deadline = time.monotonic() + 30
            pending = set(EDGES.values())
            while pending:
                if proc.poll() is not None:
                    pytest.fail(f"`cdn dev` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"edges {sorted(pending)} not ready after 30 s:\n{log.read_text()[-3000:]}")
                for ip in list(pending):
                    try:
                        if http_get(f"http://{ip}:8080/hello.txt", timeout=1)[0] == 200:
                            pending.discard(ip)
                    except OSError:
                        pass
                time.sleep(0.1)
            yield Cdn(content, spki_hash(log.read_text(), root / "data" / "cert.pem"), log)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Browser:
    """A Chromium with a fresh profile, the DevTools performance log on."""

    def __init__(self, driver, downloads: Path):
        self.driver = driver
        self.downloads = downloads
        self._events = []

    def __getattr__(self, name):
        return getattr(self.driver, name)

    def throttle(self, bytes_per_second: int):
        self.driver.execute_cdp_cmd("Network.enable", {})
        self.driver.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": bytes_per_second,
             "uploadThroughput": bytes_per_second},
        )

    def events(self, method: str):
        """DevTools Network events so far (the log is drained, so keep them)."""
        for entry in self.driver.get_log("performance"):
            self._events.append(json.loads(entry["message"])["message"])
        return [e["params"] for e in self._events if e["method"] == method]

    def responses(self, url_part: str):
        """Network.responseReceived responses whose URL contains url_part, headers lower-cased."""
        found = []
        for params in self.events("Network.responseReceived"):
            response = params["response"]
            if url_part in response["url"]:
                response = dict(response, headers={k.lower(): v for k, v in response["headers"].items()})
                found.append(response)
        return found

    def wait_for(self, script: str, what: str, timeout: float = 10):
        """Waits until `script` (a function body) returns something truthy, and returns it."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.driver.execute_script(script)
            if value:
                return value
            if time.monotonic() > deadline:
                state = self.driver.execute_script(VIDEO_STATE)
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; video: {state}")
            time.sleep(0.05)

    def run_async(self, script: str, *args):
        """Runs `script` as an async function body and returns its result."""
        wrapped = (
            "const done = arguments[arguments.length - 1];"
            f"(async (...args) => {{ {script} }})(...Array.from(arguments).slice(0, -1))"
            ".then(done, (e) => done({error: String(e)}));"
        )
        result = self.driver.execute_async_script(wrapped, *args)
        if isinstance(result, dict) and set(result) == {"error"}:
            raise AssertionError(f"script failed in the page: {result['error']}\n{script}")
        return result

    def navigation_protocol(self):
        """nextHopProtocol of the current page's navigation, checking that it loaded."""
        nav = self.driver.execute_script(
            "const [n] = performance.getEntriesByType('navigation');"
            "return n ? {protocol: n.nextHopProtocol, status: n.responseStatus} : null;"
        )
        assert nav and nav["status"] == 200, (
            f"{self.driver.current_url} did not load ({nav}): {self.driver.title!r}"
        )
        return nav["protocol"]


VIDEO_STATE = """
const v = document.getElementById('video');
if (!v) return null;
const buffered = [];
for (let i = 0; i < v.buffered.length; i++) buffered.push([v.buffered.start(i), v.buffered.end(i)]);
return {src: v.currentSrc, readyState: v.readyState, currentTime: v.currentTime, paused: v.paused,
        seeking: v.seeking, ended: v.ended, buffered, error: v.error && v.error.message};
"""


@pytest.fixture
def browser(request, cdn):
    """browser(*flags) launches a Chromium; each is closed after the test, with a screenshot."""
    launched = []
    profiles = []

    def launch(*flags):
        profile = Path(tempfile.mkdtemp(prefix="cdn-chromium-"))
        profiles.append(profile)
        downloads = profile / "downloads"
        downloads.mkdir()
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--autoplay-policy=no-user-gesture-required",
            "--window-size=1100,1300",
            "--no-first-run",
            f"--user-data-dir={profile / 'profile'}",
            f"--ignore-certificate-errors-spki-list={cdn.spki}",
            *flags,
        ):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        options.add_experimental_option(
            "prefs",
            {"download.default_directory": str(downloads), "download.prompt_for_download": False},
        )
        service = Service(CHROMEDRIVER, log_output=str(ARTIFACTS / f"{request.node.name}.chromedriver.log"))
        driver = webdriver.Chrome(options=options, service=service)
        driver.set_script_timeout(30)
        b = Browser(driver, downloads)
        launched.append(b)
        return b

    yield launch
    for i, b in enumerate(launched):
        suffix = f"-{i}" if i else ""
        try:
            b.driver.save_screenshot(str(ARTIFACTS / f"{request.node.name}{suffix}.png"))
        finally:
            b.driver.quit()
    for profile in profiles:
        shutil.rmtree(profile, ignore_errors=True)
