"""
Chat server discovery from the cluster registry in Redis (format and
reader: L{chatproto.common.registry}).

Every C{interval} L{RedisDiscovery} reads the registry and hands the
servers to C{onUpdate} as backend specs.  When Redis cannot be reached the
last known set is kept, the connection is retried forever, and the
failures are counted (C{errors}, C{consecutiveErrors}, C{lastError},
C{lastErrorTime}, shown by the status endpoint) and logged with the Redis
URL (password left out).

With C{redis+sentinel://} the master is looked up through the sentinels
(L{chatproto.common.sentinel.masterAddress}) before every connection, and
the connection is used only while C{ROLE} says C{master} (checked on
connecting and at every poll: a sentinel may name the old master for a
moment, and a demoted master may keep answering).  A lost connection, a
server that is no longer the master or L{RECONNECT_AFTER} failed polls in
a row drop the connection; the next poll asks the sentinels again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from balancer import _twisted
from balancer.config import BackendSpec, ConfigError
from chatproto.common.redisurl import RedisURL, parseRedisURL
from chatproto.common.registry import ServerEntry, readRegistry
from chatproto.common.sentinel import masterAddress, roleOf

#: longest wait between reconnection attempts to Redis
MAX_RECONNECT_DELAY = 5.0
#: after this many failed polls in a row the connection is made anew
#: (txredisapi gives up for good after a refused AUTH)
RECONNECT_AFTER = 3


def parseTarget(url: str) -> RedisURL:
    """
    The Redis to discover from: C{redis://}, C{rediss://} or
    C{redis+sentinel://}.
    """
    try:
        return parseRedisURL(url)
    except ValueError as e:
        raise ConfigError(f"bad --redis URL: {e}") from None


class NotMaster(Exception):
    """The server the sentinels named is not (or no longer) the master."""


def _abandonable(d: defer.Deferred, dispose: Callable[[Any], Any]) -> defer.Deferred:
    """
    C{d}'s result through a Deferred that can be cancelled; a result that
    arrives after the cancellation is handed to C{dispose} (a connection
    nobody waits for any more is closed, not leaked).
    """
    abandoned = []
    outer: defer.Deferred = defer.Deferred(lambda _: abandoned.append(True))

    def done(result: Any) -> None:
        if abandoned:
            dispose(result)
        else:
            outer.callback(result)

    def failed(f: Any) -> None:
        if not abandoned:
            outer.errback(f)

    d.addCallbacks(done, failed)
    return outer


def _dropQuietly(conn: Any) -> None:
    if conn is not None:
        defer.maybeDeferred(conn.disconnect).addErrback(lambda f: None)


#: failures after which a Sentinel-found connection is dropped at once
_CONNECTION_GONE = (NotMaster, txredisapi.ConnectionError, error.ConnectionLost, error.ConnectionDone)


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
        #: with Sentinel: the master's (host, port) the connection is to
        self.master: tuple[str, int] | None = None
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
            connectTimeout=self.connectTimeout(),
            replyTimeout=self.pollTimeout(),
        )
        # keep trying, but not too slowly once Redis is back
        _twisted.setRedisMaxDelay(conn, MAX_RECONNECT_DELAY)
        return conn

    @property
    def sentinel(self) -> bool:
        return bool(self.target.sentinels)

    def connectTimeout(self) -> float:
        return max(1.0, self.interval)

    def findMaster(self) -> defer.Deferred[tuple[str, int]]:
        """The master's address according to the sentinels."""
        t = self.target
        return defer.Deferred.fromCoroutine(
            masterAddress(self.reactor, t.sentinels, t.master, timeout=self.connectTimeout())
        )

    def connectMaster(self, host: str, port: int) -> defer.Deferred[Any]:
        """
        A connection to the server the sentinels named (no reconnection of
        its own: the next connection goes wherever the sentinels say).
        """
        t = self.target
        return txredisapi.Connection(
            host, port, dbid=t.db, reconnect=False, password=t.password, username=t.username,
            convertNumbers=False, connectTimeout=self.connectTimeout(), replyTimeout=self.pollTimeout(),
        )

    @defer.inlineCallbacks
    def checkRole(self, conn: Any, address: tuple[str, int]) -> Any:
        kind = roleOf((yield conn.execute_command("ROLE")))
        if kind != "master":
            raise NotMaster(f"{address[0]}:{address[1]} is a {kind}, not the master {self.target.master!r}")

    @defer.inlineCallbacks
    def attachMaster(self) -> Any:
        """
        Look the master up, connect, check ROLE; fires with the connection
        and remembers the address in L{master}.
        """
        address = yield self.findMaster()
        conn = yield _abandonable(self.connectMaster(*address), _dropQuietly)
        try:
            yield self.checkRole(conn, address)
        except BaseException:
            _dropQuietly(conn)
            raise
        if not self.running:
            _dropQuietly(conn)
            return None
        if address != self.master:
            self.log.info(
                "sentinels name {host}:{port} as master {name}; reading the registry there",
                host=address[0], port=address[1], name=self.target.master,
            )
        self.conn, self.master = conn, address
        return conn

    def startService(self) -> None:
        super().startService()
        self.log.info("discovering chat servers from Redis at {url}", url=self.redactedURL)
        if not self.sentinel:
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
        if self.running and (
            self.consecutiveErrors % RECONNECT_AFTER == 0
            or (self.sentinel and f.check(*_CONNECTION_GONE))
        ):
            self.reconnect()
        if self.consecutiveErrors == 1 or self.consecutiveErrors % 60 == 0:
            self.log.warn(
                "reading the chat server registry from Redis at {url} failed "
                "({n} times in a row), keeping the last known servers: {why}",
                url=self.redactedURL, n=self.consecutiveErrors, why=why,
            )

    def reconnect(self) -> None:
        """
        Drop the connection and make a new one (with Sentinel: the next
        poll asks the sentinels where the master is).
        """
        if self.sentinel:
            old, self.conn = self.conn, None
        else:
            old, self.conn = self.conn, self.connect()
        _dropQuietly(old)

    @defer.inlineCallbacks
    def poll(self) -> Any:
        conn = self.conn
        if self.sentinel and self.running:
            if conn is None:
                conn = yield self.attachMaster()
            else:
                yield self.checkRole(conn, self.master)
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
