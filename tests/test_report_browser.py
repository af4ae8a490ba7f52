"""The HTML report and the relay's preview page render in a real browser (Debian's chromium).

Chromium runs headless with its background networking off and is driven over the DevTools
protocol on loopback; it loads only a ``file://`` page and a page of a relay this test starts
on 127.0.0.1. The test fails (it does not skip) when chromium is missing: ``make setup``
installs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets.asyncio.client

from compare_fixtures import comparison_run
from relay_fixtures import create_body, headers, running_relay
from tigress_signal.relay.preview import CONTENT_SECURITY_POLICY

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--remote-debugging-port=0",
]


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed; run 'make setup' (apt-get install chromium)")
    return found


class Page:
    """One browser tab over the DevTools protocol, collecting console errors."""

    def __init__(self, connection: websockets.asyncio.client.ClientConnection) -> None:
        self.connection = connection
        self.ids = itertools.count(1)
        self.errors: list[str] = []
        self.loaded = asyncio.Event()
        self.answers: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for text in self.connection:
            message = json.loads(text)
            if "id" in message:
                future = self.answers.pop(message["id"], None)
                if future is not None and not future.done():
                    future.set_result(message)
                continue
            method, params = message.get("method"), message.get("params", {})
            if method == "Page.loadEventFired":
                self.loaded.set()
            elif method == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(params["exceptionDetails"])[:300])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in (
                "error",
                "assert",
            ):
                self.errors.append(json.dumps(params.get("args"))[:300])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                self.errors.append(params["entry"].get("text", "")[:300])

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.answers[number] = future
        await self.connection.send(json.dumps({"id": number, "method": method, "params": params}))
        answer = await asyncio.wait_for(future, 30)
        assert "error" not in answer, answer
        result: dict[str, Any] = answer["result"]
        return result

    async def open(self, url: str) -> None:
        self.loaded.clear()
        await self.call("Page.navigate", url=url)
        await asyncio.wait_for(self.loaded.wait(), 30)
        await asyncio.sleep(0.3)  # late console messages (CSP reports) arrive after load

    async def value(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def browser(tmp_path: Path) -> AsyncIterator[Page]:
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    process = subprocess.Popen(  # noqa: ASYNC220 - returns at once
        [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("chromium did not start its DevTools endpoint")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with httpx.AsyncClient(trust_env=False) as http:
            targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        (tab,) = [t for t in targets if t["type"] == "page"][:1]
        async with websockets.asyncio.client.connect(
            tab["webSocketDebuggerUrl"], max_size=None, proxy=None
        ) as connection:
            page = Page(connection)
            for domain in ("Page", "Runtime", "Log"):
                await page.call(f"{domain}.enable")
            try:
                yield page
            finally:
                page.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await page.reader
    finally:
        process.terminate()
        try:
            await asyncio.to_thread(process.wait, 10)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)


@pytest.fixture(scope="module")
def report_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return comparison_run(tmp_path_factory)[1]


async def test_the_html_report_renders_with_its_plots(tmp_path: Path, report_folder: Path):
    out = report_folder
    async with browser(tmp_path) as page:
        await page.open((out / "report.html").as_uri())
        assert await page.value("document.title") == (
            "Tigress-Signal: self-hosted Signal channel and Tigress relay, side by side"
        )
        images = await page.value(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert len(images) == 3
        assert all(complete and width > 100 and height > 100 for complete, width, height in images)
        assert await page.value("document.querySelectorAll('table').length") >= 3
        body = await page.value("document.body.innerText")
        assert "selfhosted" in body and "tigress-relay" in body and "signal-cli" in body
        assert "functional only" in body
        assert page.errors == []


async def test_the_relay_preview_page_renders_without_script(tmp_path: Path):
    async with running_relay(tmp_path, time.time) as relay:
        async with httpx.AsyncClient(base_url=relay.url, trust_env=False) as http:
            body = create_body()
            body["displayInformation"]["title"] = "Room 1207 <b>key</b>"
            created = await http.post("/v1/m", json=body, headers=headers(str(uuid.uuid4())))
            link = created.json()["urlLink"]
        async with browser(tmp_path) as page:
            # The fragment is what a person's link carries; the page must render all the same.
            await page.open(link + "#c2VjcmV0LWtleS1uZXZlci1zZW50")
            assert await page.value("document.title") == "Room 1207 <b>key</b>"
            meta = await page.value(
                "Object.fromEntries(Array.from(document.querySelectorAll('meta[property]'))"
                ".map(m => [m.getAttribute('property'), m.content]))"
            )
            assert meta["og:title"] == "Room 1207 <b>key</b>"
            assert meta["og:url"] == link
            assert set(meta) >= {"og:title", "og:description", "og:type", "og:url", "og:image"}
            assert await page.value("document.scripts.length") == 0
            assert await page.value("document.images.length") == 0
            # The style block is allowed by its hash: the page is styled, so no CSP refusal.
            assert (
                await page.value("getComputedStyle(document.querySelector('main')).maxWidth")
                != "none"
            )
            assert page.errors == []
    assert "script-src" not in CONTENT_SECURITY_POLICY


async def test_the_error_collector_does_see_console_errors(tmp_path: Path):
    # Guards the two tests above against passing because no error could ever be seen.
    broken = tmp_path / "broken.html"
    broken.write_text(
        '<!doctype html><title>broken</title><img src="missing.png">'
        "<script>console.error('seen')</script>"
    )
    async with browser(tmp_path) as page:
        await page.open(broken.as_uri())
        assert await page.value("document.title") == "broken"
        assert len(page.errors) >= 2
