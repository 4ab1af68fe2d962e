"""
The chat servers' registry in Redis, read side.

The chat servers write (prefix C{P}, default C{chat:}, see
C{chatproto.redisscripts.REGISTER}):

 - C{P servers}: a SET of server names;
 - C{P server:NAME}: a HASH C{name host port weight logins updated} with a
   TTL that the server keeps refreshing.

A name whose hash is gone (expired or deleted) is a server that went away.
L{parseServer} turns one hash (a mapping, or the flat C{[field, value, ...]}
list that C{HGETALL} returns inside a Lua script) into a L{ServerEntry};
L{readRegistry} reads the whole registry with C{SMEMBERS} and one pipeline
of C{HGETALL}s.  This reader never writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer


@dataclass(frozen=True)
class ServerEntry:
    name: str
    host: str
    port: int
    weight: int = 1
    #: C{None} when the entry carries no (or a malformed) count
    logins: int | None = None
    #: unix time of the server's last refresh, 0 if not given
    updated: int = 0

    @property
    def address(self) -> str:
        """
        C{host:port}, or C{[host]:port} for an IPv6 address.
        """
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _fields(raw: Mapping[Any, Any] | list[Any] | None) -> dict[str, str]:
    if not raw:
        return {}
    if isinstance(raw, Mapping):
        items = list(raw.items())
    else:
        items = list(zip(raw[::2], raw[1::2]))
    return {_text(k): _text(v) for k, v in items}


def _int(text: str | None) -> int | None:
    try:
        return int(text or "")
    except ValueError:
        return None


def parseServer(name: Any, raw: Mapping[Any, Any] | list[Any] | None) -> ServerEntry | None:
    """
    One registry hash as a L{ServerEntry}, or C{None} when it is empty
    (expired) or malformed (no host, bad port).  A missing or bad weight
    counts as 1; a missing or bad logins count as C{None}.
    """
    h = _fields(raw)
    if not h:
        return None
    host = h.get("host", "")
    port = _int(h.get("port"))
    if not host or port is None or not 0 < port < 65536:
        return None
    weight = _int(h.get("weight"))
    return ServerEntry(
        name=h.get("name") or _text(name),
        host=host,
        port=port,
        weight=max(1, weight or 1),
        logins=_int(h.get("logins")),
        updated=_int(h.get("updated")) or 0,
    )


def parseServers(entries: Iterable[tuple[Any, Any]]) -> list[ServerEntry]:
    """
    C{(name, hash)} pairs as L{ServerEntry}s, sorted by name; empty and
    malformed entries are left out.
    """
    out = [parseServer(name, raw) for name, raw in entries]
    return sorted((e for e in out if e is not None), key=lambda e: e.name)


@defer.inlineCallbacks
def readRegistry(conn: Any, prefix: str) -> Any:
    """
    Read the registry through a txredisapi connection (C{smembers} and
    C{pipeline}); fires with a list of L{ServerEntry}.
    """
    names = yield conn.smembers(prefix + "servers")
    names = sorted(_text(n) for n in names or ())
    hashes: list[Any] = []
    if names:
        pipe = yield conn.pipeline()
        for name in names:
            pipe.hgetall(f"{prefix}server:{name}")
        hashes = yield pipe.execute_pipeline()
    return parseServers(zip(names, hashes))
