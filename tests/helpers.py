"""Helpers shared by the tests (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from jaxsplit.models import random_params

__all__ = ["random_params"]
