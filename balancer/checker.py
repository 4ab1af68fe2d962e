"""
Active health checks: the I/O half of L{balancer.health.ActiveHealth}.

Every C{interval} a L{HealthChecker} connects to its backend (with the
PROXY header first if the backends expect one), for a C{tls:} backend
completes the TLS handshake (certificate and host name verified),
optionally sends C{send} and waits for C{expect} in the reply, all within
C{timeout}.  The result goes to the peer's rise/fall counter, with the
reason of a failure (for TLS: host name mismatch, untrusted issuer,
expired, ... from the TLS error).  Checks never overlap: the next one is
scheduled when the previous one has finished.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from balancer.proxyheader import proxyHeader
from balancer.selection import Peer

MAX_REPLY = 64 * 1024


class CheckFailed(Exception):
    pass


def _certificateProblem(transport: Any, now: float) -> str | None:
    """
    What is wrong with the certificate the peer sent (read after a failed
    verification): expired, not yet valid, or else an issuer not trusted.
    """
    try:
        handle = transport.getHandle()
        chain = handle.get_peer_cert_chain() or []
        cert = chain[0] if chain else handle.get_peer_certificate()
    except Exception:
        cert = None
    if cert is None:
        return None
    import datetime

    c = cert.to_cryptography()
    when = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    if c.not_valid_after_utc < when:
        return f"certificate expired ({c.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC)"
    if c.not_valid_before_utc > when:
        return f"certificate not yet valid (from {c.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC)"
    issuer = c.issuer.rfc4514_string()
    if c.issuer == c.subject:
        return f"untrusted issuer (self-signed certificate {issuer})"
    return f"untrusted issuer ({issuer})"


def tlsFailureReason(
    reason: Failure, transport: Any = None, now: float | None = None
) -> str | None:
    """
    Why a TLS connection failed, in words, or C{None} if C{reason} is not
    a TLS failure.  With the C{transport}, a failed certificate
    verification is explained from the certificate the peer sent.
    """
    value = reason.value
    if type(value).__name__ == "VerificationError":
        # service_identity's host name check (Twisted's ClientTLSOptions)
        names = [
            getattr(getattr(e, "mismatched_id", None), "hostname", None)
            for e in getattr(value, "errors", ())
        ]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in names if n]
        return "TLS: host name mismatch" + (
            f" (the certificate is not for {', '.join(names)})" if names else ""
        )
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover - twisted[tls] brings it
        return None
    if not isinstance(value, SSL.Error):
        return None
    words = []
    for item in value.args[0] if value.args and isinstance(value.args[0], list) else ():
        if isinstance(item, tuple) and item:
            words.append(str(item[-1]))
    text = "; ".join(w for w in words if w) or "handshake failed"
    if "certificate verify failed" in text and transport is not None:
        import time

        problem = _certificateProblem(transport, time.time() if now is None else now)
        if problem:
            return f"TLS: {problem}"
    return f"TLS: {text}"


@implementer(IHandshakeListener)
class _CheckProtocol(protocol.Protocol):
    def __init__(self, send: bytes | None, expect: bytes | None, proxy: str | None):
        self.send = send
        self.expect = expect
        self.proxy = proxy
        self.buf = b""
        self.tls = False
        self.result: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        out = b""
        if self.proxy:
            t = self.transport
            out += proxyHeader(self.proxy, t.getHost(), t.getPeer())
        if self.send:
            out += self.send
        if out:
            self.transport.write(out)
        self.tls = ISSLTransport.providedBy(self.transport)
        if self.expect is None and not self.tls:
            self._finish(None)

    def handshakeCompleted(self) -> None:
        # the certificate and host name are verified by now
        if self.expect is None:
            self._finish(None)

    def dataReceived(self, data: bytes) -> None:
        if self.result.called:
            return
        self.buf += data
        if self.expect in self.buf:
            self._finish(None)
        elif len(self.buf) > MAX_REPLY:
            self._finish(CheckFailed("reply too long without expected string"))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.result.called:
            return
        why = tlsFailureReason(reason, self.transport) if self.tls else None
        if why is None:
            why = f"closed before expected reply (got {self.buf[:40]!r})"
        self.result.errback(CheckFailed(why))

    def _finish(self, err: Exception | None) -> None:
        self.transport.loseConnection()
        if err is None:
            self.result.callback(None)
        else:
            self.result.errback(err)


class HealthChecker:
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        peer: Peer,
        interval: float,
        timeout: float,
        send: bytes | None = None,
        expect: bytes | None = None,
        proxyProtocol: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.peer = peer
        self.interval = interval
        self.timeout = timeout
        self.send = send
        self.expect = expect
        self.proxyProtocol = proxyProtocol
        self._loop: LoopingCall | None = None
        self._inflight: defer.Deferred[Any] | None = None
        self.checks = 0

    def start(self) -> None:
        loop = LoopingCall(self.check)
        loop.clock = self.reactor
        self._loop = loop
        loop.start(self.interval, now=True).addErrback(
            lambda f: self.log.failure("health checker for {peer} died", f, peer=self.peer.key)
        )

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.cancel()

    def _connect(self, factory: protocol.Factory) -> defer.Deferred[Any]:
        target = self.peer.extra.get("tcp")
        if target is not None:
            from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint

            host, port = target
            cls = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
            endpoint = cls(self.reactor, host, port, timeout=self.timeout)
        else:
            endpoint = self.peer.extra["endpoint"]
        return endpoint.connect(factory)

    def check(self) -> defer.Deferred[None]:
        """
        Run one check and record its result; the returned Deferred never
        fails.
        """
        self.checks += 1
        protos: list[_CheckProtocol] = []

        def build() -> _CheckProtocol:
            p = _CheckProtocol(self.send, self.expect, self.proxyProtocol)
            protos.append(p)
            return p

        factory = protocol.Factory.forProtocol(build)
        factory.noisy = False
        connecting = self._connect(factory)
        done: defer.Deferred[None] = defer.Deferred(
            lambda d: (connecting.cancel(), [p.transport.abortConnection()
                                             for p in protos if p.transport])
        )
        connecting.addCallback(lambda p: p.result)
        connecting.addTimeout(self.timeout, self.reactor)
        connecting.addCallbacks(lambda _: self._record(True, ""), self._failed)
        connecting.addErrback(lambda f: self.log.failure("recording check", f))

        def cleanup(result: Any) -> Any:
            for p in protos:
                if p.transport is not None and p.transport.connected:
                    p.transport.abortConnection()
            self._inflight = None
            if not done.called:
                done.callback(None)
            return None

        connecting.addBoth(cleanup)
        self._inflight = done
        return done

    def _failed(self, reason: Failure) -> None:
        if reason.check(defer.CancelledError) and self._loop is None:
            return  # stopped
        if reason.check(defer.TimeoutError, defer.CancelledError):
            why = "timeout"
        else:
            why = reason.getErrorMessage()
        self._record(False, why)

    def _record(self, ok: bool, why: str) -> None:
        if self._loop is None:
            return  # stopped meanwhile
        peer = self.peer
        wasUp = peer.active.up
        changed = peer.active.record(ok, self.reactor.seconds(), why)
        if changed:
            if peer.active.up:
                peer.passive.reset()
                self.log.info("backend {peer} is up (health check)", peer=peer.key)
            else:
                self.log.warn(
                    "backend {peer} is down (health check: {why})", peer=peer.key, why=why
                )
        elif not ok and wasUp:
            self.log.debug("backend {peer} check failed: {why}", peer=peer.key, why=why)
