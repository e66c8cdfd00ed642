"""Bridge benchmark: status round-trip latency and 4096x4096 uint16 frame throughput over loopback.

Run by hand: `.venv/bin/python benchmarks/bench_bridge.py [--calls 2000] [--frames 10] [--size 4096]`.

Prints, in one process:
- status calls (`get_stage`) over the bridge vs a direct in-process call on the same simulator;
- `acquire` of a 4096x4096 uint16 frame over the bridge vs a plain in-process copy of the same bytes
  (`ndarray.copy()`), vs the same bytes sent bare over pyzmq (the floor for any ZeroMQ bridge), and
  vs a naive JSON bridge encoding (base64 text in JSON, encode + decode, no network at all), the way
  many lab bridges ship arrays.

The frame is rendered once by the simulator and then returned by every `acquire` (a small wrapper),
so the figures measure the bridge, not the renderer.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time
from typing import Any

import numpy as np
import zmq

from drivers.base import Frame
from drivers.zmq_bridge import BridgeClient, BridgeServer


class FixedFrameMicroscope:
    """The real simulator, whose `acquire` returns one pre-rendered frame (renders cost seconds at 4k)."""

    def __init__(self, inner: Any, frame: Frame) -> None:
        self._inner = inner
        self._frame = frame

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def acquire(self, exposure_s: float) -> Frame:
        """The stored frame."""
        return self._frame


def _median_s(samples: list[float]) -> float:
    return statistics.median(samples)


def bench_status(client: BridgeClient, microscope: Any, calls: int) -> None:
    """Round-trip time of get_stage over the bridge vs a direct call."""
    for _ in range(50):
        client.get_stage()
    remote = []
    for _ in range(calls):
        start = time.perf_counter()
        client.get_stage()
        remote.append(time.perf_counter() - start)
    local = []
    for _ in range(calls):
        start = time.perf_counter()
        microscope.get_stage()
        local.append(time.perf_counter() - start)
    remote.sort()
    print(f"status get_stage x{calls}: bridge median {_median_s(remote) * 1e6:.0f} us, "
          f"p99 {remote[int(0.99 * len(remote))] * 1e6:.0f} us; direct median {_median_s(local) * 1e6:.1f} us; "
          f"ratio {_median_s(remote) / _median_s(local):.0f}x")


def _raw_zmq_transfer_s(image: np.ndarray, count: int) -> float:
    """Median time of a bare request + zero-copy reply of the same bytes over pyzmq on loopback."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    samples = []
    for _ in range(count + 1):
        start = time.perf_counter()
        dealer.send(b"go")
        identity, _ = router.recv_multipart()
        router.send_multipart([identity, image], copy=False)
        dealer.recv(copy=False)
        samples.append(time.perf_counter() - start)
    dealer.close(linger=0)
    router.close(linger=0)
    context.term()
    return _median_s(samples[1:])


def bench_frames(client: BridgeClient, frame: Frame, count: int) -> None:
    """acquire over the bridge vs in-process copy and naive JSON+base64 encoding."""
    nbytes = frame.image.nbytes
    client.acquire(0.1)  # warm up
    remote = []
    for _ in range(count):
        start = time.perf_counter()
        received = client.acquire(0.1)
        remote.append(time.perf_counter() - start)
    assert np.array_equal(received.image, frame.image)
    copies = []
    for _ in range(count):
        start = time.perf_counter()
        frame.image.copy()
        copies.append(time.perf_counter() - start)
    naive = []
    for _ in range(max(1, count // 3)):
        start = time.perf_counter()
        text = json.dumps({"shape": frame.image.shape, "data": base64.b64encode(frame.image.tobytes()).decode()})
        decoded = json.loads(text)
        np.frombuffer(base64.b64decode(decoded["data"]), dtype=np.uint16).reshape(decoded["shape"])
        naive.append(time.perf_counter() - start)
    raw_zmq = _raw_zmq_transfer_s(frame.image, count)
    mib = nbytes / 2**20
    r, c, n = _median_s(remote), _median_s(copies), _median_s(naive)
    print(f"frame {frame.shape_px[0]}x{frame.shape_px[1]} uint16 ({mib:.0f} MiB) x{count}:")
    print(f"  bridge acquire   median {r * 1e3:7.1f} ms  ({mib / r:7.0f} MiB/s)")
    print(f"  in-process copy  median {c * 1e3:7.1f} ms  ({mib / c:7.0f} MiB/s)  bridge / copy = {r / c:.1f}x")
    print(f"  raw pyzmq send   median {raw_zmq * 1e3:7.1f} ms  ({mib / raw_zmq:7.0f} MiB/s)  "
          f"bridge / raw pyzmq = {r / raw_zmq:.2f}x (DEALER/ROUTER, same bytes, no protocol)")
    print(f"  naive JSON+b64   median {n * 1e3:7.1f} ms  ({mib / n:7.0f} MiB/s)  naive / bridge = {n / r:.1f}x "
          "(encode+decode only, no network)")


def main() -> None:
    """Run both benchmarks against the simulator on 127.0.0.1."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=10)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()

    from simulator.microscope import SimulatedMicroscope
    from simulator.specimen import generate_specimen

    print(f"rendering one {args.size}x{args.size} frame with the simulator ...", flush=True)
    simulator = SimulatedMicroscope(generate_specimen("protein-plates", 0), seed=0,
                                    camera_shape_px=(args.size, args.size))
    frame = simulator.acquire(0.5)
    microscope = FixedFrameMicroscope(simulator, frame)
    with BridgeServer(microscope, "tcp://127.0.0.1:0") as server, BridgeClient(server.endpoint) as client:  # type: ignore[arg-type]
        bench_status(client, simulator, args.calls)
        bench_frames(client, frame, args.frames)


if __name__ == "__main__":
    main()
