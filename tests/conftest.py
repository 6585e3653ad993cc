"""Shared pytest fixtures. Keep this small; put feature-specific fixtures next to their tests."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    """Absolute path of the repository checkout."""
    return REPO_ROOT
