"""Record the introspection XML of every object a D-Bus service exports, one file per path.

Used once to record signal-cli 0.13.19's interfaces into
``src/tigress_signal/testing/signal_cli_0_13_19/`` (the control object from the real daemon, the
account objects from ``StubDaemon``), and by the tests to read the same tree back from the fake
and from signal-cli's own classes::

    DBUS_SESSION_BUS_ADDRESS=unix:path=... python record_introspection.py org.asamk.Signal OUTDIR
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from xml.etree import ElementTree

from dbus_fast import Message
from dbus_fast.aio import MessageBus


async def introspect_tree(bus: MessageBus, name: str, root: str = "/") -> dict[str, str]:
    """Every object path under ``root`` mapped to its introspection XML text."""
    found: dict[str, str] = {}
    pending = [root]
    while pending:
        path = pending.pop()
        reply = await bus.call(
            Message(
                destination=name,
                path=path,
                interface="org.freedesktop.DBus.Introspectable",
                member="Introspect",
            )
        )
        if reply.error_name:
            continue
        xml = str(reply.body[0])
        found[path] = xml
        for child in ElementTree.fromstring(xml).findall("node"):
            child_name = child.get("name", "")
            if child_name:
                pending.append(path.rstrip("/") + "/" + child_name)
    return found


def file_name(path: str) -> str:
    """The file a path's XML goes to: ``/org/asamk/Signal`` -> ``org_asamk_Signal.xml``."""
    return (path.strip("/").replace("/", "_") or "root") + ".xml"


async def main(name: str, out: Path) -> None:
    bus = await MessageBus().connect()
    tree = await introspect_tree(bus, name)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a one-off recording script
    for path, xml in sorted(tree.items()):
        (out / file_name(path)).write_text(xml, encoding="utf-8")
        print(path)
    bus.disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
