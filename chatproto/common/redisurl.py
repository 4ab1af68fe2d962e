"""
The one Redis URL parser:

 - C{redis://[[user]:password@]host[:port][/db]}
 - C{rediss://...} (TLS; C{?ca=/path/ca.pem} names a private CA)
 - C{redis+sentinel://[[user]:password@]h1:26379,h2:26379/mastername[/db]}

Host names, IPv4 and bracketed IPv6 addresses (C{[::1]:6379}) are accepted.
Errors are L{ValueError}s that name the part that is wrong, and never show
the password.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote

DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

_SCHEMES = ("redis", "rediss", "redis+sentinel")
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class RedisURL:
    """
    A parsed Redis URL.  For C{redis+sentinel://}, C{sentinels} holds the
    sentinel addresses, C{master} the master's name, and C{host}/C{port}
    the first sentinel.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca: str | None = None
    sentinels: tuple[tuple[str, int], ...] = field(default=())
    master: str | None = None

    def redacted(self) -> str:
        """
        The URL to show in logs: everything but the password.
        """
        scheme = "rediss" if self.tls else "redis"
        if self.sentinels:
            scheme = "redis+sentinel"
        user = ""
        if self.username or self.password:
            user = (self.username or "") + (":***" if self.password else "") + "@"
        if self.sentinels:
            hosts = ",".join(_hostPort(h, p) for h, p in self.sentinels)
            return f"{scheme}://{user}{hosts}/{self.master}/{self.db}"
        return f"{scheme}://{user}{_hostPort(self.host, self.port)}/{self.db}"


def _hostPort(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parseHostPort(text: str, defaultPort: int) -> tuple[str, int]:
    """
    C{host}, C{host:port}, C{[v6]} or C{[v6]:port}.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in host {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if not host or not re.match(r"^[0-9A-Fa-f:.]+$", host) or ":" not in host:
            raise ValueError(f"bad IPv6 address {host!r}")
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after the IPv6 address")
        portText = rest[1:] if rest else ""
    else:
        host, sep, portText = text.partition(":")
        if sep and ":" in portText:
            raise ValueError(f"IPv6 addresses need brackets: {text!r}")
        if not host:
            raise ValueError(f"missing host in {text!r}")
        if not _HOSTNAME.match(host):
            raise ValueError(f"bad host name {host!r}")
        if sep and not portText:
            raise ValueError(f"empty port in {text!r}")
    if not portText:
        return host, defaultPort
    if not portText.isdigit() or len(portText) > 5 or not 0 < int(portText) < 65536:
        raise ValueError(f"bad port {portText!r}")
    return host, int(portText)


def _parseDb(text: str) -> int:
    if not text:
        return 0
    if not text.isdigit() or len(text) > 5:
        raise ValueError(f"bad database number {text!r}")
    return int(text)


def parseRedisURL(url: str) -> RedisURL:
    """
    Parse a Redis URL (see the module docstring).

    @raise ValueError: naming the part that is wrong.
    """
    if not isinstance(url, str):
        raise ValueError(f"not a Redis URL: {url!r}")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        shown = scheme if sep else url
        raise ValueError(
            f"unknown scheme {shown!r}: use redis://, rediss:// or redis+sentinel://"
        )
    scheme = scheme.lower()
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
        if not colon:
            # redis://password@host is not a thing; user@host is a user
            # without a password (AUTH user "")
            password = None
    params = parse_qs(query)
    ca = params.get("ca", [None])[0]
    if scheme == "redis+sentinel":
        if not netloc:
            raise ValueError("missing sentinel hosts")
        sentinels = tuple(
            _parseHostPort(part, DEFAULT_SENTINEL_PORT) for part in netloc.split(",")
        )
        pieces = [p for p in path.split("/")] if path else []
        if not pieces or not pieces[0]:
            raise ValueError("missing master name after the sentinel hosts")
        if len(pieces) > 2:
            raise ValueError(f"unexpected path {path!r}")
        return RedisURL(
            host=sentinels[0][0],
            port=sentinels[0][1],
            db=_parseDb(pieces[1] if len(pieces) > 1 else ""),
            username=username,
            password=password,
            sentinels=sentinels,
            master=unquote(pieces[0]),
        )
    if not netloc:
        host, port = "127.0.0.1", DEFAULT_PORT
    else:
        host, port = _parseHostPort(netloc, DEFAULT_PORT)
    if "/" in path:
        raise ValueError(f"unexpected path {'/' + path!r}")
    return RedisURL(
        host=host,
        port=port,
        db=_parseDb(path),
        username=username,
        password=password,
        tls=scheme == "rediss",
        ca=ca,
    )
