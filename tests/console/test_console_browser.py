"""The web console in a real browser: headless Chromium (Debian's package) driven by Playwright.

Skips cleanly when Chromium or Playwright is missing. Screenshots go to `test-artifacts/` (gitignored).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.prompts import OperatorChannel, OperatorClient
from agent.session.events import EventBus

pytest.importorskip("starlette")
sync_api = pytest.importorskip("playwright.sync_api")

from agent.commands.console import DEMO_SPECIMEN, demo_microscope  # noqa: E402
from agent.console.demo import ScriptedSession  # noqa: E402
from agent.console.server import ConsoleHandle, start_console_for_session, wait_for  # noqa: E402

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 30000  # generous: CI machines may be busy


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        try:
            instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30000)
        except Exception as exc:  # a broken browser install: skip, do not fail the suite
            pytest.skip(f"cannot start chromium: {exc}")
        try:
            yield instance
        finally:
            instance.close()


def demo_session(folder: Path, bus: EventBus, channel: OperatorChannel | None, **kwargs: Any) -> ScriptedSession:
    """A demo session: the real screening loop on a small simulated microscope (two targets)."""
    microscope, calibration = demo_microscope(seed=0)
    return ScriptedSession(microscope, folder, bus, channel, specimen=DEMO_SPECIMEN, n_targets=2,
                           calibration=calibration, **kwargs)


class Live:
    """A demo session with a prompt channel and a console on loopback."""

    def __init__(self, folder: Path, **session_kwargs: Any) -> None:
        self.bus = EventBus()
        self.channel = OperatorChannel("tcp://127.0.0.1:0")
        self.session = demo_session(folder, self.bus, self.channel, **session_kwargs)
        self.console: ConsoleHandle = start_console_for_session(self.session, self.channel, "127.0.0.1", 0)

    def cluster_options(self) -> list[str]:
        """The labelling prompt's options that name clusters."""
        assert self.session.prompt_handle is not None
        return [o.id for o in self.session.prompt_handle.prompt.options if o.id.startswith("cluster-")]

    def stop(self) -> None:
        self.session.stop()
        self.console.stop()
        self.channel.close()
        self.bus.close()


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    setup = Live(tmp_path / "session")
    try:
        yield setup
    finally:
        setup.stop()


def new_page(browser: Any, viewport: dict[str, int], url: str) -> Any:
    context = browser.new_context(viewport=viewport, device_scale_factor=1,
                                  is_mobile=viewport["width"] < 600, has_touch=viewport["width"] < 600)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    page.goto(url)
    return page


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_prompt_answered_in_the_browser_and_seen_by_a_second_page(browser: Any, live: Live) -> None:
    desktop = new_page(browser, DESKTOP, live.console.url)
    phone = new_page(browser, PHONE, live.console.url)
    desktop.wait_for_selector('#link[data-connected="true"]')
    live.session.start()
    card = desktop.locator(".card[data-prompt-id]")
    card.wait_for()
    prompt_id = card.get_attribute("data-prompt-id")
    assert card.get_attribute("data-state") == "open"
    # the live state is on the page, and the prompt's images arrived
    desktop.wait_for_selector('#state[data-state="labelling"]')
    desktop.wait_for_function(
        "id => [...document.querySelectorAll(`.card[data-prompt-id='${id}'] img`)]"
        ".every(img => img.complete && img.naturalWidth > 0) && document.querySelectorAll("
        "`.card[data-prompt-id='${id}'] img`).length === 2", arg=prompt_id)
    assert "left to answer" in desktop.locator(f'.card[data-prompt-id="{prompt_id}"] .countdown').inner_text()
    phone.wait_for_selector(f'.card[data-prompt-id="{prompt_id}"][data-state="open"]')
    shot(phone, "console-phone-prompt.png")

    chosen = live.cluster_options()  # a multiple-choice prompt: choose, then send
    for option_id in chosen:
        desktop.click(f'.card[data-prompt-id="{prompt_id}"] [data-option="{option_id}"]')
    desktop.click(f'.card[data-prompt-id="{prompt_id}"] .send')
    desktop.wait_for_selector(f'.card[data-prompt-id="{prompt_id}"][data-state="answered"]')
    phone.wait_for_selector(f'.card[data-prompt-id="{prompt_id}"][data-state="answered"]')
    assert "answered" in phone.locator(f'.card[data-prompt-id="{prompt_id}"] .status').inner_text()
    assert phone.locator(f'.card[data-prompt-id="{prompt_id}"] [data-option="none"]').is_disabled()

    # the session goes on with the answer: targets, chart, atlas with targets drawn, journal
    live.session.join(60)
    assert live.session.answer is not None and live.session.answer.option_ids == tuple(chosen)
    results = live.session.results
    confirmed = sum(result.confirmed for result in results.values())
    recorded = [target_id for target_id, result in results.items() if result.outcome == "recorded"]
    assert recorded, results  # the demo's seed records some
    desktop.wait_for_selector('#state[data-state="done"]')
    desktop.wait_for_function("n => document.querySelector('#stat-confirmed').textContent === String(n)",
                              arg=confirmed)
    desktop.wait_for_selector("#atlas-overlay circle.recorded")
    assert desktop.locator("#atlas-overlay circle").count() == len(live.session.targets)
    assert desktop.locator("#chart polyline").count() == 1
    assert "transition state=done" in desktop.locator("#journal").inner_text()
    desktop.locator(f'#atlas-overlay circle[data-target-id="{recorded[0]}"]').click()
    desktop.wait_for_function("() => ['target-thumb', 'target-diff'].every(id => {"
                              " const i = document.getElementById(id); return i.complete && i.naturalWidth > 0; })")
    assert desktop.locator("#target-title").inner_text().startswith(f"{recorded[0]}: recorded")
    phone.wait_for_selector('#state[data-state="done"]')
    shot(desktop, "console-desktop-done.png")
    assert not desktop.errors and not phone.errors, desktop.errors + phone.errors


def test_expiry_controls_and_a_terminal_answer(browser: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pause / abort ask first; a prompt nobody answers expires (the fallback goes on, into the pause asked
    for meanwhile); a terminal client's answer turns the card over and names who answered."""
    setup = Live(tmp_path / "session", prompt_timeout_s=3.0)
    pauses: list[bool] = []
    request_pause = setup.session.request_pause

    def counted_pause() -> None:
        pauses.append(True)
        request_pause()

    monkeypatch.setattr(setup.session, "request_pause", counted_pause)
    try:
        page = new_page(browser, PHONE, setup.console.url)
        page.wait_for_selector('#link[data-connected="true"]')
        setup.session.start()
        page.locator(".card[data-prompt-id]").wait_for()
        dialogs: list[str] = []

        def dismiss(dialog: Any) -> None:
            dialogs.append(dialog.message)
            dialog.dismiss()

        page.once("dialog", dismiss)
        page.click('[data-control="pause"]')
        assert wait_for(lambda: bool(dialogs), 5) and "Pause" in dialogs[0]
        assert not pauses  # dismissed: nothing sent
        page.once("dialog", lambda dialog: dialog.accept())
        page.click('[data-control="pause"]')  # while the prompt is open: the session pauses once it is over
        assert wait_for(lambda: bool(pauses), 5)
        page.wait_for_selector('.card[data-state="expired"]', timeout=10000)  # nobody answered in 3 s
        assert wait_for(lambda: setup.session.prompt_handle.state == "expired", 5)
        page.wait_for_selector('#state[data-state="paused"]')
        assert setup.session.state == "paused"
        from agent.prompts import Prompt, PromptOption

        handle = setup.channel.ask(Prompt(question="Again?", options=(PromptOption(id="y", label="yes"),),
                                          timeout_s=30))
        page.wait_for_selector(f'.card[data-prompt-id="{handle.id}"][data-state="open"]')
        with OperatorClient(setup.channel.prompt_endpoint, timeout_s=5) as client:
            client.answer(handle.id, "y", operator="terminal-ana")
        page.wait_for_selector(f'.card[data-prompt-id="{handle.id}"][data-state="answered"]')
        assert "terminal-ana" in page.locator(f'.card[data-prompt-id="{handle.id}"] .status').inner_text()
        page.once("dialog", lambda dialog: dialog.accept())
        page.click('[data-control="abort"]')
        page.wait_for_selector('#state[data-state="aborted"]')
        setup.session.join(10)
        assert setup.session.answer is None and setup.session.state == "aborted"
        assert not page.errors, page.errors
    finally:
        setup.stop()


def test_page_reconnects_after_the_console_restarts(browser: Any, tmp_path: Path) -> None:
    """The page's WebSocket comes back by itself (here: the console process restarts on the same port)."""
    bus = EventBus()
    session = demo_session(tmp_path / "s", bus, None)
    console = start_console_for_session(session, None, "127.0.0.1", 0)
    port = console.port
    page = new_page(browser, DESKTOP, console.url)
    try:
        page.wait_for_selector('#link[data-connected="true"]')
        console.stop()
        page.wait_for_selector('#link[data-connected="false"]')
        console = start_console_for_session(session, None, "127.0.0.1", port)
        page.wait_for_selector('#link[data-connected="true"]')
        bus.publish("state", state="mapping", microscope_time_s=3.0)
        page.wait_for_selector('#state[data-state="mapping"]')
    finally:
        console.stop()
        session.stop()
        bus.close()


def test_explore_view_reclusters_when_k_changes(browser: Any, live: Live, tmp_path: Path) -> None:
    import tifffile

    rng = np.random.default_rng(5)
    rows, cols = np.mgrid[:512, :512]
    image = 1000.0 + rng.normal(0, 20, (512, 512))
    for col, row in rng.uniform(60, 450, size=(8, 2)):
        image += 900.0 * np.exp(-((cols - col) ** 2 + (rows - row) ** 2) / (2 * 10.0**2))
    path = tmp_path / "explore.tif"
    tifffile.imwrite(path, image.astype(np.uint16))
    page = new_page(browser, DESKTOP, live.console.url)
    page.click('.tab[data-tab="explore"]')
    page.set_input_files("#ex-upload", str(path))
    page.wait_for_function("() => Number(document.querySelector('#ex-canvas').dataset.renderSeq) >= 1")
    assert page.locator("#ex-canvas").get_attribute("data-k") == "3"
    assert page.locator("#ex-legend .entry").count() == 3
    page.locator("#ex-k").fill("5")
    page.wait_for_function("() => document.querySelector('#ex-canvas').dataset.k === '5'")
    assert page.locator("#ex-legend .entry").count() == 5
    assert "features cached" in page.locator("#ex-msg").inner_text()
    page.locator("#ex-similar").check()
    box = page.locator("#ex-canvas").bounding_box()
    page.locator("#ex-canvas").click(position={"x": box["width"] / 2, "y": box["height"] / 2})
    page.wait_for_function("() => /clustering cached|cannot/.test(document.querySelector('#ex-msg').textContent)")
    assert "clustering cached" in page.locator("#ex-msg").inner_text(), page.locator("#ex-msg").inner_text()
    shot(page, "console-desktop-explore.png")
    page.click("#ex-mark-yes")
    page.wait_for_function("() => document.querySelector('#ex-msg').textContent.length > 0 && "
                           "!document.querySelector('#ex-msg').textContent.includes('clustering')")
    # the demo session has no label memory: the page says so instead of failing silently
    assert "not stored" in page.locator("#ex-msg").inner_text()
    assert not page.errors, page.errors


def test_token_mode_in_the_browser(browser: Any, tmp_path: Path) -> None:
    """Off loopback: without the token 401; the printed URL logs the browser in (cookie), the token leaves
    the address bar, the live view and an answer work."""
    from agent.console.links import LocalLink
    from agent.console.security import AccessPolicy
    from agent.console.server import ConsoleApp

    setup = Live(tmp_path / "session")
    policy = AccessPolicy("192.0.2.10")  # the policy of a non-loopback interface, served on loopback here
    handle = ConsoleHandle(ConsoleApp(LocalLink(setup.session, setup.channel), policy), "127.0.0.1", 0).start()
    try:
        context = browser.new_context(viewport=PHONE)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        assert page.goto(f"http://127.0.0.1:{handle.port}/").status == 401
        page.goto(handle.url)  # http://host:port/?token=...
        assert page.url == f"http://127.0.0.1:{handle.port}/"
        page.wait_for_selector('#link[data-connected="true"]')
        setup.session.start()
        page.locator('.card[data-prompt-id] [data-option="none"]').click()
        page.locator(".card[data-prompt-id] .send").click()
        page.wait_for_selector('.card[data-prompt-id][data-state="answered"]')
        assert wait_for(lambda: setup.session.answer is not None, 10)
        assert setup.session.answer.operator == "console" and setup.session.answer.option_ids == ("none",)
    finally:
        handle.stop()
        setup.stop()
