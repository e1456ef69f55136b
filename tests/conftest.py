"""Shared pytest fixtures."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(autouse=True)
def _private_state_home(tmp_path_factory, monkeypatch):
    """Every test gets its own XDG_STATE_HOME (master caches, pair locks): never ~/.local/state.

    CLI children inherit it (tests that drop privileges pass their own, reachable one).
    """
    d = tmp_path_factory.mktemp("xdg-state")
    monkeypatch.setenv("XDG_STATE_HOME", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)  # caches can be large; /tmp may be a shared, full disk


@pytest.fixture
def unpriv():
    """A world-reachable work dir and a way to run the CLI as `nobody` (root cannot be denied)."""
    try:
        from helpers import Unprivileged, can_drop_to, world_dir
    except ImportError:
        from tests.helpers import Unprivileged, can_drop_to, world_dir
    reason = can_drop_to("nobody")
    if reason:
        pytest.skip(reason)
    with world_dir() as d:
        yield Unprivileged(d)
