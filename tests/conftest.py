"""Shared test set-up. helperfw must be imported before llvmlite (opaque pointers)."""

import pytest

import helperfw  # noqa: F401
from helperfw.build import FirmwareBuild
from tests.firmware import firmware as _firmware


@pytest.fixture(scope="session")
def firmware() -> FirmwareBuild:
    """The firmware built once for the whole run into a temporary directory (tests/firmware.py)."""
    return _firmware()
