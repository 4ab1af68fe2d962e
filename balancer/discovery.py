"""
Chat server discovery from the cluster registry in Redis.

The chat servers write (with prefix P, default C{chat:}):

 - C{P servers}: a SET of server names;
 - C{P server:NAME}: a HASH with C{name host port weight logins updated}
   and a TTL of a few seconds that the server keeps refreshing.

Every C{interval} L{RedisDiscovery} reads C{SMEMBERS} and then all the
hashes in one pipeline.  A name whose hash is gone (expired or deleted)
is a server that went away; such names are ignored (this reader never
writes).  When Redis cannot be reached the last known set is kept, and the
connection is retried forever.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from balancer.config import BackendSpec, ConfigError


@dataclass(frozen=True)
class RedisTarget:
    host: str
    port: int
    db: int
    password: str | None
    username: str | None
    tls: bool
    ca_file: str | None


def parse_redis_url(url: str) -> RedisTarget:
    """
    Parse C{redis://[user:password@]host[:port][/db]} or C{rediss://...}
    (TLS, server certificate verified; C{?ca=/path/ca.pem} for a private
    CA).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"not a redis URL: {url!r}")
    db = 0
    path = parts.path.strip("/")
    if path:
        try:
            db = int(path)
        except ValueError:
            raise ConfigError(f"bad database number in {url!r}") from None
    query = parse_qs(parts.query)
    return RedisTarget(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        db=db,
        password=unquote(parts.password) if parts.password else None,
        username=unquote(parts.username) if parts.username else None,
        tls=parts.scheme == "rediss",
        ca_file=query.get("ca", [None])[0],
    )


def parse_registry(
    entries: list[tuple[str, dict[str, str]]],
    max_fails: int = 1,
    fail_timeout: float = 10.0,
) -> tuple[list[BackendSpec], dict[str, int | None]]:
    """
    Turn C{(name, hash)} pairs into backend specs and a logins map keyed by
    backend key.  Empty hashes (expired servers) and malformed ones are
    skipped.
    """
    specs: list[BackendSpec] = []
    logins: dict[str, int | None] = {}
    for name, h in entries:
        if not h:
            continue
        host = h.get("host", "")
        try:
            port = int(h.get("port", ""))
            weight = max(1, int(h.get("weight") or 1))
        except ValueError:
            continue
        if not host or not 0 < port < 65536:
            continue
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        specs.append(
            BackendSpec(
                address=address,
                weight=weight,
                max_fails=max_fails,
                fail_timeout=fail_timeout,
                name=h.get("name") or name,
            )
        )
        try:
            logins[address] = int(h.get("logins", ""))
        except ValueError:
            logins[address] = None
    return specs, logins


class RedisDiscovery(service.Service):
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: str,
        prefix: str,
        interval: float,
        on_update: Callable[[list[BackendSpec], dict[str, int | None]], None],
        max_fails: int = 1,
        fail_timeout: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.target = parse_redis_url(url)
        self.prefix = prefix
        self.interval = interval
        self.on_update = on_update
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self.conn: Any = None
        self._loop: LoopingCall | None = None
        self.polls = 0
        self.errors = 0
        self.last_ok: float | None = None

    def _tls(self) -> Any:
        if not self.target.tls:
            return False
        from twisted.internet import ssl

        trust = None
        if self.target.ca_file:
            with open(self.target.ca_file, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        return ssl.optionsForClientTLS(self.target.host, trustRoot=trust)

    def startService(self) -> None:
        super().startService()
        t = self.target
        self.conn = txredisapi.lazyConnection(
            t.host,
            t.port,
            dbid=t.db,
            reconnect=True,
            password=t.password,
            username=t.username,
            ssl_context_factory=self._tls(),
            convertNumbers=False,
            connectTimeout=max(1.0, self.interval),
            replyTimeout=max(2.0, 2 * self.interval),
        )
        # keep trying, but not too slowly once Redis is back
        self.conn._factory.maxDelay = 5
        self._loop = LoopingCall(self._poll_logged)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True)

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        conn, self.conn = self.conn, None
        if conn is not None:
            yield conn.disconnect()

    def _poll_logged(self) -> defer.Deferred[None]:
        d = self.poll()

        def failed(f: Any) -> None:
            self.errors += 1
            if self.errors == 1 or self.errors % 60 == 0:
                self.log.warn(
                    "registry poll failed ({n} times), keeping the last known "
                    "servers: {why}", n=self.errors, why=f.getErrorMessage(),
                )

        return d.addErrback(failed)

    @defer.inlineCallbacks
    def poll(self) -> Any:
        conn = self.conn
        if conn is None:
            return
        names = yield conn.smembers(self.prefix + "servers")
        names = sorted(n.decode() if isinstance(n, bytes) else n for n in names or ())
        hashes: list[Any] = []
        if names:
            pipe = yield conn.pipeline()
            for name in names:
                pipe.hgetall(f"{self.prefix}server:{name}")
            hashes = yield pipe.execute_pipeline()
        if self.conn is None:
            return
        specs, logins = parse_registry(
            list(zip(names, [_decode(h) for h in hashes])),
            self.max_fails,
            self.fail_timeout,
        )
        self.polls += 1
        if self.errors:
            self.log.info("registry poll works again")
        self.errors = 0
        self.last_ok = self.reactor.seconds()
        self.on_update(specs, logins)


def _decode(h: Any) -> dict[str, str]:
    if not isinstance(h, dict):
        return {}
    out = {}
    for k, v in h.items():
        if isinstance(k, bytes):
            k = k.decode("utf-8", "replace")
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        out[k] = str(v)
    return out
