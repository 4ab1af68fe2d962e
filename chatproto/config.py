"""
Settings from an ini file and the command line, and the URLs they hold.

The command line wins over the file; the file wins over the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from twisted.python import usage

from chatproto.common.options import OptionsError, mergeOptions, readSection
from chatproto.common.redisurl import RedisURL
from chatproto.common.redisurl import parseRedisURL as _parseRedisURL


def readIni(path: str, section: str, known=(), lists=()) -> dict:
    """
    The C{[section]} of the ini file at C{path}, keys with dashes, read by
    the one reader both servers use (L{chatproto.common.options}).
    """
    try:
        return readSection(path, section, known, lists)
    except OptionsError as e:
        raise usage.UsageError(str(e)) from None


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "yes", "true", "on")


class IniOptions(usage.Options):
    """
    L{usage.Options} whose C{--config FILE} supplies any option not given on
    the command line.  Subclasses name their ini section, their repeatable
    options (collected in lists) and list C{optParameters} with a default of
    None; C{fallbacks} holds the real defaults.  The merge (command line,
    then file, then default) is L{chatproto.common.options.mergeOptions}.
    """

    section = ""
    repeatable: tuple[str, ...] = ()
    optFlags: list = []
    fallbacks: dict[str, object] = {}

    def __init__(self) -> None:
        super().__init__()
        for name in self.repeatable:
            self[name] = []

    def postOptions(self) -> None:
        params = [p[0] for p in self.optParameters]
        flags = [f[0] for f in self.optFlags]
        fromFile = {}
        if self.get("config"):
            fromFile = readIni(self["config"], self.section, {*params, *flags, *self.repeatable}, self.repeatable)
        scalars = {name: (self.fallbacks.get(name), None) for name in params}
        scalars.update({name: (False, _flag) for name in flags})
        given = {name: self[name] for name in params}
        given.update({name: True if self[name] else None for name in flags})
        given.update({name: self[name] for name in self.repeatable})
        lists = {name: list(self.fallbacks.get(name, [])) for name in self.repeatable}
        try:
            self.update(mergeOptions(given, fromFile, scalars, lists))
        except OptionsError as e:
            raise usage.UsageError(str(e)) from None
        self.checkValues()

    def checkValues(self) -> None:
        """Validate and convert the merged values."""


def number(options, name: str, kind=float, minimum=None, maximum=None):
    """
    Convert option C{name} to C{kind}, finite and within C{minimum} and
    C{maximum} (inclusive), with a clear usage error.
    """
    value = options[name]
    if value is None or value == "":
        return None
    try:
        value = kind(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise usage.UsageError(f"--{name} must be a number, not {options[name]!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise usage.UsageError(f"--{name} must be a finite number, not {options[name]!r}")
    if minimum is not None and value < minimum:
        raise usage.UsageError(f"--{name} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise usage.UsageError(f"--{name} must be at most {maximum}")
    options[name] = value
    return value


@dataclass(frozen=True)
class DatabaseURL:
    kind: str  # "sqlite" or "mysql"
    path: str = ""
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = ""
    database: str = "chat"


def parseDatabaseURL(url: str) -> DatabaseURL:
    """
    C{sqlite:PATH} (C{sqlite::memory:} for a throwaway database) or
    C{mysql://user:pass@host:port/db}.
    """
    if url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise usage.UsageError("--db sqlite:PATH needs a path")
        return DatabaseURL("sqlite", path=path)
    parts = urlsplit(url)
    if parts.scheme in ("mysql", "mariadb"):
        database = parts.path.lstrip("/")
        if not database:
            raise usage.UsageError("--db mysql://user:pass@host:port/DATABASE needs a database name")
        try:
            port = parts.port or 3306
        except ValueError:
            raise usage.UsageError(f"bad port in --db {url!r}") from None
        return DatabaseURL(
            "mysql",
            host=parts.hostname or "127.0.0.1",
            port=port,
            user=unquote(parts.username or "root"),
            password=unquote(parts.password or ""),
            database=database,
        )
    raise usage.UsageError(f"--db must be sqlite:PATH or mysql://user:pass@host:port/db, not {url!r}")


def parseRedisURL(url: str) -> RedisURL:
    """
    C{--redis}: C{redis://[[user]:password@]host[:port][/db]},
    C{rediss://...} for TLS with the server certificate verified
    (C{?ca=/path/ca.pem} for a private CA), or
    C{redis+sentinel://h1:26379,h2:26379/mymaster[/db]}; parsed by the one
    parser the balancer uses too (L{chatproto.common.redisurl}).
    """
    try:
        return _parseRedisURL(url)
    except ValueError as e:
        raise usage.UsageError(f"--redis: {e}") from None


def redactedRedisURL(url: RedisURL) -> str:
    """C{url} for the log: no password."""
    return url.redacted()


def redactedDatabaseURL(url: DatabaseURL) -> str:
    """C{url} for the log: no password."""
    if url.kind == "sqlite":
        return f"sqlite:{url.path}"
    return f"mysql://{url.user}@{url.host}:{url.port}/{url.database}"
