"""Hiding secrets in text: the password of a URL (``scheme://user:password@host/...``).

Used wherever a location URL may be shown back: records on the wire, every error message
(``LavenderError`` redacts its own), and the server's log lines. ``scrub_values`` hides known
secret values (a location's hidden storage options) in text a storage library wrote.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["REDACTED", "redact_urls", "scrub_values"]

REDACTED = "***"
"""What a hidden value shows instead of itself."""

# ``scheme://user:password@host``: the password runs to the first ``@`` that a host name
# follows (then a port, a path or the end), so a raw ``/`` or ``@`` inside it (an AWS secret
# pasted as it is) is hidden too
_USERINFO = re.compile(
    r"(?P<head>\b[a-z][a-z0-9+.-]*://[^/@:\s'\"]*):\S*?"
    r"@(?=[\w.\-\[\]%]*(?::\d*)?(?:[/\s'\"?#),;]|$))",
    re.IGNORECASE,
)


def redact_urls(text: str) -> str:
    """``text`` with the password of every URL in it shown as ``***`` (the user name stays)."""
    if "@" not in text:  # the usual case: nothing to look for
        return text
    return _USERINFO.sub(rf"\g<head>:{REDACTED}@", text)


def scrub_values(text: str, hidden: Iterable[str]) -> str:
    """``text`` with every occurrence of a ``hidden`` value shown as ``***`` (longest first)."""
    for value in sorted(hidden, key=len, reverse=True):
        if value in text:
            text = text.replace(value, REDACTED)
    return text
