"""The web console at HTTP level: real uvicorn on 127.0.0.1, real ZeroMQ prompt channel, real files."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from websockets.sync.client import connect as ws_connect

from agent.commands.console import DEMO_SPECIMEN, demo_microscope
from agent.console.demo import ScriptedSession
from agent.console.links import RemoteLink
from agent.console.security import AccessPolicy, SecurityError, read_token_file
from agent.console.server import (
    ConsoleApp,
    ConsoleHandle,
    parse_listen,
    start_console_for_agent,
    start_console_for_session,
    wait_for,
)
from agent.prompts import LabelMemory, OperatorChannel, OperatorClient, Prompt, PromptOption
from agent.session.events import ControlServer, EventBus


def request(
    handle: ConsoleHandle, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with the path sent exactly as given (no client-side normalisation)."""
    connection = http.client.HTTPConnection("127.0.0.1", handle.port, timeout=10)
    try:
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        all_headers = {"Host": f"127.0.0.1:{handle.port}", **(headers or {})}
        if payload is not None and "Content-Type" not in all_headers:
            all_headers["Content-Type"] = "application/json"
        connection.request(method, path, body=payload, headers=all_headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


#: States a session reaches once its labelling step is over.
AFTER_LABELLING = ("targeting", "moving", "zooming", "confirming", "diffraction", "recording", "done")


def api_headers(handle: ConsoleHandle) -> dict[str, str]:
    return {"X-Console-Token": handle.app.policy.api_token}


class Agent:
    """A demo session (the real screening loop on a small simulated microscope) with its event bus, prompt
    channel and (optionally) control socket."""

    def __init__(
        self,
        folder: Path,
        *,
        control_endpoint: str | None = None,
        prompt_timeout_s: float = 60.0,
        step_s: float = 0.0,
    ) -> None:
        self.bus = EventBus("tcp://127.0.0.1:0")
        self.channel = OperatorChannel("tcp://127.0.0.1:0")
        microscope, calibration = demo_microscope(seed=0)
        self.session = ScriptedSession(microscope, folder, self.bus, self.channel, specimen=DEMO_SPECIMEN,
                                       n_targets=2, prompt_timeout_s=prompt_timeout_s, calibration=calibration,
                                       step_s=step_s)
        self.control = None
        if control_endpoint is not None:
            self.control = ControlServer(self.session, control_endpoint, info={
                "session_dir": str(folder), "events_endpoint": self.bus.endpoint,
                "prompt_endpoint": self.channel.prompt_endpoint,
            })

    def stop(self) -> None:
        self.session.stop()
        if self.control is not None:
            self.control.close()
        self.channel.close()
        self.bus.close()


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[Agent, ConsoleHandle]]:
    agent = Agent(tmp_path / "session")
    handle = start_console_for_session(agent.session, agent.channel, "127.0.0.1", 0)
    try:
        yield agent, handle
    finally:
        handle.stop()
        agent.stop()


@pytest.fixture
def paced(tmp_path: Path) -> Iterator[tuple[Agent, ConsoleHandle]]:
    """Like `local`, with every microscope action taking 0.25 s of wall time: an abort lands before the end."""
    agent = Agent(tmp_path / "session", step_s=0.25)
    handle = start_console_for_session(agent.session, agent.channel, "127.0.0.1", 0)
    try:
        yield agent, handle
    finally:
        handle.stop()
        agent.stop()


def open_prompt(agent: Agent, handle: ConsoleHandle) -> str:
    agent.session.start()
    assert wait_for(lambda: bool(handle.hub.open_prompt_ids()), 30), "the prompt never reached the console"
    # the console may show the prompt before the session's thread has stored the handle `ask` returned
    assert wait_for(lambda: agent.session.prompt_handle is not None, 10), "the session kept no prompt handle"
    return handle.hub.open_prompt_ids()[0]


def ask_by_hand(agent: Agent, handle: ConsoleHandle) -> str:
    """A prompt like the labelling step's, asked on the agent's channel with no session running (for tests of
    how the console handles prompts, not of the session); returns its id once the console shows it."""
    options = (PromptOption(id="cluster-0", label="cluster 0"), PromptOption(id="none", label="none of these"))
    prompt = agent.channel.ask(Prompt(question="Which of these clusters contain crystals?", options=options,
                                      multiple=True, timeout_s=60))
    assert wait_for(lambda: prompt.id in handle.hub.open_prompt_ids(), 10), "the prompt never reached the console"
    return prompt.id


def cluster_options(agent: Agent) -> list[str]:
    """The option ids of the labelling prompt that name clusters (all of them: every cluster holds crystals)."""
    assert agent.session.prompt_handle is not None
    return [option.id for option in agent.session.prompt_handle.prompt.options if option.id.startswith("cluster-")]


def test_page_static_files_and_snapshot(local: tuple[Agent, ConsoleHandle]) -> None:
    _agent, handle = local
    status, headers, body = request(handle, "GET", "/")
    assert status == 200 and b"console-api-token" in body
    assert handle.app.policy.api_token.encode() in body
    assert "default-src 'self'" in headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        assert request(handle, "GET", f"/static/{name}")[0] == 200
    status, _, body = request(handle, "GET", "/api/state")
    assert status == 200 and json.loads(body)["agent_connected"] is True


TRAVERSALS = (
    "/static/../server.py",
    "/static/%2e%2e/server.py",
    "/static/..%2fserver.py",
    "/static/%2e%2e%2f%2e%2e%2fcommands/console.py",
    "/session/atlas/..%2fjournal.jsonl",
    "/session/atlas/atlas.tif",
    "/session/atlas/%2e%2e%2f%2e%2e%2fsession%2fjournal.jsonl",
    "/session/targets/..%2f..%2fjournal/thumb",
    "/session/targets/T001/..%2f..%2fjournal.jsonl",
    "/session/targets/%2e%2e/thumb",
    "/api/prompts/x/images/..%2f..%2fetc%2fpasswd",
    "/etc/passwd",
)


def test_traversal_attempts_get_404(local: tuple[Agent, ConsoleHandle]) -> None:
    agent, handle = local
    (agent.session.session_dir / "journal.jsonl").touch()
    (agent.session.session_dir / "atlas").mkdir()
    (agent.session.session_dir / "atlas" / "atlas.tif").write_bytes(b"II*\x00")
    for path in TRAVERSALS:
        status, _, body = request(handle, "GET", path)
        assert status == 404, (path, status, body[:200])


def test_malformed_and_late_answers_are_refused_and_change_nothing(local: tuple[Agent, ConsoleHandle]) -> None:
    agent, handle = local
    prompt_id = open_prompt(agent, handle)
    url = f"/api/prompts/{prompt_id}/answer"
    cases = [
        (b"{not json", 400),
        (json.dumps({"option_ids": "1"}).encode(), 400),  # not a list
        (json.dumps({"option_ids": [1]}).encode(), 400),  # not strings
        (json.dumps({"option_ids": ["none"], "extra": 1}).encode(), 400),
        (json.dumps({"option_ids": []}).encode(), 400),
        (json.dumps({"option_ids": ["cluster-77"]}).encode(), 422),  # no such option
        (json.dumps({"option_ids": ["none", "none"]}).encode(), 422),  # repeated
    ]
    for raw, expected in cases:
        status, _, body = request(handle, "POST", url, raw=raw, headers=api_headers(handle))
        assert status == expected, (raw, status, body)
    status, _, _ = request(handle, "POST", "/api/prompts/nope/answer", {"option_ids": ["none"]}, api_headers(handle))
    assert status == 404
    assert agent.session.prompt_handle.state == "open" and handle.hub.prompt_state(prompt_id) == "open"
    chosen = cluster_options(agent)
    status, _, body = request(handle, "POST", url, {"option_ids": chosen, "operator": "ana"}, api_headers(handle))
    assert status == 200 and json.loads(body)["answer"]["operator"] == "ana"
    status, _, body = request(handle, "POST", url, {"option_ids": ["none"]}, api_headers(handle))
    assert status == 409 and json.loads(body)["code"] == "already_answered"
    assert agent.session.prompt_handle.answer.option_ids == tuple(chosen)
    assert wait_for(lambda: handle.hub.prompt_state(prompt_id) == "answered", 5)
    assert wait_for(lambda: agent.session.decision is not None, 30)  # the session went on with ana's answer
    assert agent.session.decision.answered_by == "ana"


def test_state_changing_requests_need_the_header_token(local: tuple[Agent, ConsoleHandle]) -> None:
    agent, handle = local
    prompt_id = ask_by_hand(agent, handle)
    url = f"/api/prompts/{prompt_id}/answer"
    token = handle.app.policy.api_token
    assert request(handle, "POST", url, {"option_ids": ["none"]})[0] == 401
    assert request(handle, "POST", url, {"option_ids": ["none"]}, {"X-Console-Token": "x" * 32})[0] == 401
    assert request(handle, "POST", url, {"option_ids": ["none"]}, {"Cookie": f"console_token={token}"})[0] == 401
    assert request(handle, "POST", "/api/control/abort", {}, {"Cookie": f"console_token={token}"})[0] == 401
    cross = {**api_headers(handle), "Origin": "http://evil.example"}
    assert request(handle, "POST", url, {"option_ids": ["none"]}, cross)[0] == 403
    assert request(handle, "GET", "/", headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding
    big = {**api_headers(handle), "Content-Length": str(10**9)}
    assert request(handle, "POST", url, raw=b"{}", headers=big)[0] == 413
    assert request(handle, "POST", url, raw=b" " * (70 * 1024), headers=api_headers(handle))[0] == 413
    assert agent.channel.handle(prompt_id).state == "open" and agent.session.state == "idle"


def test_token_is_required_off_loopback(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "session")
    policy = AccessPolicy("192.0.2.10")  # a non-loopback interface: token generated
    assert policy.token_generated and policy.access_token and len(policy.access_token) >= 16
    from agent.console.links import LocalLink

    # listen on loopback (tests must), but apply the policy of a non-loopback interface
    handle = ConsoleHandle(ConsoleApp(LocalLink(agent.session, agent.channel), policy), "127.0.0.1", 0).start()
    try:
        token = policy.access_token
        for path in ("/", "/api/state", "/static/app.js", "/session/atlas/heatmap.png", "/nothing"):
            assert request(handle, "GET", path)[0] == 401, path
            assert request(handle, "GET", path, headers={"Authorization": "Bearer wrong-token-123456"})[0] == 401
        status, headers, _body = request(handle, "GET", f"/?token={token}")
        assert status == 303 and headers["location"] == "/" and "console_token=" in headers.get("set-cookie", "")
        assert "httponly" in headers["set-cookie"].lower() and "samesite=lax" in headers["set-cookie"].lower()
        status, _, body = request(handle, "GET", "/", headers={"Cookie": f"console_token={token}"})
        assert status == 200 and token.encode() in body  # the page carries it for its X-Console-Token header
        assert request(handle, "GET", "/api/state", headers={"Cookie": f"console_token={token}"})[0] == 200
        assert request(handle, "GET", "/api/state", headers={"Authorization": f"Bearer {token}"})[0] == 200
        with pytest.raises(Exception, match="401"):
            ws_connect(f"ws://127.0.0.1:{handle.port}/ws", open_timeout=5).close()
        with ws_connect(f"ws://127.0.0.1:{handle.port}/ws?token={token}", open_timeout=5) as socket:
            assert json.loads(socket.recv(timeout=5))["type"] == "snapshot"
        # a cookie alone does not make a POST: the header is required
        cookie = {"Cookie": f"console_token={token}"}
        assert request(handle, "POST", "/api/control/pause", {}, cookie)[0] == 401
        assert request(handle, "POST", "/api/control/pause", {}, {**cookie, "X-Console-Token": token})[0] == 200
    finally:
        handle.stop()
        agent.stop()


def test_websocket_pushes_snapshot_then_live_events(local: tuple[Agent, ConsoleHandle]) -> None:
    agent, handle = local
    with ws_connect(f"ws://127.0.0.1:{handle.port}/ws", open_timeout=5) as socket:
        snapshot = json.loads(socket.recv(timeout=5))
        assert snapshot["type"] == "snapshot" and snapshot["agent_connected"]
        agent.bus.publish("state", state="mapping", microscope_time_s=12.5)
        message = json.loads(socket.recv(timeout=5))
        assert message["type"] == "event" and message["state"] == "mapping"
        assert message["microscope_time_s"] == 12.5
    cross = {"origin": "http://evil.example"}
    with pytest.raises(Exception, match="403"):
        ws_connect(f"ws://127.0.0.1:{handle.port}/ws", additional_headers=cross, open_timeout=5).close()


def test_pause_resume_abort_reach_the_session(paced: tuple[Agent, ConsoleHandle]) -> None:
    agent, handle = paced
    open_prompt(agent, handle)
    assert request(handle, "POST", "/api/control/pause", {}, api_headers(handle))[0] == 200
    answer_url = f"/api/prompts/{handle.hub.open_prompt_ids()[0]}/answer"
    assert request(handle, "POST", answer_url, {"option_ids": cluster_options(agent)}, api_headers(handle))[0] == 200
    assert wait_for(lambda: agent.session.state == "paused", 5)
    assert wait_for(lambda: handle.hub.state == "paused", 5)
    assert request(handle, "POST", "/api/control/resume", {}, api_headers(handle))[0] == 200
    assert wait_for(lambda: agent.session.state not in ("paused",), 5)
    assert request(handle, "POST", "/api/control/explode", {}, api_headers(handle))[0] == 404
    assert request(handle, "POST", "/api/control/abort", {}, api_headers(handle))[0] == 200
    agent.session.join(10)
    assert agent.session.state == "aborted"


def test_prompt_images_and_session_images_are_served(local: tuple[Agent, ConsoleHandle]) -> None:
    agent, handle = local
    prompt_id = open_prompt(agent, handle)
    status, headers, body = request(handle, "GET", f"/api/prompts/{prompt_id}/images/heatmap.png")
    assert status == 200 and body.startswith(b"\x89PNG") and headers["content-type"] == "image/png"
    assert request(handle, "GET", f"/api/prompts/{prompt_id}/images/other.png")[0] == 404
    request(handle, "POST", f"/api/prompts/{prompt_id}/answer", {"option_ids": cluster_options(agent)},
            api_headers(handle))
    agent.session.join(60)
    results = agent.session.results
    recorded = [target_id for target_id, result in results.items() if result.outcome == "recorded"]
    assert recorded, results  # the demo's seed records some
    assert request(handle, "GET", "/session/atlas/heatmap.png")[2].startswith(b"\x89PNG")
    assert request(handle, "GET", "/session/targets/T001/thumb")[2].startswith(b"\x89PNG")
    assert request(handle, "GET", f"/session/targets/{recorded[0]}/diffraction")[2].startswith(b"\x89PNG")
    # the page shows what the session did: every target's outcome, the counts and the diffracting chart
    snapshot = json.loads(request(handle, "GET", "/api/state")[2])
    outcomes = {t["target_id"]: t["outcome"] for t in snapshot["targets"]}
    assert outcomes == {target_id: result.outcome for target_id, result in results.items()}
    confirmed = sum(result.confirmed for result in results.values())
    assert snapshot["state"] == "done" and snapshot["progress"]["targets_confirmed"] == confirmed
    assert snapshot["progress"]["diffracting_crystals"] == len(recorded)
    assert [n for _, n in snapshot["chart"]] == list(range(1, len(recorded) + 1))


def test_remote_console_survives_the_agent_restarting(free_port: int, tmp_path: Path) -> None:
    control = f"tcp://127.0.0.1:{free_port}"  # a fixed control port, free now, re-used by the restarted agent
    first = Agent(tmp_path / "first", control_endpoint=control)
    handle = start_console_for_agent(control, "127.0.0.1", 0, status_interval_s=0.1)
    second = None
    try:
        link = handle.app.link
        assert isinstance(link, RemoteLink)
        first_prompt = ask_by_hand(first, handle)
        assert handle.hub.agent_connected and handle.hub.session_dir == tmp_path / "first"
        first.stop()  # the agent goes away: prompts cancelled, page told
        assert wait_for(lambda: not handle.hub.agent_connected, 10)
        assert handle.hub.prompt_state(first_prompt) == "cancelled"
        assert request(handle, "GET", "/api/state")[0] == 200  # the console itself is still up
        second = Agent(tmp_path / "second", control_endpoint=control)
        assert wait_for(lambda: handle.hub.agent_connected and handle.hub.session_dir == tmp_path / "second", 10)
        prompt_id = open_prompt(second, handle)
        chosen = cluster_options(second)[:1]
        status, _, _ = request(handle, "POST", f"/api/prompts/{prompt_id}/answer", {"option_ids": chosen},
                               api_headers(handle))
        assert status == 200
        assert wait_for(lambda: second.session.decision is not None, 30)
        assert second.session.answer is not None and second.session.answer.option_ids == tuple(chosen)
        assert wait_for(lambda: handle.hub.state in AFTER_LABELLING, 10)  # the second agent's events arrive
        assert link.attach_count >= 2
        assert request(handle, "POST", "/api/control/pause", {}, api_headers(handle))[0] == 200
    finally:
        handle.stop()
        if second is not None:
            second.stop()


def test_a_terminal_client_answering_first_closes_the_card(local: tuple[Agent, ConsoleHandle]) -> None:
    agent, handle = local
    prompt_id = ask_by_hand(agent, handle)
    with OperatorClient(agent.channel.prompt_endpoint, timeout_s=5) as client:
        client.answer(prompt_id, "none", operator="terminal")
    assert wait_for(lambda: handle.hub.prompt_state(prompt_id) == "answered", 5)
    status, _, _body = request(handle, "POST", f"/api/prompts/{prompt_id}/answer", {"option_ids": ["cluster-0"]},
                               api_headers(handle))
    assert status == 409
    card = next(p for p in json.loads(request(handle, "GET", "/api/state")[2])["prompts"] if p["id"] == prompt_id)
    assert card["answered_by"] == "terminal" and card["option_ids"] == ["none"]


def test_listen_and_token_file_parsing(tmp_path: Path) -> None:
    assert parse_listen("8765") == ("127.0.0.1", 8765)
    assert parse_listen("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("host:", "host:port", "70000"):
        with pytest.raises(ValueError, match="HOST:]PORT"):
            parse_listen(bad)
    good = tmp_path / "token"
    good.write_text("abcdefghijklmnopqrstuvwxyz\n")
    assert read_token_file(good) == "abcdefghijklmnopqrstuvwxyz"
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(SecurityError, match="16"):
        read_token_file(short)
    with pytest.raises(SecurityError, match="cannot read"):
        read_token_file(tmp_path / "missing")
    assert AccessPolicy("127.0.0.1").access_token is None
    assert AccessPolicy("localhost", "t" * 20).access_token == "t" * 20


# --------------------------------------------------------------------------------------------------
# Explore view over HTTP
# --------------------------------------------------------------------------------------------------


def blob_image(seed: int = 3, size: int = 384) -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit image with uneven illumination, noise, hot pixels and 6 bright blobs; returns it and the blob xy."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    image = 2000.0 + 300.0 * cols / size + rng.normal(0, 30, (size, size))
    centres = rng.uniform(40, size - 40, size=(6, 2))
    for col, row in centres:
        image += 1500.0 * np.exp(-((cols - col) ** 2 + (rows - row) ** 2) / (2 * 9.0**2))
    image[rng.integers(0, size, 20), rng.integers(0, size, 20)] = 65000  # hot pixels
    return np.clip(image, 0, 65535).astype(np.uint16), centres


def test_explore_upload_analyse_recluster_and_label(label_memory: LabelMemory, tmp_path: Path) -> None:
    import tifffile

    agent = Agent(tmp_path / "session")
    from agent.console.links import LocalLink

    app = ConsoleApp(LocalLink(agent.session, agent.channel), AccessPolicy("127.0.0.1"), labels=label_memory)
    handle = ConsoleHandle(app, "127.0.0.1", 0).start()
    try:
        image, centres = blob_image()
        path = tmp_path / "blobs.tif"
        tifffile.imwrite(path, image)
        headers = {**api_headers(handle), "X-Filename": "blobs.tif", "Content-Type": "application/octet-stream"}
        status, _, body = request(handle, "POST", "/api/explore/upload", raw=path.read_bytes(), headers=headers)
        assert status == 200, body
        opened = json.loads(body)
        assert opened["shape"] == [384, 384] and opened["dtype"] == "uint16"
        image_id = opened["image_id"]
        assert request(handle, "GET", opened["display_url"])[2].startswith(b"\x89PNG")
        url = f"/api/explore/{image_id}/analyse"
        settings = {"mode": "grid", "grid_rows": 32, "grid_cols": 32, "k": 3}
        first = json.loads(request(handle, "POST", url, settings, api_headers(handle))[2])
        assert first["features_cached"] is False and first["grid"] == [32, 32]
        labels_grid = np.frombuffer(__import__("base64").b64decode(first["labels_b64"]), dtype=np.uint8)
        assert labels_grid.size == 32 * 32 and set(np.unique(labels_grid)) <= {0, 1, 2}
        second = json.loads(request(handle, "POST", url, {**settings, "k": 4}, api_headers(handle))[2])
        assert second["features_cached"] is True and second["k"] == 4 and len(second["clusters"]) == 4
        # the suggested crystal cluster's regions lie on the planted blobs
        crystal = first["crystal_cluster"]
        assert crystal is not None
        found = np.array([[c["col_px"], c["row_px"]] for c in first["candidates"]])
        assert len(found) >= 4
        hits = sum(np.min(np.hypot(*(found - centre).T)) < 20 for centre in centres)
        assert hits >= 5, (found, centres)
        similar = json.loads(request(handle, "POST", url, {**settings, "reference_cell": [0, 0]},
                                     api_headers(handle))[2])
        assert similar["similarity_b64"] and similar["clusters_cached"] is True
        window = json.loads(request(handle, "POST", url, {"mode": "window", "window_px": 15, "stride_px": 8, "k": 3},
                                    api_headers(handle))[2])
        assert window["grid"] == [48, 48]
        for bad in ({"k": 1}, {"k": 3, "crystal_cluster": 5}, {"mode": "window", "window_px": 14},
                    {"mode": "grid", "grid_rows": 300, "grid_cols": 300}, {"bogus": 1}):
            assert request(handle, "POST", url, bad, api_headers(handle))[0] == 422, bad
        assert request(handle, "POST", "/api/explore/unknown/analyse", settings, api_headers(handle))[0] == 422
        mark = {"settings": settings, "cluster_id": crystal, "is_crystal": True, "specimen": "blobs"}
        status, _, body = request(handle, "POST", f"/api/explore/{image_id}/label", mark, api_headers(handle))
        assert status == 200, body
        records = LabelMemory(label_memory.folder).list_records()
        assert len(records) == 1 and records[0].source == "console" and records[0].is_crystal
        assert records[0].specimen == "blobs" and records[0].cluster_id == crystal
        # the session's atlas can be opened; other names cannot (no explore folder given)
        assert json.loads(request(handle, "GET", "/api/explore/files")[2]) == {"atlas": False, "files": []}
        (tmp_path / "session" / "atlas").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tmp_path / "session" / "atlas" / "atlas.tif", image)
        assert json.loads(request(handle, "GET", "/api/explore/files")[2])["atlas"] is True
        status, _, body = request(handle, "POST", "/api/explore/open", {"source": "atlas"}, api_headers(handle))
        assert status == 200 and json.loads(body)["shape"] == [384, 384]
        for bad, expected in (({"source": "file", "name": "../session/atlas/atlas.tif"}, 404),
                              ({"source": "file", "name": "/etc/passwd"}, 404), ({"source": "evil"}, 400)):
            assert request(handle, "POST", "/api/explore/open", bad, api_headers(handle))[0] == expected, bad
        # bad uploads: wrong type, corrupt file
        assert request(handle, "POST", "/api/explore/upload", raw=b"x", headers={**headers, "X-Filename": "a.exe"})[0] \
            == 415
        assert request(handle, "POST", "/api/explore/upload", raw=b"not a tiff", headers=headers)[0] == 422
        assert len(LabelMemory(label_memory.folder).list_records()) == 1
    finally:
        handle.stop()
        agent.stop()


def test_explore_cluster_vectors_match_the_locators_for_label_memory() -> None:
    """A cluster marked in the explore view is stored as the screening loop would store it: its normalised
    centroid is close (signed-log RMS < the label memory's kernel width) to `analyse`'s for the same cluster,
    and a bright-field / dark-field pair of the same image gives the same vector (polarity-invariant)."""
    from agent.console.explore import ExploreEngine, ExploreSettings
    from agent.locate.analysis import LocateSettings, analyse
    from agent.prompts.label_votes import DEFAULT_BANDWIDTH, signed_log

    image, _ = blob_image()
    analysis = analyse(image, LocateSettings(grid_rows=32, grid_cols=32, k=3))
    locator = np.asarray(max(analysis.clusters, key=lambda c: c.texture_contrast).normalised_centroid)
    engine = ExploreEngine()
    settings = ExploreSettings(grid_rows=32, grid_cols=32, k=3)
    vectors = []
    for array in (image, (65535 - image.astype(np.int64)).astype(np.uint16)):  # bright field, dark field
        opened = engine.open(array, "blobs")
        result = engine.analyse(opened.image_id, settings)
        assert result["suggested_cluster"] is not None
        vector, names = engine.cluster_vector(opened.image_id, settings, result["suggested_cluster"])
        assert names == analysis.feature_names
        vectors.append(np.asarray(vector))
    distance = float(np.sqrt(np.mean((signed_log(vectors[0]) - signed_log(locator)) ** 2)))
    assert distance < DEFAULT_BANDWIDTH, (vectors[0], locator)
    polarity = float(np.sqrt(np.mean((signed_log(vectors[0]) - signed_log(vectors[1])) ** 2)))
    assert polarity < DEFAULT_BANDWIDTH, vectors


def test_console_command_rejects_bad_options_with_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    short = tmp_path / "token"
    short.write_text("short\n")
    cases = [
        (["console", "--agent", "tcp://127.0.0.1:1", "--listen", "nowhere:"], "HOST:]PORT"),
        (["console", "--agent", "tcp://127.0.0.1:1", "--listen", "0", "--token-file", str(short)], "16 printable"),
        (["console", "--agent", "localhost:5562", "--listen", "0", "--labels", str(tmp_path / "l")], "tcp://HOST:PORT"),
        (["console", "--agent", "tcp://127.0.0.1:1", "--explore-dir", str(tmp_path / "missing")], "not a folder"),
        (["console", "--demo", "--step-s", "-1"], "--step-s must be >= 0"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    for argv in (["console"], ["console", "--agent", "tcp://127.0.0.1:1", "--demo"]):  # one of the two
        with pytest.raises(SystemExit):
            main(argv)
        assert "--agent" in capsys.readouterr().err


def test_the_demo_pace_costs_wall_time_only() -> None:
    """`PacedMicroscope` is a `Microscope` that delegates every call: moves, preset changes and exposures take
    `step_s` more wall time, reads none, and clock, stage and images are those of the microscope it wraps."""
    from agent.console.demo import PacedMicroscope
    from drivers.base import Microscope

    def act_then_read(scope: Any) -> tuple[np.ndarray, tuple[Any, ...], float, float]:
        """Preset, move, exposure; then twenty reads: the image, the last read and both wall times (s)."""
        start_s = time.perf_counter()
        scope.set_preset("search")
        scope.move_stage(x_um=10.0, y_um=-5.0)
        image = scope.acquire(0.5).image
        acting_s, start_s = time.perf_counter() - start_s, time.perf_counter()
        reads = [(scope.get_stage(), scope.get_preset(), scope.microscope_time_s()) for _ in range(20)]
        return image, reads[-1], acting_s, time.perf_counter() - start_s

    paced = PacedMicroscope(demo_microscope(seed=3)[0], step_s=0.1)
    assert isinstance(paced, Microscope)
    plain_image, plain_read, _, _ = act_then_read(demo_microscope(seed=3)[0])
    paced_image, paced_read, acting_s, reading_s = act_then_read(paced)
    assert np.array_equal(plain_image, paced_image) and plain_read == paced_read
    assert acting_s >= 0.3 and reading_s < 1.0  # three paced calls; twenty reads would take 2 s if paced


def test_an_answer_after_the_deadline_is_refused_as_expired(tmp_path: Path) -> None:
    agent = Agent(tmp_path / "session", prompt_timeout_s=0.5)
    handle = start_console_for_session(agent.session, agent.channel, "127.0.0.1", 0)
    try:
        prompt_id = open_prompt(agent, handle)
        assert wait_for(lambda: handle.hub.prompt_state(prompt_id) == "expired", 10)
        status, _, body = request(handle, "POST", f"/api/prompts/{prompt_id}/answer", {"option_ids": ["none"]},
                                  api_headers(handle))
        assert status == 409 and json.loads(body)["code"] == "expired"
        assert wait_for(lambda: agent.session.decision is not None, 30)  # the fallback went on
        assert agent.session.answer is None and agent.session.decision.answered_by is None
        assert all(source.startswith("fallback") for source in agent.session.decision.sources.values())
    finally:
        handle.stop()
        agent.stop()
