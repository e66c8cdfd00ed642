"""`crystal-locator bridge serve|ping|keys` end to end: a real server process, real sockets, real keys."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.cli import main
from drivers.auth import CurveKeyPair


def test_keys_writes_a_loadable_pair_and_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bridge", "keys", "--out", str(tmp_path / "keys"), "--name", "agent"]) == 0
    pair = CurveKeyPair.load(tmp_path / "keys" / "agent.key_secret")
    assert pair.has_secret and CurveKeyPair.load(tmp_path / "keys" / "agent.key").public == pair.public
    if os.name == "posix":
        assert (tmp_path / "keys" / "agent.key_secret").stat().st_mode & 0o077 == 0
    assert main(["bridge", "keys", "--out", str(tmp_path / "keys"), "--name", "agent"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert CurveKeyPair.load(tmp_path / "keys" / "agent.key_secret") == pair


def test_serve_refuses_a_public_endpoint_without_curve(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bridge", "serve", "--simulated", "--endpoint", "tcp://0.0.0.0:0"]) == 2
    assert "requires CURVE" in capsys.readouterr().err


def test_ping_without_a_server_fails_clearly() -> None:
    """One line in user terms: what did not answer, how long was waited, how many attempts (no internal names)."""
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bridge", "ping", "tcp://127.0.0.1:9", "--timeout-s", "0.2"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("crystal-locator: error: no answer from tcp://127.0.0.1:9 within 0.2 s (1 attempt).")
    assert "_hello" not in done.stderr and "attempts" not in done.stderr
    assert lines[0].count("tcp://127.0.0.1:9") == 1


def _read_lines(stream: object, lines: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)


def test_serve_with_curve_answers_ping_and_stops_on_sigterm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert main(["bridge", "keys", "--out", str(keys), "--name", "server"]) == 0
    assert main(["bridge", "keys", "--out", str(keys), "--name", "agent"]) == 0
    capsys.readouterr()
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "bridge", "serve", "--simulated", "--seed", "3", "--camera-px", "128",
         "--endpoint", "tcp://127.0.0.1:0", "--curve-dir", str(keys), "--allow", str(keys / "agent.key")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        first = lines.get(timeout=60.0)
        assert "serving" in first and "CURVE on" in first, first
        endpoint = first.split(" on ", 1)[1].split()[0].rstrip(",")

        assert main(["bridge", "ping", endpoint, "--count", "3", "--json", "--curve-secret",
                     str(keys / "agent.key_secret"), "--server-key", str(keys / "server.key")]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["simulated"] is True and report["camera_shape_px"] == [128, 128]
        assert report["rtt_ms"]["min"] > 0 and "atlas" in report["presets"]

        assert main(["bridge", "ping", endpoint, "--count", "1", "--timeout-s", "0.5"]) == 2
        assert "refused" in capsys.readouterr().err

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20.0) == 0
        remaining = []
        while not lines.empty():
            remaining.append(lines.get())
        assert any("stopped" in line for line in remaining), remaining
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10.0)


def test_serve_stops_cleanly_on_ctrl_c() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "bridge", "serve", "--adapter", "temscript-null",
         "--endpoint", "tcp://127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        first = lines.get(timeout=60.0)
        assert "serving TemscriptMicroscope" in first, first
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20.0) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10.0)


@pytest.mark.skipif(os.name != "posix", reason="ipc:// endpoints are Unix sockets")
def test_serve_on_ipc_removes_its_socket_files_on_stop(tmp_path: Path) -> None:
    sockets = tmp_path / "sockets"
    sockets.mkdir()
    (sockets / "keep.txt").write_text("not the server's")
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "bridge", "serve", "--simulated", "--camera-px", "64",
             "--endpoint", f"ipc://{sockets}/bridge.sock", "--event-endpoint", f"ipc://{sockets}/events.sock"],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    try:
        first = lines.get(timeout=60.0)
        assert "serving" in first, first
        assert {p.name for p in sockets.iterdir()} == {"bridge.sock", "events.sock", "keep.txt"}
        ping = subprocess.run(
            [sys.executable, "-m", "agent.cli", "bridge", "ping", f"ipc://{sockets}/bridge.sock", "--count", "1"],
            capture_output=True, text=True, timeout=60,
        )
        assert ping.returncode == 0, ping.stderr
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20.0) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10.0)
    assert "Traceback" not in stderr_path.read_text()
    assert [p.name for p in sockets.iterdir()] == ["keep.txt"]
