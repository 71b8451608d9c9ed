"""Shared test fixtures: where ../shared (golden files, reference experiments, data) lives."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RLOSS_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under ../shared; the calling test is skipped, with the reason, when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared (golden files, reference experiments, data) is not beside this clone")
    return path


@pytest.fixture(autouse=True)
def _detach_cli_log_handlers():
    """A command-line run inside a test attaches a handler to pytest's captured stderr; drop it after."""
    yield
    logger = logging.getLogger("rloss")
    for handler in list(logger.handlers):
        if getattr(handler, "_rloss_glog", False):
            logger.removeHandler(handler)
