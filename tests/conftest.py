"""Fixtures every test gets."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _detach_cli_log_handlers():
    """A command-line run inside a test attaches a handler to pytest's captured stderr; drop it after."""
    yield
    logger = logging.getLogger("rloss")
    for handler in list(logger.handlers):
        if getattr(handler, "_rloss_glog", False):
            logger.removeHandler(handler)
