"""`crystal-locator bridge serve|ping|keys`: run the ZeroMQ microscope bridge and check it.

- `bridge serve --simulated [--specimen T] [--seed N] [--tiles DIR]` serves the simulated microscope;
  `bridge serve --adapter temscript --adapter-config scope.json` serves a Thermo Fisher / FEI instrument
  (`--adapter temscript-null` the temscript NullMicroscope, for trying things out); `--adapter serialem
  [--serialem-host H --serialem-port P] [--adapter-config scope.json]` any instrument SerialEM drives, and
  `--adapter serialem-emulator` the simulated microscope behind a SerialEM emulator. Default endpoint
  `tcp://127.0.0.1:5555`; any non-loopback endpoint needs `--curve-dir DIR` (holding
  `server.key_secret`) and at least one `--allow KEYFILE` (client public keys). Stops cleanly on
  Ctrl-C or SIGTERM.
- `bridge ping ENDPOINT` connects (handshake), prints the server's info and round-trip times.
- `bridge keys --out DIR [--name NAME]` writes a CURVE key pair `NAME.key` / `NAME.key_secret`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import signal
import statistics
import sys
import threading
from pathlib import Path
from typing import Any

from agent.cli import CommandError


def register(subparsers: Any) -> None:
    """Add the `bridge` command group."""
    bridge = subparsers.add_parser("bridge", help="serve a microscope over ZeroMQ, ping a bridge, make CURVE keys")
    sub = bridge.add_subparsers(dest="bridge_command", metavar="SUBCOMMAND", required=True)

    serve = sub.add_parser("serve", help="serve a microscope (simulated or a vendor adapter) over ZeroMQ")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--simulated", action="store_true", help="serve the simulated microscope")
    source.add_argument("--adapter", choices=("temscript", "temscript-null", "serialem", "serialem-emulator"),
                        help="serve a vendor adapter (serialem-emulator: the simulated microscope behind SerialEM's)")
    serve.add_argument("--adapter-config", type=Path, default=None, help="JSON preset config of the adapter")
    serve.add_argument("--serialem-host", default=None, help="where SerialEM listens (default: config, 127.0.0.1)")
    serve.add_argument("--serialem-port", type=int, default=None, help="SerialEM's SocketServerPort 7 (default 48888)")
    serve.add_argument("--specimen", default="protein-plates", help="simulated specimen type")
    serve.add_argument("--seed", type=int, default=0, help="seed of the simulated specimen")
    serve.add_argument("--tiles", type=Path, default=None, help="serve this folder of real tiles (simulated)")
    serve.add_argument("--cassette", metavar="default|FILE.json", default=None,
                       help="serve a simulated autoloader cassette of grids (for `screen --bridge ... --grids`)")
    serve.add_argument("--pixel-size-um", type=float, default=None, help="um per pixel of --tiles if files do not say")
    serve.add_argument("--camera-px", type=int, default=None, help="simulated camera size (square), pixels")
    serve.add_argument("--instrument-seed", type=int, default=0, metavar="N",
                       help="which simulated instrument (camera rotation and scale errors; name simulated-tem[-N])")
    serve.add_argument("--clock", metavar="PROFILE", default=None,
                       help="simulated timing: thermo-serialem (default), krios, jeol-fast, or a .json of figures")
    serve.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="where to bind (default loopback 5555)")
    serve.add_argument("--event-endpoint", default=None, help="where to publish state events (PUB), optional")
    serve.add_argument("--curve-dir", type=Path, default=None, help="folder with the server's server.key_secret")
    serve.add_argument("--allow", type=Path, action="append", default=[], metavar="KEYFILE",
                       help="client public key file (or folder of *.key) allowed to connect; repeatable")
    serve.add_argument("--max-message-bytes", type=int, default=1024 * 1024, help="largest request accepted")
    serve.set_defaults(handler=_serve)

    ping = sub.add_parser("ping", help="connect to a bridge, show its info and round-trip times")
    ping.add_argument("endpoint", help="e.g. tcp://127.0.0.1:5555")
    ping.add_argument("--count", type=int, default=5, help="number of status calls to time")
    ping.add_argument("--timeout-s", type=float, default=5.0, help="time limit of each call, seconds")
    ping.add_argument("--curve-secret", type=Path, default=None, help="this client's CURVE .key_secret file")
    ping.add_argument("--server-key", type=Path, default=None, help="the server's CURVE public .key file")
    ping.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ping.set_defaults(handler=_ping)

    keys = sub.add_parser("keys", help="create a CURVE key pair (NAME.key public, NAME.key_secret private)")
    keys.add_argument("--out", type=Path, required=True, help="folder to write the keys to")
    keys.add_argument("--name", default="server", help="key name: 'server' on the microscope PC, any for clients")
    keys.set_defaults(handler=_keys)


def _make_simulated(args: argparse.Namespace) -> Any:
    try:
        import simulator
    except ImportError as exc:  # pragma: no cover - the simulator ships with the package
        raise CommandError(f"the simulator cannot be imported: {exc}") from exc
    factory = getattr(simulator, "create_simulated_microscope", None)
    if factory is None:  # pragma: no cover
        raise CommandError("this installation has no simulator.create_simulated_microscope")
    from agent.commands.screen import clock_profile_arg

    kwargs: dict[str, Any] = {"specimen_type": args.specimen, "seed": args.seed,
                              "clock_profile": clock_profile_arg(args.clock)}
    if args.camera_px is not None:
        kwargs["camera_shape_px"] = (args.camera_px, args.camera_px)
    kwargs["instrument_seed"] = args.instrument_seed
    if getattr(args, "cassette", None) is not None:
        if args.tiles is not None:
            raise CommandError("--cassette serves a simulated autoloader cassette; it does not go with --tiles")
        from agent.commands.grid_run import cassette_arg
        from agent.commands.screen import cassette_spec

        kwargs["cassette"] = cassette_spec(cassette_arg(args.cassette))
    if args.tiles is not None:
        accepted = inspect.signature(factory).parameters
        name = next((n for n in ("tiles_dir", "tiles", "tile_dir") if n in accepted), None)
        if name is None:
            raise CommandError("this simulator cannot serve tile folders (no tiles parameter)")
        if not args.tiles.is_dir():
            raise CommandError(f"{args.tiles}: no such folder of tiles")
        kwargs[name] = args.tiles
        if args.pixel_size_um is not None and "pixel_size_um" in accepted:
            kwargs["pixel_size_um"] = args.pixel_size_um
    try:
        return factory(**kwargs)
    except (ValueError, OSError) as exc:
        raise CommandError(f"cannot create the simulated microscope: {exc}") from exc


def _make_adapter(args: argparse.Namespace) -> Any:
    from drivers.base import MicroscopeError

    if args.adapter in ("serialem", "serialem-emulator"):
        return _make_serialem(args)
    from drivers.temscript_adapter import TemscriptConfig, create_temscript_microscope

    try:
        config = TemscriptConfig.from_file(args.adapter_config) if args.adapter_config else None
        kind = "null" if args.adapter == "temscript-null" else "local"
        return create_temscript_microscope(kind, config)
    except MicroscopeError as exc:
        raise CommandError(str(exc)) from exc


def _make_serialem(args: argparse.Namespace) -> Any:
    """`--adapter serialem`: the SerialEM at --serialem-host/--serialem-port (else the config's); `serialem-emulator`:
    the simulated microscope of --specimen/--seed/... behind `simulator.serialem_emulator`."""
    from drivers.base import MicroscopeError
    from drivers.serialem_adapter import SerialEMConfig, SerialEMMicroscope, connect_serialem

    try:
        if args.adapter == "serialem-emulator":
            from simulator.serialem_emulator import make_serialem_module

            module = make_serialem_module(_make_simulated(args))
            return SerialEMMicroscope(module, module.emulator.config())
        if args.adapter_config is None:
            raise CommandError("--adapter serialem needs --adapter-config scope.json (presets; see the README)")
        if args.serialem_port is not None and not 1 <= args.serialem_port <= 65535:
            raise CommandError(f"--serialem-port must be a port number 1-65535, got {args.serialem_port}")
        config = SerialEMConfig.from_file(args.adapter_config)
        where = {k: v for k, v in (("host", args.serialem_host), ("port", args.serialem_port)) if v is not None}
        config = SerialEMConfig.model_validate({**config.model_dump(), **where})
        return connect_serialem(config)
    except (MicroscopeError, ValueError) as exc:
        raise CommandError(" ".join(str(exc).split())) from exc


def _serve(args: argparse.Namespace) -> int:
    from drivers.base import MicroscopeError
    from drivers.zmq_bridge import BridgeServer

    if args.allow and args.curve_dir is None:
        raise CommandError("--allow needs --curve-dir (the server's key pair)")
    if args.curve_dir is not None and not args.allow:
        raise CommandError("--curve-dir needs at least one --allow KEYFILE (client public keys)")
    if args.curve_dir is None:
        for endpoint in (args.endpoint, args.event_endpoint):
            if endpoint is not None and not _loopback(endpoint):
                raise CommandError(
                    f"refusing to bind {endpoint}: anything but loopback requires CURVE (--curve-dir DIR with "
                    "server.key_secret, and --allow KEYFILE for each client; make keys with `bridge keys`)"
                )
    if args.clock is not None and not (args.simulated or args.adapter == "serialem-emulator"):
        raise CommandError("--clock sets the simulator's timing; it needs --simulated or --adapter serialem-emulator")
    microscope = _make_simulated(args) if args.simulated else _make_adapter(args)
    curve = None
    if args.curve_dir is not None:
        curve = args.curve_dir / "server.key_secret" if args.curve_dir.is_dir() else args.curve_dir
    try:
        server = BridgeServer(
            microscope,
            args.endpoint,
            curve=curve,
            allowed_client_keys=args.allow or None,
            max_message_bytes=args.max_message_bytes,
            event_endpoint=args.event_endpoint,
        )
        server.start()
    except MicroscopeError as exc:
        raise CommandError(str(exc)) from exc

    stop = threading.Event()
    # Ctrl-C and SIGTERM only set a flag that the loop below checks: a KeyboardInterrupt raised at an
    # arbitrary point (inside a lock, during interpreter shutdown) could leave the process hanging
    previous: dict[int, Any] = {}
    if _main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        print(f"bridge: serving {type(microscope).__name__} on {server.endpoint}"
              + (f", events on {server.event_endpoint}" if server.event_endpoint else "")
              + (", CURVE on" if curve else "") + " (Ctrl-C to stop)", flush=True)
        while not stop.wait(0.5):
            if not server.running:  # pragma: no cover - the I/O thread never exits on its own
                raise CommandError("the bridge server stopped unexpectedly; see the log")
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"bridge: stopped ({server.stats.requests} requests served)", flush=True)
    return 0


def _loopback(endpoint: str) -> bool:
    """`drivers.network.is_loopback_endpoint`, with a malformed endpoint as a `CommandError`."""
    from drivers.base import MicroscopeError
    from drivers.network import is_loopback_endpoint

    try:
        return is_loopback_endpoint(endpoint)
    except MicroscopeError as exc:
        raise CommandError(str(exc)) from exc


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _ping(args: argparse.Namespace) -> int:
    from drivers.base import MicroscopeError
    from drivers.zmq_bridge import BridgeClient

    if (args.curve_secret is None) != (args.server_key is None):
        raise CommandError("CURVE needs both --curve-secret (yours) and --server-key (the server's public key)")
    if args.count < 1:
        raise CommandError("--count must be at least 1")
    try:
        with BridgeClient(args.endpoint, timeout_s=args.timeout_s, retries=0, curve_keys=args.curve_secret,
                          server_public_key=args.server_key, client_name="bridge ping") as client:
            times_ms = [client.ping() * 1000.0 for _ in range(args.count)]
            info = client.server_info
            assert info is not None
            report = {
                "endpoint": args.endpoint,
                "server_id": client.server_id,
                "name": info.name,
                "software_version": info.software_version,
                "simulated": info.simulated,
                "camera_shape_px": list(info.camera_shape_px),
                "presets": [p.name for p in info.presets],
                "event_endpoint": client.event_endpoint,
                "rtt_ms": {"min": min(times_ms), "median": statistics.median(times_ms), "max": max(times_ms)},
            }
    except MicroscopeError as exc:
        message = str(exc)
        raise CommandError(message if args.endpoint in message else f"{args.endpoint}: {message}") from exc
    if args.json:
        print(json.dumps(report))
    else:
        rtt = report["rtt_ms"]
        print(f"{args.endpoint}: {info.name} ({info.software_version}{', simulated' if info.simulated else ''})")
        rows, cols = info.camera_shape_px
        print(f"  camera {rows}x{cols} px, presets: {', '.join(report['presets'])}")
        print(f"  events: {client.event_endpoint or 'none'}")
        print(f"  round trip over {args.count} calls: min {rtt['min']:.2f} ms, "
              f"median {rtt['median']:.2f} ms, max {rtt['max']:.2f} ms")
    sys.stdout.flush()
    return 0


def _keys(args: argparse.Namespace) -> int:
    from drivers.auth import create_key_pair_files
    from drivers.base import MicroscopeError

    try:
        public_path, secret_path = create_key_pair_files(args.out, args.name)
    except (MicroscopeError, OSError) as exc:
        raise CommandError(str(exc)) from exc
    print(f"public key: {public_path}  (give this file to the other side)")
    print(f"secret key: {secret_path}  (keep private; never copy it)")
    return 0
