"""
Settings from an ini file and the command line, and the URLs they hold.

The command line wins over the file; the file wins over the defaults.
"""

from __future__ import annotations

import configparser
import math
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.python import usage


def readIni(path: str, section: str) -> dict[str, str]:
    """The C{[section]} of the ini file at C{path}, keys with dashes."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise usage.UsageError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise usage.UsageError(f"config file {path} is not UTF-8 (byte {e.start})") from None
    except configparser.Error as e:
        raise usage.UsageError(f"bad config file {path}: {e}") from None
    if not parser.has_section(section):
        raise usage.UsageError(f"config file {path} has no [{section}] section")
    return {key.replace("_", "-"): value for key, value in parser.items(section)}


def multiValue(text: str) -> list[str]:
    """An ini value holding several items, one per line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


class IniOptions(usage.Options):
    """
    L{usage.Options} whose C{--config FILE} supplies any option not given on
    the command line.  Subclasses name their ini section, their repeatable
    options (collected in lists) and list C{optParameters} with a default of
    None; C{fallbacks} holds the real defaults.
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
        fromFile = readIni(self["config"], self.section) if self.get("config") else {}
        known = {p[0] for p in self.optParameters} | set(self.repeatable) | {f[0] for f in self.optFlags}
        for key in fromFile:
            if key not in known:
                raise usage.UsageError(f"unknown setting {key!r} in [{self.section}] of {self['config']}")
        for name in self.repeatable:
            if not self[name]:
                self[name] = multiValue(fromFile[name]) if name in fromFile else list(self.fallbacks.get(name, []))
        for flag in self.optFlags:
            name = flag[0]
            if not self[name] and name in fromFile:
                self[name] = fromFile[name].strip().lower() in ("1", "yes", "true", "on")
        for param in self.optParameters:
            name = param[0]
            if self[name] is None:
                self[name] = fromFile.get(name, self.fallbacks.get(name))
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


@dataclass(frozen=True)
class RedisURL:
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    password: str | None = None
    tls: bool = False
    #: With C{rediss://}: a PEM file of the CA that signed the server's
    #: certificate (default: the system trust store).
    ca: str | None = None


def parseRedisURL(url: str) -> RedisURL:
    """
    C{redis://[:password@]host[:port][/db]}, or C{rediss://...} for TLS with
    the server certificate verified (C{?ca=/path/ca.pem} for a private CA).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise usage.UsageError(f"--redis must be redis://host:port/db or rediss://..., not {url!r}")
    try:
        port = parts.port or 6379
        db = int(parts.path.lstrip("/") or 0)
    except ValueError:
        raise usage.UsageError(f"bad port or db number in --redis {url!r}") from None
    return RedisURL(
        host=parts.hostname or "127.0.0.1",
        port=port,
        db=db,
        password=unquote(parts.password) if parts.password else None,
        tls=parts.scheme == "rediss",
        ca=parse_qs(parts.query).get("ca", [None])[0],
    )


def redactedRedisURL(url: RedisURL) -> str:
    """C{url} for the log: no password."""
    scheme = "rediss" if url.tls else "redis"
    return f"{scheme}://{url.host}:{url.port}/{url.db}"


def redactedDatabaseURL(url: DatabaseURL) -> str:
    """C{url} for the log: no password."""
    if url.kind == "sqlite":
        return f"sqlite:{url.path}"
    return f"mysql://{url.user}@{url.host}:{url.port}/{url.database}"
