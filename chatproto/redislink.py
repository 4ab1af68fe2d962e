"""
One Redis connection kept up for a L{chatproto.rediscluster.RedisCluster}:
txredisapi's protocols over C{reactor.connectTCP}/C{connectSSL} (an
endpoint wrapper would lose C{clientConnectionLost}, which reconnection
needs), with back-off that never gives up, even after a failed AUTH.
"""

from __future__ import annotations

import random

import txredisapi
from twisted.internet import defer, error, protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproto import _twisted
from chatproto.common.sentinel import masterAddress, roleOf

log = Logger()


def _readyProtocol(base):
    """A txredisapi protocol class that tells its L{Link} when it is ready
    (after AUTH and SELECT) and when it is gone."""

    class Protocol(base):
        link = None

        def connectionMade(self):
            d = base.connectionMade(self)
            d.addCallback(self._made)
            d.addErrback(lambda f: log.failure("Redis connection set-up failed", f))

        def _made(self, _):
            if _twisted.redisReady(self):
                self.link.protocolReady(self)

    return Protocol


class CommandProtocol(_twisted.packedCommands(_readyProtocol(txredisapi.RedisProtocol))):
    pass


class SubscriberProtocol(_readyProtocol(txredisapi.SubscriberProtocol)):
    def messageReceived(self, pattern, channel, message):
        self.link.onMessage(message)


class Link(protocol.ClientFactory):
    """
    One Redis connection kept up: reconnects with exponential back-off
    (C{initialDelay} doubling up to C{maxDelay}, with jitter) for as long
    as it runs, whatever went wrong (refused, timed out, AUTH failed).

    It is also the C{factory} that txredisapi's protocol reports to.
    """

    noisy = False
    isLazy = True  # txredisapi: errors are logged, not raised to a caller
    initialDelay = 0.1
    maxDelay = 5.0
    sentinelMaxDelay = 1.0
    factor = 2.0
    connectTimeout = 3

    def __init__(self, cluster, name: str, protocolClass, onReady, onMessage=None) -> None:
        self.cluster = cluster
        self.name = name
        self.protocolClass = protocolClass
        self.onReady = onReady
        #: called with each pub/sub message (subscriber links)
        self.onMessage = onMessage
        self.protocol = None  # the ready protocol, if any
        self.running = False
        self.connector = None
        self.delay = self.initialDelay
        self._retryCall = None
        self._stopped: list[defer.Deferred] = []
        self._failures = 0
        #: the address connected to (the master's, with Sentinel)
        self.address = (cluster.url.host, cluster.url.port)
        #: "disconnected", "connecting" or "connected"
        self.state = "disconnected"

    @property
    def reactor(self):
        return self.cluster.reactor

    def start(self) -> None:
        if not self.running:
            self.running = True
            self._connect()

    def _connect(self) -> None:
        self._retryCall = None
        self.state = "connecting"
        url = self.cluster.url
        if getattr(url, "sentinels", None):
            self._connectViaSentinel(url)
            return
        self._connectTo(url.host, url.port)

    def _connectViaSentinel(self, url) -> None:
        """Ask the sentinels where the master is, then connect there; a
        failed look-up counts as a failed connection (back-off, retry)."""
        self.connector = None
        d = defer.Deferred.fromCoroutine(
            masterAddress(self.reactor, url.sentinels, url.master, timeout=self.connectTimeout)
        )

        def found(address):
            if not self.running:
                self._gone(Failure(error.ConnectionDone("stopped")))
                return
            if address != self.address:
                log.info(
                    "Redis {link} connection: sentinels name {host}:{port} as master {master}",
                    link=self.name,
                    host=address[0],
                    port=address[1],
                    master=url.master,
                )
            self._connectTo(*address)

        d.addCallbacks(found, self._gone)
        d.addErrback(lambda f: log.failure("connecting to Redis through Sentinel", f))

    def _connectTo(self, host: str, port: int) -> None:
        url = self.cluster.url
        self.address = (host, port)
        if url.tls:
            # The certificate is verified for the host name, against the
            # system trust store or the URL's CA file when it has one.
            ca = getattr(url, "ca", None)
            if ca:
                with open(ca, "rb") as f:
                    creator = optionsForClientTLS(url.host, trustRoot=Certificate.loadPEM(f.read()))
            else:
                creator = optionsForClientTLS(url.host)
            self.connector = self.reactor.connectSSL(host, port, self, creator, timeout=self.connectTimeout)
        else:
            self.connector = self.reactor.connectTCP(host, port, self, timeout=self.connectTimeout)

    def buildProtocol(self, addr):
        self.state = "connected"
        url = self.cluster.url
        p = self.protocolClass(
            charset="utf-8",
            replyTimeout=self.cluster.replyTimeout,
            password=url.password,
            dbid=url.db or None,
            convertNumbers=False,
        )
        p.factory = self
        p.link = self
        # txredisapi binds these to the global reactor.
        p.callLater = self.reactor.callLater
        return p

    def protocolReady(self, p) -> None:
        if not self.running:
            p.transport.loseConnection()
            return
        if getattr(self.cluster.url, "sentinels", None):
            # A sentinel may name the old master for a moment after a
            # failover (or a demoted master may still accept connections):
            # use the connection only if the server says it is the master.
            d = p.role() if hasattr(p, "role") else p.execute_command("ROLE")
            d.addCallbacks(lambda role: self._roleChecked(p, role), lambda f: self._roleFailed(p, f))
            return
        self._accept(p)

    def _roleChecked(self, p, role) -> None:
        kind = roleOf(role)
        if kind != "master":
            log.warn(
                "Redis {link} connection: {host}:{port} is a {role}, not the master; asking the sentinels again",
                link=self.name,
                host=self.address[0],
                port=self.address[1],
                role=kind,
            )
            p.transport.loseConnection()
            return
        self._accept(p)

    def _roleFailed(self, p, failure) -> None:
        log.warn("Redis {link} connection: ROLE failed ({why})", link=self.name, why=failure.getErrorMessage())
        if p.transport is not None:
            p.transport.loseConnection()

    def _accept(self, p) -> None:
        if not self.running:
            p.transport.loseConnection()
            return
        self.protocol = p
        self.delay = self.initialDelay
        if self._failures:
            log.info("Redis {link} connection to {host}:{port} is back", link=self.name, host=self.address[0], port=self.address[1])
        self._failures = 0
        self.onReady(p)

    # txredisapi calls these when AUTH or SELECT fails; we keep retrying.
    def stopTrying(self) -> None:
        pass

    def connectionError(self, why) -> None:
        log.error("Redis {link} connection: {why}; retrying", link=self.name, why=why)

    def clientConnectionFailed(self, connector, reason) -> None:
        self._gone(reason)

    def clientConnectionLost(self, connector, reason) -> None:
        self._gone(reason)

    def _gone(self, reason) -> None:
        self.protocol = None
        self.state = "disconnected"
        if not self.running:
            waiters, self._stopped = self._stopped, []
            for d in waiters:
                d.callback(None)
            return
        self._failures += 1
        if self._failures == 1 or self._failures % 20 == 0:
            log.warn(
                "Redis {link} connection to {host}:{port} lost or failed ({why}); reconnecting",
                link=self.name,
                host=self.address[0],
                port=self.address[1],
                why=reason.getErrorMessage(),
            )
        delay = random.uniform(0.8, 1.2) * self.delay
        # With Sentinel a lost connection usually means a failover, and the
        # next look-up is cheap: retry sooner.
        cap = self.sentinelMaxDelay if getattr(self.cluster.url, "sentinels", None) else self.maxDelay
        self.delay = min(self.delay * self.factor, cap)
        self._retryCall = self.reactor.callLater(delay, self._connect)

    def drop(self) -> None:
        """Abort the current connection (it will be made again)."""
        p = self.protocol
        if p is not None and p.transport is not None:
            p.transport.abortConnection()

    def stop(self) -> defer.Deferred:
        """Stop reconnecting and close the connection; fires once closed."""
        self.running = False
        if self._retryCall is not None:
            self._retryCall.cancel()
            self._retryCall = None
            return defer.succeed(None)
        connector = self.connector
        if connector is None or self.state == "disconnected":
            return defer.succeed(None)
        d = defer.Deferred()
        self._stopped.append(d)
        if self.state == "connecting":
            connector.stopConnecting()
        else:
            connector.disconnect()
        return d
