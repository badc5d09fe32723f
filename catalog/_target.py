"""Which database a catalog setting names: a SQLite file or a PostgreSQL URL, never a guess."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ..protocol.errors import InvalidArgument

__all__ = ["SUPPORTED_FORMS", "CatalogTarget", "mask_url", "parse_target"]

SUPPORTED_FORMS = (
    "a file path or sqlite:///relative.db, sqlite:////absolute.db, file:///absolute.db "
    "(SQLite); postgresql://user@host:port/database (PostgreSQL)"
)

Backend = Literal["sqlite", "postgresql"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_POSTGRES_SCHEMES = ("postgresql", "postgres")
# query parameters of a libpq URL that hold secrets
_SECRET_PARAMS = ("password", "sslpassword")


@dataclass(frozen=True)
class CatalogTarget:
    """A parsed catalog setting: the backend and where its database is.

    Attributes:
        backend: ``"sqlite"`` or ``"postgresql"``.
        location: the SQLite file (absolute) or the PostgreSQL URL as given, password included
            (never print it: use ``label``).
        label: the catalog as shown to people: the file path, or the URL with its password
            masked.
    """

    backend: Backend
    location: str
    label: str

    def __repr__(self) -> str:  # the location may hold a password
        return f"CatalogTarget({self.backend!r}, {self.label!r})"

    @property
    def path(self) -> Path:
        """The SQLite file of this target.

        Raises:
            InvalidArgument: the target is not a SQLite file.
        """
        if self.backend != "sqlite":
            raise InvalidArgument(f"the catalog {self.label} is {self.backend}, not a file")
        return Path(self.location)

    def secrets(self) -> list[str]:
        """The secrets in the location, to be scrubbed from any message that quotes a driver."""
        if self.backend != "postgresql":
            return []
        parts = urlsplit(self.location)
        found = [unquote(parts.password)] if parts.password else []
        found += [v for k, v in parse_qsl(parts.query) if k in _SECRET_PARAMS and v]
        return found

    def scrub(self, text: str) -> str:
        """``text`` with every secret of the location replaced by ``***``."""
        for secret in self.secrets():
            text = text.replace(secret, "***")
        return text


def mask_url(url: str) -> str:
    """The URL with its password (in the user part or the query) replaced by ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k in _SECRET_PARAMS for k, _ in pairs):
        query = urlencode([(k, "***" if k in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _sqlite_url_path(text: str, scheme: str) -> str:
    rest = text[len(scheme) + 1 :]
    if scheme == "sqlite":
        # SQLAlchemy's form: sqlite:///relative.db, sqlite:////absolute.db
        if not rest.startswith("///") or len(rest) == 3:
            raise InvalidArgument(
                f"cannot read the catalog URL {text!r}: SQLite URLs are sqlite:///relative.db "
                "or sqlite:////absolute.db"
            )
        path = rest[3:]
    else:
        # RFC 8089: file:///absolute.db, file://localhost/absolute.db, file:relative.db
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise InvalidArgument(
                f"cannot read the catalog URL {text!r}: file URLs are file:///absolute.db "
                "or file:relative.db (no host)"
            )
        path = unquote(parts.path)
    if "?" in path or "#" in path:
        raise InvalidArgument(
            f"the catalog URL {text!r} has a query or fragment: SQLite catalogs take none"
        )
    return path


def parse_target(target: str | Path) -> CatalogTarget:
    """Read a catalog setting: a path, a ``sqlite:``/``file:`` URL or a ``postgresql://`` URL.

    Any other ``scheme://`` is refused instead of being taken for a file name.

    Raises:
        InvalidArgument: the setting is empty or names an unsupported kind of database.
    """
    if isinstance(target, Path):
        text = str(target)
    else:
        text = target.strip()
    if not text:
        raise InvalidArgument(f"the catalog setting is empty: give {SUPPORTED_FORMS}")
    match = None if isinstance(target, Path) else _SCHEME.match(text)
    scheme = match.group(1).lower() if match else ""
    # a Windows drive ("C:\\...", "C:/...") looks like a one-letter scheme
    if match and len(scheme) == 1 and not text[2:].startswith("//"):
        match, scheme = None, ""
    if scheme in _POSTGRES_SCHEMES:
        if not text[len(scheme) + 1 :].startswith("//"):
            raise InvalidArgument(
                f"cannot read the catalog URL {mask_url(text)!r}: PostgreSQL URLs are "
                "postgresql://user@host:port/database"
            )
        text = scheme + text[len(scheme) :]  # libpq takes the scheme in lower case only
        return CatalogTarget("postgresql", text, mask_url(text))
    if scheme in ("sqlite", "file"):
        text = _sqlite_url_path(text, scheme)
    elif match and text[len(scheme) + 1 :].startswith("//"):
        raise InvalidArgument(
            f"unsupported catalog {mask_url(text)!r} ({scheme}://): give {SUPPORTED_FORMS}"
        )
    path = Path(text).expanduser().resolve()
    return CatalogTarget("sqlite", str(path), str(path))
