"""The API contract: the published OpenAPI document, checked by schemathesis against the server.

schemathesis runs as a child process against the one server this test starts on 127.0.0.1,
with a fixed seed, a bounded number of examples per operation and a time limit, and checks that
no answer is a 5xx and every answer fits the document (status, content type, body, headers).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from starlette.routing import Route

from intermediary_fixtures import (
    NO_LIMIT,
    database_url,  # noqa: F401 - autouse: every test runs on SQLite and PostgreSQL
    raw_client,
    register,
    running_server,
)
from tigress_signal.intermediary.app import create_app
from tigress_signal.intermediary.config import IntermediaryConfig
from tigress_signal.intermediary.openapi import build_document

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
    ]
)
RUN_TIMEOUT = 300


def test_the_document_lists_every_http_route_of_the_app():
    document = build_document()
    app = create_app(IntermediaryConfig())
    routes = {
        (route.path.replace("{device_id}", "{deviceId}"), method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or []
        if method != "HEAD"
    }
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert routes == documented
    assert document["openapi"].startswith("3.1")


async def test_the_server_publishes_its_document(tmp_path):
    async with running_server(tmp_path) as server, raw_client(server.url) as http:
        answer = await http.get("/openapi.json")
    assert answer.status_code == 200
    assert answer.json() == build_document()


async def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_document(tmp_path):
    # Limits off: schemathesis sends thousands of requests from one address.
    limits: dict[str, Any] = {
        name: NO_LIMIT
        for name in (
            "address_rate",
            "account_creation_rate",
            "device_link_rate",
            "message_rate",
            "bundle_fetch_rate",
        )
    }
    async with running_server(tmp_path, **limits) as server:
        device = await register(server.url, prekeys=5, pq_prekeys=5)
        try:
            process = await asyncio.create_subprocess_exec(
                str(SCHEMATHESIS),
                "run",
                f"{server.url}/openapi.json",
                "--url",
                server.url,
                "--checks",
                CHECKS,
                "--phases",
                "coverage,fuzzing",
                "--max-examples",
                "30",
                "--seed",
                "20261204",
                "--workers",
                "1",
                "--request-timeout",
                "10",
                "--generation-database",
                "none",
                "--no-color",
                "--auth",
                f"{device.uuid}.1:{device.password}",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=tmp_path,
            )
            try:
                output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise
        finally:
            await device.client.aclose()
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    assert " passed" in text and "failed" not in text.split("SUMMARY")[-1], text[-3000:]
