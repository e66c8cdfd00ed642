"""What the console knows about a session right now, and fan-out of every change to connected pages.

`ConsoleHub` is fed from background threads (the session's `EventBus` listener, the ZeroMQ event
subscriber of a remote agent, the prompt client) and read by the web server's event loop: a page gets
`snapshot()` when its WebSocket opens, then one message per change. Messages are JSON objects with a
`type`: `snapshot`, `event` (a session event: `topic` + `event`), `prompt` (a prompt card, new or
changed) and `agent` (connected or not). Thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Journal lines kept for the page.
JOURNAL_LINES = 40
#: Closed prompts kept (a page opened after an answer still shows the answered card).
CLOSED_PROMPTS_KEPT = 20
#: Messages queued per page before it is considered too slow and disconnected (it reconnects).
PAGE_QUEUE_SIZE = 2000
#: Journal entry fields too bulky for a one-line summary.
_BULKY_FIELDS = frozenset({"plan", "targets", "clusters", "images", "entry", "sources", "confidences", "notes"})
#: The outcome of a target whose diffraction snapshot passed: what the chart counts.
_DIFFRACTING = "recorded"


def journal_line(entry: dict[str, Any], max_chars: int = 180) -> str:
    """One readable line for a journal entry: `[microscope s] type key=value ...` (bulky fields left out)."""
    time_s = entry.get("microscope_time_s")
    head = f"[{time_s:8.1f} s] " if isinstance(time_s, (int, float)) else ""
    parts = [str(entry.get("type", "?"))]
    for key, value in entry.items():
        if key in ("type", "seq", "time_utc", "microscope_time_s") or key in _BULKY_FIELDS:
            continue
        if isinstance(value, float):
            value = round(value, 3)
        if isinstance(value, (dict, list)) and len(json.dumps(value, default=str)) > 60:
            continue
        parts.append(f"{key}={value}")
    line = head + " ".join(parts)
    return line if len(line) <= max_chars else line[: max_chars - 1] + "…"


class _Page:
    """One connected page: its event loop and message queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self.loop = loop
        self.queue = queue


class ConsoleHub:
    """Live view of one session (state, progress, targets, chart, journal, atlas, prompts) + page fan-out."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pages: list[_Page] = []
        self.session_dir: Path | None = None
        self.agent_connected = False
        self.state = "unknown"
        self.microscope_time_s = 0.0
        self.progress: dict[str, Any] = {}
        self.targets: dict[str, dict[str, Any]] = {}
        self.chart: list[tuple[float, int]] = []
        self.journal: collections.deque[str] = collections.deque(maxlen=JOURNAL_LINES)
        self.atlas_version = 0
        self.atlas_shape_px: list[int] | None = None
        self.summary: dict[str, Any] | None = None
        self._prompts: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._prompt_images: dict[str, dict[str, bytes]] = {}
        self._last_seq = 0
        self._journal_seq = 0

    # -- pages --------------------------------------------------------------------------------------

    def attach_page(self, loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Queue[dict[str, Any] | None], dict]:
        """Register a page; returns its queue and the snapshot to send first (atomically, no gap)."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=PAGE_QUEUE_SIZE)
        with self._lock:
            self._pages.append(_Page(loop, queue))
            return queue, self.snapshot()

    def detach_page(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        """Forget a page (its socket closed)."""
        with self._lock:
            self._pages = [p for p in self._pages if p.queue is not queue]

    @property
    def pages(self) -> int:
        """Number of connected pages."""
        with self._lock:
            return len(self._pages)

    def _broadcast(self, message: dict[str, Any]) -> None:
        with self._lock:
            pages = list(self._pages)
        for page in pages:
            try:
                page.loop.call_soon_threadsafe(self._put, page, message)
            except RuntimeError:  # the loop is closed: the page is gone
                self.detach_page(page.queue)

    def _put(self, page: _Page, message: dict[str, Any]) -> None:
        try:
            page.queue.put_nowait(message)
        except asyncio.QueueFull:
            logger.warning("console: a page is too slow; disconnecting it (it will reconnect)")
            self.detach_page(page.queue)
            with contextlib.suppress(asyncio.QueueEmpty):
                page.queue.get_nowait()
            page.queue.put_nowait(None)

    # -- snapshot -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything a freshly opened page needs, as JSON-ready data."""
        with self._lock:
            return {
                "type": "snapshot",
                "agent_connected": self.agent_connected,
                "session_dir": str(self.session_dir) if self.session_dir else None,
                "state": self.state,
                "microscope_time_s": self.microscope_time_s,
                "progress": dict(self.progress),
                "targets": [dict(t) for t in self.targets.values()],
                "chart": [list(p) for p in self.chart],
                "journal": list(self.journal),
                "atlas_version": self.atlas_version,
                "atlas_shape_px": self.atlas_shape_px,
                "summary": self.summary,
                "prompts": [self._prompt_view(p) for p in self._prompts.values()],
            }

    # -- agent connection ---------------------------------------------------------------------------

    def set_agent(self, connected: bool, session_dir: str | Path | None = None, state: str | None = None) -> None:
        """Record whether the agent is reachable (and which session folder it writes)."""
        with self._lock:
            changed = connected != self.agent_connected
            self.agent_connected = connected
            if session_dir:
                self.session_dir = Path(session_dir)
            if state and state != self.state:
                self.state = state
                changed = True
        if changed:
            self._broadcast({"type": "agent", "connected": connected, "state": self.state})

    def load_session_dir(self, session_dir: str | Path) -> None:
        """Fill the view from a session folder (journal, summary), e.g. when attaching to a running agent."""
        from agent.session.journal import JournalError, read_journal

        folder = Path(session_dir)
        try:
            entries = read_journal(folder / "journal.jsonl")
        except (JournalError, OSError) as exc:
            logger.warning("console: cannot read the journal of %s: %s", folder, exc)
            entries = []
        with self._lock:
            self.session_dir = folder
            self.targets.clear()
            self.chart.clear()
            self.journal.clear()
            self._journal_seq = 0
            for entry in entries:
                self._apply_journal_entry(entry)
            summary_path = folder / "summary.json"
            if summary_path.is_file():
                with contextlib.suppress(OSError, ValueError):
                    self.progress = dict(json.loads(summary_path.read_text()))
            if (folder / "atlas" / "heatmap.png").is_file():
                self.atlas_version = max(self.atlas_version, 1)
            snapshot = self.snapshot()
        self._broadcast(snapshot)

    # -- session events -----------------------------------------------------------------------------

    def on_event(self, topic: str, event: dict[str, Any]) -> None:
        """EventBus listener: apply one session event and push it to the pages."""
        with self._lock:
            seq = event.get("seq")
            if isinstance(seq, int):
                self._last_seq = seq
            if topic == "state":
                self.state = str(event.get("state", self.state))
                self._set_time(event.get("microscope_time_s"))
            elif topic == "progress":
                self.progress = {k: v for k, v in event.items() if k not in ("topic", "seq", "time_utc")}
                self._set_time(event.get("microscope_time_s"))
            elif topic == "journal" and isinstance(event.get("entry"), dict):
                if not self._apply_journal_entry(event["entry"]):
                    return
            elif topic == "atlas":
                self.atlas_version += 1
            elif topic == "summary":
                self.summary = {k: v for k, v in event.items() if k not in ("topic", "seq", "time_utc")}
                self.progress = dict(self.summary)
            message = {
                "type": "event",
                "topic": topic,
                "event": _slim_event(topic, event),
                "state": self.state,
                "microscope_time_s": self.microscope_time_s,
                "atlas_version": self.atlas_version,
                "atlas_shape_px": self.atlas_shape_px,
                "chart": [list(p) for p in self.chart] if topic == "journal" else None,
                "journal_line": self.journal[-1] if topic == "journal" and self.journal else None,
                "targets": [dict(t) for t in self.targets.values()] if topic in ("journal", "target") else None,
            }
        self._broadcast(message)

    def _set_time(self, value: Any) -> None:
        if isinstance(value, (int, float)):
            self.microscope_time_s = float(value)

    def _apply_journal_entry(self, entry: dict[str, Any]) -> bool:
        """Apply one journal entry; False (ignored) if it was seen already (read from the file, then
        received as an event)."""
        seq = entry.get("seq")
        if isinstance(seq, int):
            if seq <= self._journal_seq:
                return False
            self._journal_seq = seq
        kind = entry.get("type")
        self.journal.append(journal_line(entry))
        self._set_time(entry.get("microscope_time_s"))
        if kind == "transition":
            self.state = str(entry.get("state", self.state))
        elif kind == "targets" and isinstance(entry.get("targets"), list):
            self.targets.clear()
            for target in entry["targets"]:
                if isinstance(target, dict) and "target_id" in target:
                    self.targets[str(target["target_id"])] = {**target, "outcome": "pending"}
        elif kind == "target" and "target_id" in entry:
            target_id = str(entry["target_id"])
            known = self.targets.setdefault(target_id, {"target_id": target_id})
            known.update({k: entry.get(k) for k in ("outcome", "x_um", "y_um", "n_spots", "reason", "images")})
            if entry.get("outcome") == _DIFFRACTING:
                count = (self.chart[-1][1] if self.chart else 0) + 1
                self.chart.append((float(entry.get("microscope_time_s") or 0.0), count))
        elif kind == "mapping" and entry.get("event") == "done" and isinstance(entry.get("shape_px"), list):
            self.atlas_shape_px = [int(v) for v in entry["shape_px"][:2]]
        elif kind == "summary":
            self.summary = {k: v for k, v in entry.items() if k not in ("type", "seq", "time_utc")}
        return True

    # -- prompts ------------------------------------------------------------------------------------

    def prompt_opened(self, info: dict[str, Any], images: dict[str, bytes], seconds_left: float) -> None:
        """A prompt was asked (or seen open at attach): `info` is `PromptInfo.model_dump(mode="json")`."""
        prompt_id = str(info["id"])
        with self._lock:
            if prompt_id in self._prompts and self._prompts[prompt_id]["state"] != "open":
                return
            self._prompts[prompt_id] = {
                "id": prompt_id,
                "kind": info.get("kind", "choice"),
                "question": info.get("question", ""),
                "options": [
                    {"id": o["id"], "label": o.get("label", o["id"]), "description": o.get("description", "")}
                    for o in info.get("options", [])
                ],
                "multiple": bool(info.get("multiple", False)),
                "image_names": [str(n) for n in images],
                "deadline_monotonic": time.monotonic() + max(0.0, float(seconds_left)),
                "state": "open",
                "answered_by": None,
                "option_ids": [],
            }
            self._prompt_images[prompt_id] = dict(images)
            view = self._prompt_view(self._prompts[prompt_id])
        self._broadcast({"type": "prompt", "prompt": view})

    def prompt_closed(self, prompt_id: str, state: str, answered_by: str | None, option_ids: list[str]) -> None:
        """A prompt was answered (by anyone), expired or was cancelled."""
        with self._lock:
            record = self._prompts.get(prompt_id)
            if record is None or record["state"] != "open":
                return
            record.update(state=state, answered_by=answered_by, option_ids=list(option_ids))
            self._prompts.move_to_end(prompt_id)
            closed = [pid for pid, p in self._prompts.items() if p["state"] != "open"]
            for old in closed[: max(0, len(closed) - CLOSED_PROMPTS_KEPT)]:
                del self._prompts[old]
                self._prompt_images.pop(old, None)
            view = self._prompt_view(record)
        self._broadcast({"type": "prompt", "prompt": view})

    def drop_open_prompts(self, reason: str = "cancelled") -> None:
        """Mark every open prompt closed (the agent went away; its prompts cannot be answered)."""
        with self._lock:
            open_ids = [pid for pid, p in self._prompts.items() if p["state"] == "open"]
        for prompt_id in open_ids:
            self.prompt_closed(prompt_id, reason, None, [])

    def prompt_image(self, prompt_id: str, name: str) -> bytes | None:
        """PNG bytes of one prompt image, or None."""
        with self._lock:
            return self._prompt_images.get(prompt_id, {}).get(name)

    def prompt_state(self, prompt_id: str) -> str | None:
        """"open", "answered", "expired", "cancelled", or None if unknown."""
        with self._lock:
            record = self._prompts.get(prompt_id)
            return None if record is None else str(record["state"])

    def open_prompt_ids(self) -> list[str]:
        """Ids of the prompts open now."""
        with self._lock:
            return [pid for pid, p in self._prompts.items() if p["state"] == "open"]

    @staticmethod
    def _prompt_view(record: dict[str, Any]) -> dict[str, Any]:
        view = {k: v for k, v in record.items() if k != "deadline_monotonic"}
        view["seconds_left"] = max(0.0, record["deadline_monotonic"] - time.monotonic())
        view["image_urls"] = [f"/api/prompts/{record['id']}/images/{name}" for name in record["image_names"]]
        return view


def _slim_event(topic: str, event: dict[str, Any]) -> dict[str, Any]:
    """The event without bulky payloads (a `targets` journal entry can be large)."""
    if topic == "journal":
        entry = event.get("entry") or {}
        return {"type": entry.get("type"), "seq": event.get("seq")}
    return {k: v for k, v in event.items() if k not in _BULKY_FIELDS or topic == "target"}
