"""Operator prompts over real ZeroMQ sockets on 127.0.0.1: answers, races, expiry, bad input, CURVE."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq
from pydantic import ValidationError

from agent.prompts import (
    AnswerReply,
    InvalidAnswerError,
    OperatorChannel,
    OperatorClient,
    OperatorSecurityError,
    OperatorTimeoutError,
    Prompt,
    PromptAlreadyAnsweredError,
    PromptClosed,
    PromptClosedError,
    PromptExpiredError,
    PromptInfo,
    PromptNotFoundError,
    PromptOption,
    save_prompt_images,
)
from drivers.formats.images import encode_png
from drivers.network import is_loopback_endpoint


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_png(rng.integers(0, 255, size=(16, 24), dtype=np.uint8))


def _prompt(timeout_s: float = 20.0, multiple: bool = False, images: dict[str, bytes] | None = None) -> Prompt:
    return Prompt(
        kind="crystal-clusters",
        question="Which cluster holds crystals?",
        options=(
            PromptOption(id="cluster-0", label="cluster 0", context={"cluster_id": 0}),
            PromptOption(id="cluster-1", label="cluster 1", context={"cluster_id": 1}),
            PromptOption(id="none", label="none of these"),
        ),
        multiple=multiple,
        timeout_s=timeout_s,
        images=images or {},
        context={"specimen": "protein-plates"},
    )


def _next_of(client: OperatorClient, kind: type, prompt_id: str, limit_s: float = 5.0) -> object:
    """The next event of `kind` about `prompt_id`, within a bounded number of polls."""
    for _ in range(int(limit_s / 0.1)):
        event = client.next_event(0.1)
        if isinstance(event, kind):
            event_id = event.id if isinstance(event, PromptInfo) else event.prompt_id
            if event_id == prompt_id:
                return event
    raise AssertionError(f"no {kind.__name__} for {prompt_id} within {limit_s} s")


def test_prompt_answered_by_a_client(operator_channel: OperatorChannel) -> None:
    images = {"heatmap": _png(1), "gallery": _png(2)}
    seen: list[tuple[str, dict]] = []
    operator_channel.add_listener(lambda kind, payload: seen.append((kind, payload)))
    operator_channel.add_listener(lambda kind, payload: 1 / 0)  # a broken listener changes nothing
    handle = operator_channel.ask(_prompt(images=images))
    assert handle.state == "open" and handle.answer is None
    assert operator_channel.prompt_endpoint.startswith("tcp://127.0.0.1:")
    with OperatorClient(operator_channel.prompt_endpoint) as client:
        info = _next_of(client, PromptInfo, handle.id)
        assert isinstance(info, PromptInfo)
        assert info.images == images and info.image_names == ("heatmap", "gallery")
        assert [o.id for o in info.options] == ["cluster-0", "cluster-1", "none"]
        assert info.options[1].context == {"cluster_id": 1}
        assert 0 < info.seconds_left_now() <= 20.0
        reply = client.answer(handle.id, ["cluster-1"], operator="alice")
        assert isinstance(reply, AnswerReply) and reply.option_ids == ("cluster-1",)
        answer = handle.wait(5.0)
        assert answer is not None and answer.operator == "alice" and answer.option_ids == ("cluster-1",)
        assert handle.state == "answered"
        closed = _next_of(client, PromptClosed, handle.id)
        assert isinstance(closed, PromptClosed)
        assert closed.state == "answered" and closed.answered_by == "alice"
        assert client.open_prompts() == []
    assert operator_channel.stats["answered"] == 1
    assert [kind for kind, _ in seen] == ["asked", "closed"]
    assert seen[0][1]["image_names"] == ["heatmap", "gallery"] and seen[1][1]["answered_by"] == "alice"


def test_two_clients_race_exactly_one_wins(operator_channel: OperatorChannel) -> None:
    handle = operator_channel.ask(_prompt())
    results: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def answer(name: str, option: str) -> None:
        with OperatorClient(operator_channel.prompt_endpoint) as client:
            barrier.wait(timeout=5)
            try:
                results[name] = client.answer(handle.id, [option], operator=name)
            except PromptAlreadyAnsweredError as exc:
                results[name] = exc

    threads = [threading.Thread(target=answer, args=(n, o)) for n, o in (("ann", "cluster-0"), ("bob", "cluster-1"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    winners = [n for n, r in results.items() if isinstance(r, AnswerReply)]
    losers = [n for n, r in results.items() if isinstance(r, PromptAlreadyAnsweredError)]
    assert len(winners) == 1 and len(losers) == 1
    answer = handle.wait(1.0)
    assert answer is not None and answer.operator == winners[0]
    assert winners[0] in str(results[losers[0]])  # the loser is told who answered
    assert answer.option_ids == (("cluster-0",) if winners[0] == "ann" else ("cluster-1",))


def test_other_clients_are_told_when_a_prompt_is_answered(operator_channel: OperatorChannel) -> None:
    endpoint = operator_channel.prompt_endpoint
    with OperatorClient(endpoint) as watcher, OperatorClient(endpoint) as answerer:
        watcher.next_event(0.2)  # joined and listening
        handle = operator_channel.ask(_prompt())
        _next_of(watcher, PromptInfo, handle.id)
        answerer.answer(handle.id, "none", operator="carol")
        closed = _next_of(watcher, PromptClosed, handle.id)
        assert isinstance(closed, PromptClosed) and closed.answered_by == "carol" and closed.option_ids == ("none",)


def test_deadline_expires_prompt_and_late_answer_is_refused(operator_channel: OperatorChannel) -> None:
    with OperatorClient(operator_channel.prompt_endpoint) as client:
        handle = operator_channel.ask(_prompt(timeout_s=0.4))
        assert handle.wait(None) is None  # waits at most until the deadline
        assert handle.state == "expired" and handle.answer is None
        closed = _next_of(client, PromptClosed, handle.id)
        assert isinstance(closed, PromptClosed) and closed.state == "expired"
        with pytest.raises(PromptExpiredError):
            client.answer(handle.id, ["cluster-0"], operator="late")
    assert handle.answer is None and operator_channel.stats["expired"] == 1


def test_wait_with_short_timeout_leaves_prompt_open(operator_channel: OperatorChannel) -> None:
    handle = operator_channel.ask(_prompt(timeout_s=30))
    assert handle.wait(0.05) is None
    assert handle.state == "open"  # the loop can go on working and look again later
    with OperatorClient(operator_channel.prompt_endpoint) as client:
        client.answer(handle.id, "cluster-0")
    assert handle.wait(5) is not None and handle.answer.operator == "anonymous"


@pytest.mark.parametrize(
    ("option_ids", "multiple"),
    [
        (["cluster-7"], False),
        (["cluster-0", "cluster-1"], False),
        ([], True),
        (["cluster-0", "cluster-0"], True),
    ],
)
def test_invalid_answers_are_refused_and_change_nothing(
    operator_channel: OperatorChannel, option_ids: list[str], multiple: bool
) -> None:
    handle = operator_channel.ask(_prompt(multiple=multiple))
    with OperatorClient(operator_channel.prompt_endpoint) as client:
        with pytest.raises(InvalidAnswerError):
            client.answer(handle.id, option_ids, operator="eve")
        assert handle.state == "open" and handle.answer is None
        assert [p.id for p in client.open_prompts()] == [handle.id]
        with pytest.raises(PromptNotFoundError):
            client.answer("no-such-prompt", ["cluster-0"])
        chosen = ["cluster-0", "cluster-1"] if multiple else ["cluster-1"]
        assert client.answer(handle.id, chosen, operator="dan").option_ids == tuple(chosen)
    assert handle.answer is not None and handle.answer.operator == "dan"


def _raw_request(endpoint: str, frames: list[bytes]) -> dict:
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart(frames)
        assert sock.poll(5000), "no reply to a malformed request"
        reply = sock.recv_multipart()
    return json.loads(reply[1] if reply[0] == b"" else reply[0])


@pytest.mark.parametrize(
    "payload",
    [
        b"not json at all",
        b"\xff\xfe\x00garbage",
        b"[" * 100_000,
        json.dumps([1, 2, 3]).encode(),
        json.dumps({"v": 1, "type": "answer", "request_id": "r1", "prompt_id": "PID", "option_ids": "a"}).encode(),
        json.dumps({"v": 1, "type": "answer", "request_id": "r1", "prompt_id": "PID", "option_ids": [0]}).encode(),
        json.dumps({"v": 1, "type": "answer", "request_id": "r1", "prompt_id": "PID"}).encode(),
        json.dumps({"v": 99, "type": "list", "request_id": "r1"}).encode(),
        json.dumps({"v": 1, "type": "launch", "request_id": "r1"}).encode(),
        json.dumps({"v": 1, "type": "answer", "request_id": "r1", "prompt_id": "PID", "option_ids": ["cluster-0"],
                    "operator": "x", "admin": True}).encode(),
    ],
)
def test_malformed_requests_get_an_error_reply_and_change_nothing(
    operator_channel: OperatorChannel, payload: bytes
) -> None:
    handle = operator_channel.ask(_prompt())
    reply = _raw_request(operator_channel.prompt_endpoint, [b"", payload.replace(b"PID", handle.id.encode())])
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request" and reply["error"]["message"]
    assert handle.state == "open" and handle.answer is None


def test_garbage_on_the_sockets_leaves_the_channel_alive(operator_channel: OperatorChannel) -> None:
    rng = np.random.default_rng(7)
    for endpoint in (operator_channel.prompt_endpoint, operator_channel.event_endpoint):  # raw TCP garbage, not ZMTP
        port = int(endpoint.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            raw.sendall(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:  # ZMTP but nonsense frames, one oversize
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(operator_channel.prompt_endpoint)
        for _ in range(20):
            count = int(rng.integers(1, 5))
            sock.send_multipart([rng.bytes(int(rng.integers(0, 64))) for _ in range(count)])
        sock.send_multipart([b"", b"x" * (2 * 1024 * 1024)])
    handle = operator_channel.ask(_prompt())
    with OperatorClient(operator_channel.prompt_endpoint) as client:
        assert client.answer(handle.id, ["cluster-0"], operator="after-garbage").accepted
    assert handle.answer is not None and handle.answer.operator == "after-garbage"


def test_late_joiner_sees_open_prompts_with_images(operator_channel: OperatorChannel, tmp_path: Path) -> None:
    first = operator_channel.ask(_prompt(images={"heatmap": _png(3)}))
    second = operator_channel.ask(_prompt(images={"gallery": _png(4), "heatmap": _png(5)}))
    with OperatorClient(operator_channel.prompt_endpoint) as client:
        listed = {p.id: p for p in client.open_prompts()}
        assert set(listed) == {first.id, second.id}
        assert listed[second.id].images == {"gallery": _png(4), "heatmap": _png(5)}
        seen = [client.next_event(1.0), client.next_event(1.0)]
        assert {e.id for e in seen if isinstance(e, PromptInfo)} == {first.id, second.id}
        assert client.next_event(0.2) is None  # each prompt delivered once
        paths = save_prompt_images(listed[first.id], tmp_path)
        assert [p.read_bytes() for p in paths] == [_png(3)]


def test_cancelled_prompt_refuses_answers(operator_channel: OperatorChannel) -> None:
    handle = operator_channel.ask(_prompt())
    assert handle.cancel() is True and handle.cancel() is False
    assert handle.state == "cancelled"
    with OperatorClient(operator_channel.prompt_endpoint) as client, pytest.raises(PromptClosedError):
        client.answer(handle.id, ["cluster-0"])
    assert handle.answer is None


def test_prompt_validation() -> None:
    with pytest.raises(ValidationError):
        Prompt(question="q", options=(PromptOption(id="a", label="A"), PromptOption(id="a", label="B")))
    with pytest.raises(ValidationError):
        Prompt(question="q", options=(PromptOption(id="a", label="A"),), images={"heatmap": b"GIF89a..."})
    with pytest.raises(ValidationError):
        Prompt(question="q", options=(PromptOption(id="a", label="A"),), images={"../etc": _png(1)})
    with pytest.raises(ValidationError):
        PromptOption(id="a", label="A", context={"bad": object()})
    with pytest.raises(ValidationError):
        Prompt(question="q", options=())


def test_non_loopback_needs_curve() -> None:
    assert is_loopback_endpoint("tcp://127.0.0.1:5555") and is_loopback_endpoint("ipc:///tmp/x")
    assert not is_loopback_endpoint("tcp://0.0.0.0:5555") and not is_loopback_endpoint("tcp://*:5555")
    with pytest.raises(OperatorSecurityError, match="CURVE"):
        OperatorChannel("tcp://0.0.0.0:0")
    with pytest.raises(OperatorSecurityError, match="CURVE"):
        OperatorChannel("tcp://127.0.0.1:0", event_endpoint="tcp://*:0")


def test_curve_allows_known_clients_only(tmp_path: Path) -> None:
    import zmq.auth

    allowed, unknown, server_dir = tmp_path / "allowed", tmp_path / "unknown", tmp_path / "server"
    for folder in (allowed, unknown, server_dir):
        folder.mkdir()
    server_public, server_secret = zmq.auth.create_certificates(server_dir, "server")
    zmq.auth.create_certificates(allowed, "alice")
    _, stranger_secret = zmq.auth.create_certificates(unknown, "mallory")
    with OperatorChannel(curve=server_secret, allowed_client_keys=[allowed], require_curve=True) as channel:
        handle = channel.ask(_prompt())
        with pytest.raises(OperatorTimeoutError):
            OperatorClient(
                channel.prompt_endpoint,
                timeout_s=0.5,
                curve_keys=stranger_secret,
                server_public_key=server_public,
            )
        with pytest.raises(OperatorTimeoutError):
            OperatorClient(channel.prompt_endpoint, timeout_s=0.5)  # no CURVE at all
        with OperatorClient(
            channel.prompt_endpoint,
            curve_keys=allowed / "alice.key_secret",
            server_public_key=server_public,
        ) as client:
            info = _next_of(client, PromptInfo, handle.id)
            assert isinstance(info, PromptInfo)
            client.answer(handle.id, ["cluster-0"], operator="alice")
        assert handle.wait(5) is not None and handle.answer.operator == "alice"


def test_client_times_out_without_an_agent_and_channel_rejects_reuse(free_port: int) -> None:
    with pytest.raises(OperatorTimeoutError):
        OperatorClient(f"tcp://127.0.0.1:{free_port}", timeout_s=0.3)
    channel = OperatorChannel()
    prompt = _prompt()
    channel.ask(prompt)
    with pytest.raises(Exception, match="already used"):
        channel.ask(prompt)
    channel.close()
    channel.close()
    with pytest.raises(Exception, match="closed"):
        channel.ask(_prompt())


def test_many_prompts_stay_responsive(operator_channel: OperatorChannel) -> None:
    handles = [operator_channel.ask(_prompt(timeout_s=30)) for _ in range(50)]
    with OperatorClient(operator_channel.prompt_endpoint) as client:
        assert len(client.open_prompts()) == 50
        for i, handle in enumerate(handles):
            client.answer(handle.id, ["cluster-0" if i % 2 else "cluster-1"], operator=f"op{i}")
    assert all(h.state == "answered" for h in handles)
    assert [h.answer.operator for h in handles] == [f"op{i}" for i in range(50)]
    assert operator_channel.open_prompts() == []


def test_client_survives_an_agent_restart_on_the_same_endpoints() -> None:
    first = OperatorChannel()
    prompt_endpoint, event_endpoint = first.prompt_endpoint, first.event_endpoint
    with OperatorClient(prompt_endpoint, timeout_s=0.5) as client:
        old = first.ask(_prompt())
        _next_of(client, PromptInfo, old.id)
        first.close()  # the agent stops: its open prompt is withdrawn
        with pytest.raises(OperatorTimeoutError):
            client.answer(old.id, "cluster-0")
        with OperatorChannel(prompt_endpoint, event_endpoint=event_endpoint) as second:
            for _ in range(50):  # bounded: the SUB socket reconnects by itself
                new = second.ask(_prompt())
                event = client.next_event(0.1)
                while isinstance(event, PromptClosed):
                    event = client.next_event(0.1)
                if isinstance(event, PromptInfo) and event.id == new.id:
                    break
                new.cancel()
            else:
                raise AssertionError("the client never saw a prompt from the restarted agent")
            assert client.answer(new.id, "cluster-1", operator="back").accepted
            assert new.wait(5) is not None
            with pytest.raises(PromptNotFoundError):
                client.answer(old.id, "cluster-0")  # the new agent never asked the old prompt
