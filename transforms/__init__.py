"""Transforms (filters, collaters, preprocessors) run on the server; built in a later issue."""

from __future__ import annotations

__all__: list[str] = []
