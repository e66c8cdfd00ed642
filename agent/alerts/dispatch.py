"""Sending off the session's thread: a background thread takes alerts from a bounded queue and sends each to
every channel, so that a slow or dead webhook or mail server never holds up the screening loop.

The thread starts with the first alert. `submit` never blocks: when the queue is full (a channel hanging
while alerts pile up) the alert is dropped and that is reported like a failed delivery. `drain(timeout_s)`
waits, at most that long, until every submitted alert has been tried; `results()` hands over the deliveries
so far (for the journal); `close` stops the thread (a retry waiting its turn gives up).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Sequence

from agent.alerts.channels import AlertSender
from agent.alerts.delivery import Delivery
from agent.alerts.message import AlertMessage

logger = logging.getLogger(__name__)

#: Alerts that may wait to be sent; more are dropped (each channel already retries within its own bound).
QUEUE_SIZE = 16


class AlertDispatcher:
    """Sends alerts to `senders` in a background (daemon) thread; thread-safe."""

    def __init__(self, senders: Sequence[AlertSender], queue_size: int = QUEUE_SIZE) -> None:
        self.senders = list(senders)
        self._queue: queue.Queue[AlertMessage | None] = queue.Queue(maxsize=queue_size)
        self._results: list[Delivery] = []
        self._unfinished: list[AlertMessage] = []
        self._condition = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="alerts", daemon=True)  # started by the first alert

    def submit(self, message: AlertMessage) -> bool:
        """Queue `message` for every channel; False (and a failed delivery per channel) if the queue is full or
        the dispatcher is closed."""
        with self._condition:
            if self._stop.is_set():
                self._drop(message, "the alert sender was already closed")
                return False
            try:
                self._queue.put_nowait(message)
            except queue.Full:
                self._drop(message, f"{self._queue.maxsize} alerts were still waiting to be sent; this one was dropped")
                return False
            self._unfinished.append(message)
            if not self._thread.is_alive():
                self._thread.start()
        return True

    def _drop(self, message: AlertMessage, reason: str) -> None:
        logger.warning("alerts: %s alert not sent: %s", message.kind, reason)
        for sender in self.senders:
            delivery = Delivery(channel=sender.channel, kind=message.kind, ok=False, attempts=0, error=reason)
            self._results.append(delivery)

    def _work(self) -> None:
        while True:
            try:
                message = self._queue.get(timeout=0.25)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if message is None:
                return
            try:
                for sender in self.senders:
                    if self._stop.is_set():
                        delivery = Delivery(
                            channel=sender.channel, kind=message.kind, ok=False, attempts=0, error="not sent: closed"
                        )
                    else:
                        delivery = self._send(sender, message)
                    self._log(delivery)
                    with self._condition:
                        self._results.append(delivery)
            finally:
                with self._condition:
                    self._unfinished.remove(message)
                    self._condition.notify_all()

    def _send(self, sender: AlertSender, message: AlertMessage) -> Delivery:
        try:
            return sender.send(message, self._stop)
        except Exception as exc:  # a sender's bug must not end the thread that sends the other alerts
            logger.exception("alerts: the %s sender failed", sender.channel)
            return Delivery(channel=sender.channel, kind=message.kind, ok=False, attempts=1, error=type(exc).__name__)

    @staticmethod
    def _log(delivery: Delivery) -> None:
        if delivery.ok:
            logger.info("alerts: %s alert sent by %s", delivery.kind, delivery.channel)
        else:
            logger.warning(
                "alerts: %s alert not sent by %s after %d attempt(s): %s",
                delivery.kind,
                delivery.channel,
                delivery.attempts,
                delivery.error,
            )

    def unfinished(self) -> list[AlertMessage]:
        """Alerts submitted and not yet tried on every channel, oldest first."""
        with self._condition:
            return list(self._unfinished)

    def drain(self, timeout_s: float) -> bool:
        """Wait until every submitted alert has been tried, at most `timeout_s` real seconds; True if so."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._unfinished, timeout=max(0.0, timeout_s))

    def results(self) -> list[Delivery]:
        """The deliveries since the last call, in the order they finished."""
        with self._condition:
            taken, self._results = self._results, []
        return taken

    def close(self, timeout_s: float = 1.0) -> None:
        """Stop the thread: alerts still queued are not sent, a retry's wait ends; waits `timeout_s` at most."""
        with self._condition:
            self._stop.set()
        if not self._thread.is_alive():
            return
        with contextlib.suppress(queue.Full):  # else the worker sees the stop flag once the queue is empty
            self._queue.put_nowait(None)
        self._thread.join(timeout_s)
