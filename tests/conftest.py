"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_state_home(tmp_path_factory, monkeypatch):
    """Every test gets its own XDG_STATE_HOME (master caches, pair locks): never ~/.local/state.

    CLI children inherit it (tests that drop privileges pass their own, reachable one).
    """
    d = tmp_path_factory.mktemp("xdg-state")
    monkeypatch.setenv("XDG_STATE_HOME", str(d))
    return d
