"""The Panel dashboard over the catalog; built in a later issue."""

from __future__ import annotations

__all__: list[str] = []
