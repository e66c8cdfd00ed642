"""Figures of the operator web console, measured in headless Chromium (run by hand, not in CI).

    .venv/bin/python benchmarks/bench_console.py [--n 30] [--size 4096]

1. State change in the agent -> the page shows it (median / p90 ms), for a console inside the session
   process and for a standalone console attached over ZeroMQ; naive baseline: a page polling
   /api/state once a second (measured the same way, in the same process).
2. Page load: navigation until the live snapshot is on the page (median ms).
3. Explore view: change of k -> redrawn heat map on the page, for a `size` x `size` uint16 image with
   cached features (grid 64 x 64, and sliding window 31 px every 8 px); baseline: recomputing features
   and clustering with scikit-learn's StandardScaler + PCA + KMeans on every change (no caching).
4. Memory (VmRSS now, VmHWM peak) of the standalone console process after all of the above.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.commands.console import DEMO_SPECIMEN, demo_microscope  # noqa: E402
from agent.console.demo import ScriptedSession  # noqa: E402
from agent.console.server import start_console_for_session, wait_for  # noqa: E402
from agent.session.events import ControlServer, EventBus  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WATCH_STATE = """() => {
  window.__seen = {};
  new MutationObserver(() => {
    const s = document.getElementById('state').dataset.state;
    if (!(s in window.__seen)) window.__seen[s] = Date.now();
  }).observe(document.getElementById('state'), {attributes: true});
}"""


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def state_latency_ms(page: Any, bus: EventBus, n: int, tag: str) -> list[float]:
    """Publish `n` state changes; page-side timestamps (Date.now) minus publish time, ms."""
    page.evaluate(WATCH_STATE)
    out = []
    for i in range(n):
        state = f"{tag}{i}"
        sent_ms = time.time() * 1000.0
        bus.publish("state", state=state, microscope_time_s=float(i))
        page.wait_for_function("s => s in window.__seen", arg=state, timeout=10000)
        out.append(page.evaluate("s => window.__seen[s]", state) - sent_ms)
        time.sleep(0.03)
    return out


def polling_latency_ms(url: str, bus: EventBus, n: int, period_s: float = 1.0) -> list[float]:
    """Naive baseline: a client polling /api/state every `period_s` s notices each change."""
    seen: dict[str, float] = {}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            state = json.loads(urllib.request.urlopen(url + "api/state", timeout=5).read())["state"]
            seen.setdefault(state, time.time() * 1000.0)
            stop.wait(period_s)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        time.sleep(float(rng.uniform(0.1, period_s)))
        state = f"poll{i}"
        sent_ms = time.time() * 1000.0
        bus.publish("state", state=state)
        wait_for(lambda s=state: s in seen, 5 * period_s, 0.005)
        out.append(seen[state] - sent_ms)
    stop.set()
    thread.join(5)
    return out


def page_load_ms(browser: Any, url: str, runs: int = 7) -> list[float]:
    out = []
    for _ in range(runs):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        start = time.perf_counter()  # from navigation (the browser tab exists) to live data on the page
        page.goto(url)
        page.wait_for_selector('#link[data-connected="true"]')
        out.append(1000.0 * (time.perf_counter() - start))
        context.close()
    return out


def test_image(size: int, seed: int = 1) -> np.ndarray:
    """uint16, uneven illumination, noise, ~200 bright blobs (crystals) and dark squares (ice / debris)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    image = 3000.0 + 800.0 * (xx / size) + 400.0 * (yy / size) + rng.normal(0, 60, (size, size)).astype(np.float32)
    for col, row in rng.uniform(0, size, size=(200, 2)):
        r0, c0 = int(max(0, row - 30)), int(max(0, col - 30))
        sub_y, sub_x = yy[r0 : r0 + 60, c0 : c0 + 60], xx[r0 : r0 + 60, c0 : c0 + 60]
        image[r0 : r0 + 60, c0 : c0 + 60] += 2500.0 * np.exp(-((sub_x - col) ** 2 + (sub_y - row) ** 2) / 72.0)
    for col, row in rng.uniform(0, size - 80, size=(30, 2)):
        image[int(row) : int(row) + 80, int(col) : int(col) + 80] *= 0.4
    return np.clip(image, 0, 65535).astype(np.uint16)


def explore_k_change_ms(page: Any, ks: list[int]) -> list[float]:
    """Set the k slider; time until the canvas is redrawn for that k (page clock), ms."""
    out = []
    for k in ks:
        elapsed = page.evaluate("""k => new Promise(resolve => {
            const canvas = document.getElementById('ex-canvas');
            const start = performance.now();
            const observer = new MutationObserver(() => {
              if (canvas.dataset.k === String(k)) { observer.disconnect(); resolve(performance.now() - start); }
            });
            observer.observe(canvas, {attributes: true});
            const slider = document.getElementById('ex-k');
            slider.value = String(k);
            slider.dispatchEvent(new Event('input'));
        })""", k)
        out.append(float(elapsed))
    return out


def naive_recluster_ms(image: np.ndarray, mode: str, k: int) -> float:
    """Baseline: features + scikit-learn pipeline recomputed for one change of k."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from agent.locate.features import grid_features, window_features

    start = time.perf_counter()
    if mode == "grid":
        features, _ = grid_features(image, 64, 64)
    else:
        cube, _ = window_features(image, 31, 8)
        features = cube.reshape(-1, cube.shape[-1])
    reduced = PCA(n_components=6, random_state=0).fit_transform(StandardScaler().fit_transform(features))
    KMeans(n_clusters=k, n_init=3, random_state=0).fit_predict(reduced)
    return 1000.0 * (time.perf_counter() - start)


def vm_status_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0])
    return fields


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=30, help="state changes per measurement")
    parser.add_argument("--size", type=int, default=4096, help="explore image size, px")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        print("chromium not found: apt-get install chromium")
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-console-"))
    explore_dir = work / "images"
    explore_dir.mkdir()
    import tifffile

    image = test_image(args.size)
    tifffile.imwrite(explore_dir / "big.tif", image)

    bus = EventBus("tcp://127.0.0.1:0")
    microscope, calibration = demo_microscope(seed=0)  # a demo session, not run: the consoles follow `bus`
    session = ScriptedSession(microscope, work / "session", bus, None, specimen=DEMO_SPECIMEN, calibration=calibration)
    control_endpoint = f"tcp://127.0.0.1:{free_port()}"
    control = ControlServer(session, control_endpoint, info={
        "session_dir": str(work / "session"), "events_endpoint": bus.endpoint, "prompt_endpoint": None})
    local = start_console_for_session(session, None, "127.0.0.1", 0)
    port = free_port()
    remote = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "console", "--agent", control_endpoint, "--listen", f"127.0.0.1:{port}",
         "--explore-dir", str(explore_dir), "--labels", str(work / "labels")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    remote_url = f"http://127.0.0.1:{port}/"
    results: dict[str, Any] = {}
    try:
        assert wait_for(lambda: _reachable(remote_url), 30), "the standalone console did not start"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page_local = browser.new_page()
            page_local.goto(local.url)
            page_local.wait_for_selector('#link[data-connected="true"]')
            page_remote = browser.new_page()
            page_remote.goto(remote_url)
            page_remote.wait_for_selector('#link[data-connected="true"]')
            results["latency_local_ms"] = state_latency_ms(page_local, bus, args.n, "local")
            results["latency_remote_ms"] = state_latency_ms(page_remote, bus, args.n, "remote")
            results["latency_polling_ms"] = polling_latency_ms(local.url, bus, min(args.n, 15))
            results["page_load_ms"] = page_load_ms(browser, remote_url)

            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(300000)
            page.goto(remote_url)
            page.click('.tab[data-tab="explore"]')
            page.wait_for_selector('#ex-source option[value="file:big.tif"]', state="attached")
            for mode, setup in (("grid", "document.getElementById('ex-rows').value = '64';"
                                         "document.getElementById('ex-cols').value = '64';"),
                                ("window", "document.getElementById('ex-mode').value = 'window';"
                                           "document.getElementById('ex-window').value = '31';"
                                           "document.getElementById('ex-stride').value = '8';")):
                page.evaluate(f"() => {{ {setup} }}")
                start = time.perf_counter()
                if mode == "grid":
                    page.select_option("#ex-source", "file:big.tif")
                else:
                    page.evaluate("() => document.getElementById('ex-mode').dispatchEvent(new Event('change'))")
                page.wait_for_function(f"() => document.getElementById('ex-msg').textContent.startsWith("
                                       f"'{'64×64' if mode == 'grid' else f'{-(-args.size // 8)}×'}')")
                results[f"explore_{mode}_first_s"] = time.perf_counter() - start
                results[f"explore_{mode}_k_change_ms"] = explore_k_change_ms(page, [4, 5, 6, 3, 7, 2, 8])
                results[f"explore_{mode}_k_repeat_ms"] = explore_k_change_ms(page, [4, 5, 6, 3])
                results[f"naive_{mode}_ms"] = [naive_recluster_ms(image, mode, k) for k in (4, 5)]
            page.screenshot(path=str(ROOT / "test-artifacts" / "bench-explore-4k.png"))
            browser.close()
        results["console_memory_kib"] = vm_status_kib(remote.pid)
    finally:
        remote.terminate()
        remote.wait(10)
        local.stop()
        control.close()
        session.stop()
        bus.close()
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)
    return 0


def _reachable(url: str) -> bool:
    try:
        return json.loads(urllib.request.urlopen(url + "api/state", timeout=1).read())["agent_connected"]
    except OSError:
        return False


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    def line(name: str, values: list[float]) -> str:
        median, p90 = statistics.median(values), percentile(values, 90)
        return f"{name:<46} median {median:8.1f}  p90 {p90:8.1f}  (n={len(values)})"

    print(f"crystal-locator console benchmark (state changes n={args.n}, explore image {args.size}^2 uint16)")
    print(line("state -> page, in-process console (ms)", results["latency_local_ms"]))
    print(line("state -> page, standalone over ZeroMQ (ms)", results["latency_remote_ms"]))
    print(line("baseline: polling /api/state at 1 Hz (ms)", results["latency_polling_ms"]))
    ratio = statistics.median(results["latency_polling_ms"]) / statistics.median(results["latency_remote_ms"])
    print(f"{'  push vs polling (standalone), x faster':<46} {ratio:8.1f}")
    print(line("page load to live snapshot (ms)", results["page_load_ms"]))
    for mode in ("grid", "window"):
        print(f"explore {mode}: first open + features {results[f'explore_{mode}_first_s']:.2f} s")
        print(line(f"  k change -> heat map redrawn ({mode}, ms)", results[f"explore_{mode}_k_change_ms"]))
        print(line("  same k again (cached clustering, ms)", results[f"explore_{mode}_k_repeat_ms"]))
        print(line("  baseline: recompute features + sklearn (ms)", results[f"naive_{mode}_ms"]))
        naive, cached = results[f"naive_{mode}_ms"], results[f"explore_{mode}_k_change_ms"]
        speedup = statistics.median(naive) / statistics.median(cached)
        print(f"{'    cached vs recompute, x faster':<46} {speedup:8.1f}")
    memory = results["console_memory_kib"]
    print(f"standalone console process memory: RSS {memory['VmRSS'] / 1024:.0f} MiB, "
          f"peak {memory['VmHWM'] / 1024:.0f} MiB (after the explore runs on the {args.size}^2 image)")


if __name__ == "__main__":
    sys.exit(main())
