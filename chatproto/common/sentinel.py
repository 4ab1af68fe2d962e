"""
Finding the current Redis master through Redis Sentinel.

L{masterAddress} asks the sentinels of a C{redis+sentinel://} URL, one after
the other, C{SENTINEL get-master-addr-by-name NAME} and fires with the first
answer.  Callers resolve the master before every connection attempt (a lost
connection is the usual sign of a failover: Sentinel closes the clients of
a demoted master) and check, once connected, that the server really is a
master (C{ROLE}), since a sentinel may not have seen the failover yet.

Nothing here is specific to a chat server: the balancer's discovery can use
it too.  The sentinels are asked without AUTH (the URL's password is the
master's).
"""

from __future__ import annotations

from twisted.internet import defer, protocol
from twisted.protocols.basic import LineReceiver


class MasterNotFound(Exception):
    """No sentinel named a master (all unreachable, or the name unknown)."""


def roleOf(reply) -> str:
    """The first field of a C{ROLE} reply (C{master}, C{slave}, C{sentinel}),
    as text."""
    kind = reply[0] if isinstance(reply, (list, tuple)) and reply else reply
    if isinstance(kind, bytes):
        kind = kind.decode("ascii", "replace")
    return str(kind)


def encodeCommand(*args) -> bytes:
    """A RESP command."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _MasterQuery(LineReceiver):
    """Sends one C{SENTINEL get-master-addr-by-name} and reads the reply: an
    array of two bulk strings, or a nil array."""

    delimiter = b"\r\n"
    MAX_LENGTH = 4096

    def __init__(self, master: str, result: defer.Deferred) -> None:
        self.master = master
        self.result = result
        self._expect = None  # items left of the array
        self._bulk = False
        self._items: list[str] = []

    def connectionMade(self) -> None:
        self.transport.write(encodeCommand("SENTINEL", "get-master-addr-by-name", self.master))

    def lineReceived(self, line: bytes) -> None:
        if self._bulk:
            self._bulk = False
            self._items.append(line.decode("utf-8", "replace"))
            if len(self._items) == self._expect:
                self._done(tuple(self._items))
            return
        kind, rest = line[:1], line[1:]
        try:
            if kind == b"*" and self._expect is None:
                n = int(rest)
                if n != 2:
                    return self._done(MasterNotFound(f"no master named {self.master!r}"))
                self._expect = 2
            elif kind == b"$" and self._expect is not None:
                if int(rest) < 0:
                    return self._done(MasterNotFound(f"no master named {self.master!r}"))
                self._bulk = True
            elif kind == b"-":
                return self._done(MasterNotFound(rest.decode("utf-8", "replace")))
            else:
                return self._done(MasterNotFound(f"unexpected reply {line[:80]!r}"))
        except ValueError:
            return self._done(MasterNotFound(f"unexpected reply {line[:80]!r}"))
        return None

    def _done(self, value) -> None:
        if not self.result.called:
            if isinstance(value, Exception):
                self.result.errback(value)
            else:
                host, port = value
                try:
                    self.result.callback((host, int(port)))
                except ValueError:
                    self.result.errback(MasterNotFound(f"bad port {port!r}"))
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.result.called:
            self.result.errback(MasterNotFound(f"sentinel closed the connection: {reason.getErrorMessage()}"))


class _QueryFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, master: str, result: defer.Deferred) -> None:
        self.master = master
        self.result = result

    def buildProtocol(self, addr):
        return _MasterQuery(self.master, self.result)

    def clientConnectionFailed(self, connector, reason) -> None:
        if not self.result.called:
            self.result.errback(MasterNotFound(reason.getErrorMessage()))


def askSentinel(reactor, host: str, port: int, master: str, timeout: float = 2.0) -> defer.Deferred:
    """The master's C{(host, port)} according to one sentinel."""
    result = defer.Deferred()
    connector = reactor.connectTCP(host, port, _QueryFactory(master, result), timeout=timeout)

    def expire():
        if not result.called:
            connector.disconnect()
            if not result.called:
                result.errback(MasterNotFound(f"sentinel {host}:{port} did not answer within {timeout:g} s"))

    call = reactor.callLater(timeout, expire)

    def cancelTimer(value):
        if call.active():
            call.cancel()
        return value

    return result.addBoth(cancelTimer)


async def masterAddress(reactor, sentinels, master: str, timeout: float = 2.0) -> tuple[str, int]:
    """
    Ask each sentinel in turn for the address of C{master}; the first
    answer wins.

    @raise MasterNotFound: naming every sentinel's failure.
    """
    errors = []
    for host, port in sentinels:
        try:
            return await askSentinel(reactor, host, port, master, timeout)
        except MasterNotFound as e:
            errors.append(f"{host}:{port}: {e}")
    raise MasterNotFound("; ".join(errors) or "no sentinels")
