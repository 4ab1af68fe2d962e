"""
The one place where chatproto touches private state of Twisted, txredisapi
and adbapi.

Each use is a speed-up or a small fix over the public API.  L{check} (run
at start-up, and by first use) verifies that every attribute and module
relied on exists in the installed versions; whatever is missing makes that
feature fall back to the public path, and one log line says which:

 - C{writeThrough}: C{transport._tempDataLen}/C{dataBuffer}/C{offset}
   (send at once when Twisted holds nothing unsent) -> plain
   C{transport.write};
 - C{pendingBytes}: the same attributes -> an estimate from C{dataBuffer}
   and C{offset} only (it may count low, so a slow reader is never kicked
   wrongly), or 0;
 - C{haproxy}: C{twisted.protocols.haproxy._wrapper} (a wrapper that passes
   a half-close on) -> the stock C{proxyEndpoint};
 - C{adbapi}: C{Connection._connection}/C{_pool}, C{pool.connections}/
   C{threadID()} (tell a failed COMMIT apart, drop a dead connection) ->
   the stock C{adbapi.Connection} (then a transaction that must not be
   re-run is never retried after a connection error);
 - C{redisReady}: txredisapi's C{protocol._ready} -> C{connected} and not
   disconnecting;
 - C{packCommand}: txredisapi's C{_build_command} replaced by hiredis's C
   C{pack_command} (checked to give the same bytes; 0.8 against 6.9 µs a
   command) -> txredisapi's own encoding;
 - C{endpointArgs}: C{twisted.internet.endpoints._parse} -> a plain split
   on unescaped colons (L{chatproto.common.endpointstr.splitEndpoint}).

Twisted and txredisapi are pinned to the tested range in C{setup.cfg}.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.enterprise import adbapi
from twisted.internet import abstract, tcp
from twisted.logger import Logger

from chatproto.common.endpointstr import splitEndpoint

log = Logger()


@dataclass
class Internals:
    """Which private paths are usable (True) or fell back (False)."""

    writeThrough: bool = True
    haproxy: bool = True
    adbapi: bool = True
    redisReady: bool = True
    endpointArgs: bool = True
    packCommand: bool = True

    def fallbacks(self) -> list[str]:
        names = ("writeThrough", "haproxy", "adbapi", "redisReady", "endpointArgs", "packCommand")
        return [name for name in names if not getattr(self, name)]


def _hasAll(obj, names) -> bool:
    return all(hasattr(obj, name) for name in names)


def _checkWriteThrough() -> bool:
    fd = abstract.FileDescriptor(reactor=object())
    return _hasAll(fd, ("_tempDataLen", "dataBuffer", "offset")) and issubclass(tcp.Server, abstract.FileDescriptor)


def _checkHAProxy() -> bool:
    try:
        from twisted.protocols.haproxy import _wrapper
    except ImportError:
        return False
    return _hasAll(_wrapper, ("HAProxyProtocolWrapper", "HAProxyWrappingFactory"))


class _FakePool:
    reconnect = False

    def connect(self):
        return object()


def _checkAdbapi() -> bool:
    try:
        connection = adbapi.Connection(_FakePool())
    except Exception:
        return False
    # ConnectionPool sets both in __init__ (which would start a reactor
    # hook and load a DB-API module): look at what it assigns.
    assigned = adbapi.ConnectionPool.__init__.__code__.co_names
    return _hasAll(connection, ("_connection", "_pool")) and "connections" in assigned and "threadID" in assigned


def _checkRedisReady() -> bool:
    import txredisapi

    try:
        return hasattr(txredisapi.RedisProtocol(), "_ready")
    except Exception:
        return False


def _checkPackCommand() -> bool:
    import hiredis
    import txredisapi

    sample = ("EVALSHA", "f00", 2, "k\u00e9y", b"v", -5)
    build = getattr(txredisapi.RedisProtocol(), "_build_command", None)
    return callable(build) and hiredis.pack_command(sample) == build(*sample)


def _checkEndpointArgs() -> bool:
    from twisted.internet import endpoints

    return callable(getattr(endpoints, "_parse", None))


_CHECKS = (
    ("writeThrough", _checkWriteThrough),
    ("haproxy", _checkHAProxy),
    ("adbapi", _checkAdbapi),
    ("redisReady", _checkRedisReady),
    ("endpointArgs", _checkEndpointArgs),
    ("packCommand", _checkPackCommand),
)

_internals: Internals | None = None


def check(checks=_CHECKS) -> Internals:
    """Verify the private attributes relied on; fall back where one is
    missing and log one line saying so.  Cached: runs once per process."""
    global _internals
    if _internals is not None and checks is _CHECKS:
        return _internals
    result = Internals()
    for name, probe in checks:
        try:
            ok = bool(probe())
        except Exception:
            ok = False
        setattr(result, name, ok)
    fallbacks = result.fallbacks()
    if fallbacks:
        log.warn(
            "Twisted/txredisapi internals not as tested; public fallback for: {fallbacks}",
            fallbacks=", ".join(fallbacks),
        )
    if checks is _CHECKS:
        _internals = result
    return result


def internals() -> Internals:
    return _internals if _internals is not None else check()


def reset(value: Internals | None = None) -> None:
    """Set (or forget) the cached result: for tests."""
    global _internals
    _internals = value


# --- writing to TCP transports -----------------------------------------------


def rawSocket(transport):
    """The socket to write through for a plain TCP transport, else None
    (TLS, wrappers such as C{haproxy:}, test transports, or fallback)."""
    if type(transport) is tcp.Server and (_internals or check()).writeThrough:
        return transport.socket
    return None


def writeThrough(transport, sock, data: bytes) -> None:
    """
    Send C{data} on C{sock} now if C{transport} has nothing buffered; hand
    what the kernel did not take to C{transport.write}.  (C{sock} is None
    unless L{rawSocket} found the private path usable.)
    """
    if (
        sock is not None
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
    ):
        try:
            sent = sock.send(data)
        except OSError:
            # Would block, or the connection broke: Twisted's write path
            # buffers it or reports the loss as usual.
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def pendingBytes(transport) -> int:
    """Bytes Twisted holds unsent for C{transport} (0 if it cannot tell)."""
    if (_internals or check()).writeThrough:
        try:
            return transport._tempDataLen + len(transport.dataBuffer) - transport.offset
        except AttributeError:
            return 0
    try:
        return len(transport.dataBuffer) - transport.offset
    except (AttributeError, TypeError):
        return 0


# --- the PROXY protocol --------------------------------------------------------


def haproxyFactory(factory, halfCloseable):
    """
    A factory reading a PROXY header, then handing the connection to
    C{factory}.  C{halfCloseable(wrapperBase)} builds the half-close-aware
    wrapper class from Twisted's private wrapper; None when that module is
    not usable (then use L{haproxyEndpoint}).
    """
    if not internals().haproxy:
        return None
    from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory

    class Factory(HAProxyWrappingFactory):
        protocol = halfCloseable(HAProxyProtocolWrapper)

    return Factory(factory)


def haproxyEndpoint(wrapped):
    """The stock, public PROXY endpoint (does not pass a half-close on)."""
    from twisted.protocols.haproxy import proxyEndpoint

    return proxyEndpoint(wrapped)


# --- adbapi ----------------------------------------------------------------------


class CommitFailed(Exception):
    """The connection failed while committing: the outcome is unknown."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


def pooledConnectionClass(connectionErrors):
    """
    adbapi's connection wrapper, minus its reconnect logic: a commit that
    fails with one of C{connectionErrors} is reported as L{CommitFailed}; a
    rollback that fails (the connection is dead) drops the connection so
    that this thread's next transaction connects anew, without logging an
    error.  None when the private attributes are missing: the caller keeps
    the stock wrapper (and cannot tell a failed commit apart).
    """
    if not internals().adbapi:
        return None

    class PooledConnection(adbapi.Connection):
        def commit(self) -> None:
            try:
                self._connection.commit()
            except connectionErrors as e:
                raise CommitFailed(e) from e

        def rollback(self) -> None:
            try:
                self._connection.rollback()
            except Exception:
                self.drop()

        def drop(self) -> None:
            connection, self._connection = self._connection, None
            pool = self._pool
            if connection is not None and pool.connections.get(pool.threadID()) is connection:
                del pool.connections[pool.threadID()]
            if connection is not None:
                try:
                    connection.close()
                except Exception:
                    pass

    return PooledConnection


def dropConnection(connection) -> None:
    """Forget a pooled connection whose cursor could not be made."""
    drop = getattr(connection, "drop", None)
    if drop is not None:
        drop()


# --- txredisapi ------------------------------------------------------------------


def redisReady(protocol) -> bool:
    """Whether a txredisapi protocol finished AUTH and SELECT."""
    if internals().redisReady:
        return bool(protocol._ready)
    transport = protocol.transport
    return bool(protocol.connected) and transport is not None and not transport.disconnecting


def packedCommands(protocolClass):
    """C{protocolClass} (a txredisapi protocol) encoding its commands with
    hiredis (see C{packCommand}), or unchanged."""
    if not internals().packCommand:
        return protocolClass
    from hiredis import pack_command

    class Packed(protocolClass):
        def _build_command(self, *args, **kwargs):
            return pack_command(args)

    return Packed


# --- endpoint strings ------------------------------------------------------------


def endpointArgs(description: str) -> tuple[list[str], dict[str, str]]:
    """The positional and keyword arguments of an endpoint string after its
    type (C{tcp:6000:interface=::1} -> C{(["6000"], {"interface": "::1"})})."""
    if internals().endpointArgs:
        from twisted.internet.endpoints import _parse

        args, kwargs = _parse(description)
        return list(args[1:]), dict(kwargs)
    return splitEndpoint(description)
