"""
Chat server discovery from the cluster registry in Redis (format and
reader: L{chatproto.common.registry}).

Every C{interval} L{RedisDiscovery} reads the registry and hands the
servers to C{onUpdate} as backend specs.  When Redis cannot be reached the
last known set is kept, the connection is retried forever, and the
failures are counted (C{errors}, C{consecutiveErrors}, C{lastError},
C{lastErrorTime}, shown by the status endpoint) and logged with the Redis
URL (password left out).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from balancer import _twisted
from balancer.config import BackendSpec, ConfigError
from chatproto.common.redisurl import RedisURL, parseRedisURL
from chatproto.common.registry import ServerEntry, readRegistry

#: longest wait between reconnection attempts to Redis
MAX_RECONNECT_DELAY = 5.0
#: after this many failed polls in a row the connection is made anew
#: (txredisapi gives up for good after a refused AUTH)
RECONNECT_AFTER = 3


def parseTarget(url: str) -> RedisURL:
    """
    The Redis to discover from; C{redis+sentinel://} is not supported yet.
    """
    try:
        target = parseRedisURL(url)
    except ValueError as e:
        raise ConfigError(f"bad --redis URL: {e}") from None
    if target.sentinels:
        raise ConfigError("--redis: redis+sentinel:// is not supported by the balancer yet")
    return target


def toBackends(
    entries: list[ServerEntry], maxFails: int = 1, failTimeout: float = 10.0
) -> tuple[list[BackendSpec], dict[str, int | None]]:
    """
    Registry entries as backend specs, and a logins map keyed by backend
    key.
    """
    specs = [
        BackendSpec(
            address=e.address, weight=e.weight, maxFails=maxFails,
            failTimeout=failTimeout, name=e.name,
        )
        for e in entries
    ]
    return specs, {e.address: e.logins for e in entries}


class PollTimeout(Exception):
    pass


class RedisDiscovery(service.Service):
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: str,
        prefix: str,
        interval: float,
        onUpdate: Callable[[list[BackendSpec], dict[str, int | None]], None],
        maxFails: int = 1,
        failTimeout: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.target = parseTarget(url)
        self.redactedURL = self.target.redacted()
        self.prefix = prefix
        self.interval = interval
        self.onUpdate = onUpdate
        self.maxFails = maxFails
        self.failTimeout = failTimeout
        self.conn: Any = None
        self._loop: LoopingCall | None = None
        self.polls = 0
        self.errors = 0
        self.consecutiveErrors = 0
        self.lastOk: float | None = None
        self.lastError: str | None = None
        self.lastErrorTime: float | None = None

    def _tls(self) -> Any:
        if not self.target.tls:
            return False
        from twisted.internet import ssl

        trust = None
        if self.target.ca:
            with open(self.target.ca, "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        return ssl.optionsForClientTLS(self.target.host, trustRoot=trust)

    def connect(self) -> Any:
        t = self.target
        conn = txredisapi.lazyConnection(
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
        _twisted.setRedisMaxDelay(conn, MAX_RECONNECT_DELAY)
        return conn

    def startService(self) -> None:
        super().startService()
        self.log.info("discovering chat servers from Redis at {url}", url=self.redactedURL)
        self.conn = self.connect()
        self._loop = LoopingCall(self._pollLogged)
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

    def _pollLogged(self) -> defer.Deferred[None]:
        d = self.poll()
        # txredisapi queues commands while it cannot connect: a poll that
        # hangs is a failed poll
        timeout = self.pollTimeout()
        d.addTimeout(timeout, self.reactor, onTimeoutCancel=self._timedOut)
        return d.addErrback(self.pollFailed)

    def pollTimeout(self) -> float:
        return max(2.0, 2 * self.interval)

    def _timedOut(self, result: Any, timeout: float) -> Any:
        raise PollTimeout(f"no answer from Redis within {timeout:g}s")

    def pollFailed(self, f: Any) -> None:
        """
        Count and remember a failed poll; log the first of a run of them
        and every 60th.
        """
        self.errors += 1
        self.consecutiveErrors += 1
        why = f.getErrorMessage() or type(f.value).__name__
        self.lastError = why
        self.lastErrorTime = self.reactor.seconds()
        if self.consecutiveErrors % RECONNECT_AFTER == 0 and self.running:
            self.reconnect()
        if self.consecutiveErrors == 1 or self.consecutiveErrors % 60 == 0:
            self.log.warn(
                "reading the chat server registry from Redis at {url} failed "
                "({n} times in a row), keeping the last known servers: {why}",
                url=self.redactedURL, n=self.consecutiveErrors, why=why,
            )

    def reconnect(self) -> None:
        """
        Drop the connection and make a new one.
        """
        old, self.conn = self.conn, self.connect()
        if old is not None:
            defer.maybeDeferred(old.disconnect).addErrback(lambda f: None)

    @defer.inlineCallbacks
    def poll(self) -> Any:
        conn = self.conn
        if conn is None:
            return
        entries = yield readRegistry(conn, self.prefix)
        if self.conn is None:
            return
        specs, logins = toBackends(entries, self.maxFails, self.failTimeout)
        self.polls += 1
        if self.consecutiveErrors:
            self.log.info(
                "reading the registry from Redis at {url} works again", url=self.redactedURL
            )
        self.consecutiveErrors = 0
        self.lastOk = self.reactor.seconds()
        self.onUpdate(specs, logins)
