"""The credentials package's public names: complete, sorted, and each one importable."""

from __future__ import annotations

import tigress_signal.credentials as credentials


def _ruff_order(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 keeps: CONSTANTS, then Classes, then functions.
    kind = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return kind, name


def test_all_is_sorted() -> None:
    assert credentials.__all__ == sorted(credentials.__all__, key=_ruff_order)


def test_all_names_every_public_import_and_nothing_else() -> None:
    submodules = {"access_token", "digital_key", "files", "lock", "messages"}
    public = {
        name
        for name in vars(credentials)
        if not name.startswith("_") and name not in submodules and name != "annotations"
    }
    assert public == set(credentials.__all__)
    for name in credentials.__all__:
        assert getattr(credentials, name) is not None
