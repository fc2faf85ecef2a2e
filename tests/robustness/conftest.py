"""Shared helpers of the robustness tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one intra-op thread (``one_thread`` of tests/conftest.py)."""
