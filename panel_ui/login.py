"""The dashboard's login: the password is one of the server's API keys, any of them.

Panel's basic login compares one password with ``==`` and shows a generic page whose logo
and icon come from a CDN (a broken image offline). :class:`KeyLogin` is Panel's basic
auth provider with our own login and logout pages (nothing loaded from elsewhere; they say
the password is an API key) and a check of the key against every key the server has, in
constant time: ``hmac.compare_digest`` with each of them, no early exit, so the answer's
timing tells nothing of which key, or how much of one, matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Any

from jinja2 import Template
from panel.auth import BasicAuthProvider, BasicLoginHandler, LogoutHandler

__all__ = ["LOGIN_PAGE", "LOGO", "LOGOUT_PAGE", "WRONG_KEY", "KeyLogin", "key_matches"]

WRONG_KEY = "That is not one of the server's API keys: try again."

LOGO = (
    '<svg id="lf-logo" xmlns="http://www.w3.org/2000/svg" width="36" height="36" '
    'viewBox="0 0 36 36" role="img" aria-label="Lavender Flight logo">'
    '<path d="M18 34 V14" stroke="#4c7a3d" stroke-width="2" fill="none"/>'
    '<g fill="#8e6cc9">'
    '<ellipse cx="18" cy="5" rx="3" ry="4"/>'
    '<ellipse cx="14" cy="10" rx="3" ry="3.6"/><ellipse cx="22" cy="10" rx="3" ry="3.6"/>'
    '<ellipse cx="14.5" cy="16" rx="2.8" ry="3.4"/><ellipse cx="21.5" cy="16" rx="2.8" ry="3.4"/>'
    '<ellipse cx="15" cy="21.5" rx="2.4" ry="3"/><ellipse cx="21" cy="21.5" rx="2.4" ry="3"/>'
    "</g></svg>"
)
"""The logo, inline in the page: nothing to fetch, from a CDN or from anywhere."""

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; background: #f6f4fa;
  margin: 0; height: 100vh; display: flex; align-items: center; justify-content: center; }
form, .box { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 2em;
  width: 380px; }
h1 { color: #5b3a99; font-size: 22px; margin: 0 0 4px 0; display: flex; align-items: center;
  gap: 8px; }
p { color: #333; line-height: 1.5; }
label { display: block; font-weight: 600; margin: 12px 0 4px 0; }
input { box-sizing: border-box; width: 100%; padding: 10px; border: 1px solid #ccc;
  border-radius: 4px; font-family: monospace; }
button { margin-top: 14px; width: 100%; padding: 10px; background: #5b3a99; color: #fff;
  border: 0; border-radius: 4px; font-size: 15px; cursor: pointer; }
.error { color: #8a1f11; font-weight: 600; }
a { color: #5b3a99; }
"""

LOGIN_PAGE = Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>Lavender Flight · Log in</title>
<link rel="icon" href="data:,">
<style>"""
    + _STYLE
    + """</style>
</head>
<body>
<form action=".{{ login_endpoint }}" method="post">
  <h1>"""
    + LOGO
    + """Lavender Flight</h1>
  <p>This dashboard needs one of the server's <b>API keys</b> (what its
  <code>--api-key</code>, <code>--api-keys-file</code> or
  <code>LAVENDER_FLIGHT_API_KEY</code> hold).</p>
  {% if errormessage %}<p class="error" id="login-error">"""
    + WRONG_KEY
    + """</p>{% endif %}
  <input type="hidden" name="username" value="api-key">
  <label for="api-key">API key</label>
  <input id="api-key" name="password" type="password" autocomplete="current-password"
         autofocus placeholder="the server's API key">
  <button type="submit">Log in</button>
</form>
</body>
</html>
"""
)

LOGOUT_PAGE = Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Lavender Flight · Logged out</title>
<link rel="icon" href="data:,">
<style>"""
    + _STYLE
    + """</style>
</head>
<body>
<div class="box">
  <h1>"""
    + LOGO
    + """Lavender Flight</h1>
  <p id="logged-out">You are logged out of the dashboard.</p>
  <p><a href=".{{ LOGIN_ENDPOINT }}">Log in again</a></p>
</div>
</body>
</html>
"""
)


def key_matches(given: str, keys: Sequence[bytes]) -> bool:
    """Whether ``given`` is one of ``keys``: compared with every key in constant time."""
    candidate = given.encode()
    found = False
    for key in keys:  # no early exit: the time does not tell which key matched
        found |= hmac.compare_digest(candidate, key)
    return found


class _KeyLoginHandler(BasicLoginHandler):
    """Panel's login handler, checking the password against every API key."""

    _keys: tuple[bytes, ...] = ()

    def _validate(self, username: str, password: str) -> bool:
        return key_matches(password, self._keys)


class KeyLogin(BasicAuthProvider):
    """The login of a dashboard whose passwords are the server's API keys (module doc)."""

    def __init__(self, keys: Sequence[str], **options: Any) -> None:
        login_endpoint = options.get("login_endpoint") or "/login"
        keys_bytes = tuple(k.encode() for k in keys if k)
        # Handler classes of its own (Panel's are shared by every server of the process),
        # made before Panel's __init__, which already asks for them.
        self._handler: type[BasicLoginHandler] = type(
            "KeyLoginHandler",
            (_KeyLoginHandler,),
            {
                "_keys": keys_bytes,
                "_login_template": LOGIN_PAGE,
                "_login_endpoint": login_endpoint,
            },
        )
        self._logout: type[LogoutHandler] = type(
            "KeyLogoutHandler",
            (LogoutHandler,),
            {"_logout_template": LOGOUT_PAGE, "_login_endpoint": login_endpoint},
        )
        super().__init__(**options)
        self._login_template = LOGIN_PAGE
        self._logout_template = LOGOUT_PAGE

    @property
    def login_handler(self) -> type[BasicLoginHandler]:
        """The handler of ``/login``: our page, every key accepted."""
        return self._handler

    @property
    def logout_handler(self) -> type[LogoutHandler]:
        """The handler of ``/logout``: our page, with a link to log in again."""
        return self._logout
