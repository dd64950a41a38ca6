"""Shared test set-up. helperfw must be imported before llvmlite (opaque pointers)."""

import helperfw  # noqa: F401
