"""
C{twistd chat}: options and the service tree.
"""

from __future__ import annotations

import socket

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from chatproto.config import IniOptions, number, parseDatabaseURL, parseRedisURL

log = Logger()

RELOGIN_MODES = ("kick", "reject")


class Options(IniOptions):
    synopsis = "[options]"
    longdesc = (
        "Run a chat server.  Every option may also be set in the [chat] "
        "section of an ini file given with --config; the command line wins."
    )
    section = "chat"
    repeatable = ("port",)
    fallbacks = {
        "port": ["tcp:6000"],
        "db": "sqlite:chat.sqlite3",
        "on-relogin": "kick",
        "idle-timeout": "300",
        "max-line": "65536",
        "weight": "1",
        "redis-prefix": "chat:",
        "scrypt-n": "16384",
    }
    optParameters = [
        ["config", "c", None, "ini file with a [chat] section"],
        ["name", None, None, "this server's name in the cluster (default: HOSTNAME:PORT)"],
        ["db", None, None, "sqlite:PATH (default sqlite:chat.sqlite3) or mysql://user:pass@host:port/db"],
        ["redis", None, None, "redis://host:port/db: cluster presence and relay (default: in-process)"],
        ["redis-prefix", None, None, "prefix of every Redis key and channel (default chat:)"],
        ["advertise", None, None, "HOST:PORT clients reach this server at, for the registry"],
        ["weight", None, None, "weight in the registry, for the balancer (default 1)"],
        ["on-relogin", None, None, "kick (default): a new login closes the old session; reject: refuse it"],
        ["idle-timeout", None, None, "seconds of silence before a connection is closed (default 300; 0: never)"],
        ["max-line", None, None, "longest line accepted, in bytes (default 65536)"],
        ["scrypt-n", None, None, "scrypt cost for new passwords (default 16384)"],
    ]

    def opt_port(self, endpoint: str) -> None:
        """Listen on this endpoint (repeatable; default tcp:6000)."""
        self["port"].append(endpoint)

    opt_p = opt_port

    def checkValues(self) -> None:
        if self["on-relogin"] not in RELOGIN_MODES:
            raise usage.UsageError(f"--on-relogin must be kick or reject, not {self['on-relogin']!r}")
        number(self, "idle-timeout", float, 0)
        number(self, "max-line", int, 64)
        number(self, "weight", int, 0)
        n = number(self, "scrypt-n", int, 2)
        if n & (n - 1):
            raise usage.UsageError("--scrypt-n must be a power of two")
        self["db-url"] = parseDatabaseURL(self["db"])
        self["redis-url"] = parseRedisURL(self["redis"]) if self["redis"] else None
        host, port = advertisedAddress(self["port"][0], self["advertise"])
        if port == 0 and self["redis-url"] is not None:
            raise usage.UsageError("listening on port 0 in a cluster needs --advertise HOST:PORT for the registry")
        self["advertise-host"], self["advertise-port"] = host, port
        if not self["name"]:
            self["name"] = f"{socket.gethostname()}:{port}"


def advertisedAddress(endpoint: str, advertise: str | None) -> tuple[str, int]:
    """
    The C{(host, port)} to publish for this server: C{--advertise}, else
    the port and interface of the first listening endpoint.
    """
    if advertise:
        host, sep, port = advertise.rpartition(":")
        if not sep or not port.isdigit():
            raise usage.UsageError(f"--advertise must be HOST:PORT, not {advertise!r}")
        return host.strip("[]"), int(port)
    args, kwargs = _endpointArgs(endpoint)
    port = kwargs.get("port", args[0] if args else "0")
    host = kwargs.get("interface", "") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    try:
        return host, int(port)
    except ValueError:
        raise usage.UsageError(f"cannot tell the port of {endpoint!r}; give --advertise HOST:PORT") from None


def _endpointArgs(endpoint: str) -> tuple[list[str], dict[str, str]]:
    from twisted.internet.endpoints import _parse

    parts = endpoint.split(":", 1)
    if parts[0] == "haproxy":
        endpoint = parts[1]
    args, kwargs = _parse(endpoint)
    return list(args[1:]), kwargs


def buildStore(dbURL, reactor):
    if dbURL.kind == "sqlite":
        from chatproto.sqlstore import SQLStore, sqlitePool

        return SQLStore(sqlitePool(dbURL.path, reactor))
    from chatproto.mysqlstore import MySQLStore

    return MySQLStore.fromURL(dbURL, reactor)


def buildPresence(options, reactor):
    """The (presence, relay) pair: in-process, or Redis with --redis."""
    name = options["name"]
    host, port, weight = options["advertise-host"], options["advertise-port"], options["weight"]
    if options["redis-url"] is None:
        from chatproto.embedded import LocalPresence, LocalRelay

        return LocalPresence(name, host, port, weight), LocalRelay()
    from chatproto.redispresence import RedisCluster

    cluster = RedisCluster(
        options["redis-url"],
        name,
        host=host,
        port=port,
        weight=weight,
        prefix=options["redis-prefix"],
        reactor=reactor,
    )
    return cluster.presence, cluster.relay


def makeService(options, reactor=None) -> service.MultiService:
    if reactor is None:
        from twisted.internet import reactor
    from chatproto.passwords import PasswordHasher
    from chatproto.protocol import ChatFactory
    from chatproto.service import ChatService
    from twisted.application.internet import StreamServerEndpointService

    from chatproto.endpoints import serverEndpoint
    from chatproto.limits import raiseOpenFilesLimit

    raiseOpenFilesLimit()
    store = buildStore(options["db-url"], reactor)
    presence, relay = buildPresence(options, reactor)
    hasher = PasswordHasher(reactor, n=options["scrypt-n"])
    chat = ChatService(store, presence, relay, hasher, reactor, onRelogin=options["on-relogin"])

    def startFailed(failure):
        log.critical("cannot start: {error}", error=failure.getErrorMessage())
        if reactor.running:
            reactor.stop()

    chat.onStartFailure = startFailed
    top = service.MultiService()
    # Added first, stopped last: listeners close before sessions are ended.
    chat.setServiceParent(top)
    idle = options["idle-timeout"] or None
    factory = ChatFactory(chat, reactor, maxLength=options["max-line"], idleTimeout=idle)
    for endpoint in options["port"]:
        listener = StreamServerEndpointService(serverEndpoint(reactor, endpoint), factory)
        listener._raiseSynchronously = True  # as strports.service: a port in use stops twistd
        listener.setServiceParent(top)
    return top
