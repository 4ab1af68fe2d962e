"""
C{twistd chat}: options and the service tree.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from twisted.python.failure import Failure

from chatproto.config import (
    IniOptions,
    number,
    parseDatabaseURL,
    parseRedisURL,
    redactedDatabaseURL,
    redactedRedisURL,
)
from chatproto.listening import CheckedEndpoint, describeFailure

log = Logger()

RELOGIN_MODES = ("kick", "reject")
FRIEND_REQUEST_MODES = ("auto", "approve")


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
        "friend-requests": "auto",
        "idle-timeout": "300",
        "max-line": "65536",
        "weight": "1",
        "redis-prefix": "chat:",
        "scrypt-n": "16384",
        "login-timeout": "30",
        "output-high-water": str(256 * 1024),
        "output-cap": str(4 * 1024 * 1024),
        "mailbox-max-messages": "1000",
        "mailbox-max-bytes": str(1024 * 1024),
        "register-burst": "100",
        "register-rate": "1",
        "kdf-queue": "64",
        "token-ttl": str(7 * 86400),
        "backlog": "1024",
        "pipeline-depth": "64",
        "gc-intervals": "1,10,30",
    }
    optParameters = [
        ["config", "c", None, "ini file with a [chat] section"],
        ["name", None, None, "this server's name in the cluster (default: HOSTNAME:PORT)"],
        ["db", None, None, "sqlite:PATH (default sqlite:chat.sqlite3) or mysql://user:pass@host:port/db"],
        ["redis", None, None, "redis://[[user]:password@]host:port/db, rediss://..., or redis+sentinel://h1:26379,h2:26379/MASTER: cluster presence and relay (default: in-process)"],
        ["redis-prefix", None, None, "prefix of every Redis key and channel (default chat:)"],
        ["advertise", None, None, "HOST:PORT clients reach this server at, for the registry"],
        ["weight", None, None, "weight in the registry, for the balancer (default 1)"],
        ["on-relogin", None, None, "kick (default): a new login closes the old session; reject: refuse it"],
        [
            "friend-requests",
            None,
            None,
            "auto (default): addfriend makes friends at once; approve: the other user must accept",
        ],
        ["idle-timeout", None, None, "seconds of silence before a connection is closed (default 300; 0: never)"],
        ["max-line", None, None, "longest line accepted, in bytes (default 65536)"],
        ["scrypt-n", None, None, "scrypt cost for new passwords (default 16384)"],
        ["login-timeout", None, None, "seconds a connection may stay without logging in (default 30; 0: never)"],
        ["output-high-water", None, None, "unsent bytes past which a client's requests are not read (default 262144)"],
        ["output-cap", None, None, "unsent bytes past which a client is logged out (default 4194304)"],
        ["mailbox-max-messages", None, None, "offline messages kept per recipient (default 1000)"],
        ["mailbox-max-bytes", None, None, "bytes of offline messages kept per recipient (default 1048576)"],
        ["register-burst", None, None, "registrations one address may make at once (default 100)"],
        ["register-rate", None, None, "registrations per second per address after the burst (default 1)"],
        ["kdf-threads", None, None, "threads hashing passwords (default: the number of cores)"],
        ["kdf-queue", None, None, "password checks that may wait for a thread; more are refused (default 64)"],
        ["token-ttl", None, None, "seconds a resume token lives unused; each use renews it (default 604800: 7 days)"],
        ["backlog", None, None, "listen backlog of tcp:/ssl: ports that name none (default 1024)"],
        [
            "pipeline-depth",
            None,
            None,
            "chats of one connection sent on before the earlier ones are answered, at most (default 64; 1: one at a time)",
        ],
        [
            "gc-intervals",
            None,
            None,
            "minimum seconds between garbage collections of generations 0,1,2 (default 1,10,30; off: Python's automatic collection)",
        ],
    ]

    optFlags = [
        ["no-lean-dispatch", None, "use the reactor's stock event loop, not the lean epoll dispatch (balancer.fastpoll)"],
    ]

    def opt_port(self, endpoint: str) -> None:
        """Listen on this endpoint (repeatable; default tcp:6000; a bare port number means tcp:PORT)."""
        self["port"].append(endpoint)

    opt_p = opt_port

    def checkValues(self) -> None:
        if self["on-relogin"] not in RELOGIN_MODES:
            raise usage.UsageError(f"--on-relogin must be kick or reject, not {self['on-relogin']!r}")
        if self["friend-requests"] not in FRIEND_REQUEST_MODES:
            raise usage.UsageError(f"--friend-requests must be auto or approve, not {self['friend-requests']!r}")
        self["port"] = [bareToTCP(p) for p in self["port"]]
        day = 86400
        number(self, "idle-timeout", float, 0, 365 * day)
        number(self, "login-timeout", float, 0, day)
        number(self, "max-line", int, 64, 16 * 1024 * 1024)
        number(self, "weight", int, 0, 1_000_000)
        # scrypt needs 128 * n * r bytes; 2**16 (64 MiB) is within its maxmem.
        n = number(self, "scrypt-n", int, 2, 2**16)
        if n & (n - 1):
            raise usage.UsageError("--scrypt-n must be a power of two")
        number(self, "output-high-water", int, 1024, 2**30)
        number(self, "output-cap", int, 1024, 2**30)
        number(self, "pipeline-depth", int, 1, 10_000)
        if self["output-cap"] < self["output-high-water"]:
            raise usage.UsageError("--output-cap must be at least --output-high-water")
        number(self, "mailbox-max-messages", int, 1, 10_000_000)
        number(self, "mailbox-max-bytes", int, 1024, 2**31)
        number(self, "register-burst", int, 1, 1_000_000)
        number(self, "register-rate", float, 0.001, 1_000_000)
        from chatproto.kdfpool import defaultThreads

        if self["kdf-threads"] is None:
            self["kdf-threads"] = str(defaultThreads())
        number(self, "kdf-threads", int, 1, 256)
        number(self, "kdf-queue", int, 0, 100_000)
        number(self, "token-ttl", float, 60, 365 * day)
        number(self, "backlog", int, 1, 65535)
        from chatproto.gcschedule import parseIntervals

        try:
            self["gc-intervals"] = parseIntervals(self["gc-intervals"])
        except ValueError as e:
            raise usage.UsageError(f"--gc-intervals: {e}") from None
        self["db-url"] = parseDatabaseURL(self["db"])
        checkDatabasePath(self["db-url"])
        self["redis-url"] = parseRedisURL(self["redis"]) if self["redis"] else None
        host, port = advertisedAddress(self["port"][0], self["advertise"])
        if port == 0 and self["redis-url"] is not None:
            raise usage.UsageError("listening on port 0 in a cluster needs --advertise HOST:PORT for the registry")
        self["advertise-host"], self["advertise-port"] = host, port
        if not self["name"]:
            self["name"] = f"{socket.gethostname()}:{port}"


def bareToTCP(endpoint: str) -> str:
    """C{7410} means C{tcp:7410} (and C{haproxy:7410}, C{haproxy:tcp:7410})."""
    prefix = ""
    if endpoint.startswith("haproxy:"):
        prefix, endpoint = "haproxy:", endpoint[len("haproxy:") :]
    if endpoint.strip().isdigit():
        endpoint = "tcp:" + endpoint.strip()
    return prefix + endpoint


def checkDatabasePath(dbURL) -> None:
    """An SQLite file must be creatable: its directory must exist."""
    if dbURL.kind != "sqlite" or dbURL.path == ":memory:" or dbURL.path.startswith("file:"):
        return
    directory = os.path.dirname(os.path.abspath(dbURL.path))
    if not os.path.isdir(directory):
        raise usage.UsageError(f"--db sqlite:{dbURL.path}: no such directory {directory}")


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
    try:
        args, kwargs = _endpointArgs(endpoint)
    except ValueError as e:
        raise usage.UsageError(f"bad --port {endpoint!r}: {e}") from None
    port = kwargs.get("port", args[0] if args else "0")
    host = kwargs.get("interface", "") or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    try:
        return host, int(port)
    except ValueError:
        raise usage.UsageError(f"cannot tell the port of {endpoint!r}; give --advertise HOST:PORT") from None


def _endpointArgs(endpoint: str) -> tuple[list[str], dict[str, str]]:
    from chatproto._twisted import endpointArgs

    parts = endpoint.split(":", 1)
    if parts[0] == "haproxy":
        endpoint = parts[1]
    return endpointArgs(endpoint)


def buildStore(dbURL, reactor):
    if dbURL.kind == "sqlite":
        from chatproto.sqlitereads import ReactorThreadReads
        from chatproto.sqlstore import SQLStore, sqlitePool

        reads = None if dbURL.path == ":memory:" else ReactorThreadReads(dbURL.path)
        return SQLStore(sqlitePool(dbURL.path, reactor), reads=reads)
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


def buildTokens(options, presence, reactor):
    """The resume-token store: in memory on a single node (a restart
    forgets the tokens), in Redis with --redis (any server accepts them)."""
    ttl = options["token-ttl"]
    if options["redis-url"] is None:
        from chatproto.tokens import MemoryTokenStore

        return MemoryTokenStore(reactor, ttl=ttl)
    from chatproto.tokenstore_redis import RedisTokenStore

    return RedisTokenStore(presence.cluster.commandConnection, reactor, prefix=options["redis-prefix"], ttl=ttl)


def _exitNonZero() -> None:
    # Runs at interpreter exit, after twistd has stopped and removed its pid
    # file: only the status changes.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


class StartFailure:
    """
    What happens when the server cannot start once twistd runs (storage or
    Redis unreachable, a port lost later): one critical log line, the
    reactor stops, and with C{exitStatus} the process exits with status 1.
    """

    def __init__(self, reactor, exitStatus: bool) -> None:
        self._reactor = reactor
        self._exitStatus = exitStatus
        self.failed = False

    def __call__(self, reason) -> None:
        line = reason if isinstance(reason, str) else describeFailure(reason)
        log.critical("cannot start: {error}", error=line)
        if self.failed:
            return
        self.failed = True
        if self._exitStatus:
            atexit.register(_exitNonZero)
        if self._reactor.running:
            self._reactor.stop()
        else:
            self._reactor.callWhenRunning(self._reactor.stop)


def wireLimits(options, reactor, store, chat) -> None:
    """The limits of issue 9 that live in the store and the service:
    mailbox caps, registrations per address, what start-up waits for."""
    from chatproto.ratelimit import TokenBucketLimiter

    store.mailboxMaxMessages = options["mailbox-max-messages"]
    store.mailboxMaxBytes = options["mailbox-max-bytes"]
    chat.registerLimiter = TokenBucketLimiter(reactor, burst=options["register-burst"], rate=options["register-rate"])
    chat.waitingFor["store"] = f"the database at {redactedDatabaseURL(options['db-url'])}"
    if options["redis-url"] is not None:
        redis = f"Redis at {redactedRedisURL(options['redis-url'])}"
        chat.waitingFor["presence"] = chat.waitingFor["relay"] = redis


class LeanDispatch(service.Service):
    """
    While running, the reactor dispatches ready descriptors through the
    balancer's lean epoll loop (L{balancer.fastpoll}: the same loop minus
    C{callWithLogger}'s context per event, errors contained the same way),
    about an eighth of the server's time per chat message; any other
    reactor keeps its own loop.
    """

    installed = False

    def __init__(self, reactor) -> None:
        self.reactor = reactor

    def startService(self) -> None:
        from balancer import fastpoll

        super().startService()
        self.installed = fastpoll.install(self.reactor)

    def stopService(self):
        from balancer import fastpoll

        if self.installed:
            fastpoll.uninstall(self.reactor)
            self.installed = False
        return super().stopService()


def makeService(options, reactor=None) -> service.MultiService:
    """
    The service tree.  Called by twistd (no C{reactor}): a start-up failure
    also makes the process exit non-zero.  A C{--port} that cannot be used
    raises L{SystemExit} with one line.
    """
    exitStatus = reactor is None
    if reactor is None:
        from twisted.internet import reactor
    from chatproto.passwords import PasswordHasher
    from chatproto.protocol import ChatFactory
    from chatproto.service import ChatService
    from twisted.application.internet import StreamServerEndpointService

    from chatproto.endpoints import serverEndpoint
    from chatproto.kdfpool import KDFPool
    from chatproto.common.rlimits import raiseOpenFilesLimit

    startFailed = StartFailure(reactor, exitStatus)
    if exitStatus:
        # twistd: replace the reactor's SIGTERM/SIGINT handlers, which log
        # from inside the handler (a deadlock against the log file's lock).
        from chatproto.common.stopsignals import installStopHandlers

        reactor.callWhenRunning(installStopHandlers, reactor)
    endpoints = []
    for description in options["port"]:
        try:
            endpoint = serverEndpoint(reactor, description, options["backlog"])
        except Exception as e:  # any parser's error: one line, no traceback
            raise SystemExit(f"cannot use --port {description}: {describeFailure(Failure(e))}") from None
        endpoints.append(CheckedEndpoint(endpoint, description, startFailed))

    raiseOpenFilesLimit()
    store = buildStore(options["db-url"], reactor)
    presence, relay = buildPresence(options, reactor)
    kdf = KDFPool(reactor, threads=options["kdf-threads"], queue=options["kdf-queue"])
    hasher = PasswordHasher(reactor, n=options["scrypt-n"], pool=kdf)
    tokens = buildTokens(options, presence, reactor)
    chat = ChatService(
        store,
        presence,
        relay,
        hasher,
        reactor,
        onRelogin=options["on-relogin"],
        friendRequests=options["friend-requests"],
        tokens=tokens,
    )
    chat.onStartFailure = startFailed
    wireLimits(options, reactor, store, chat)
    top = service.MultiService()
    if not options["no-lean-dispatch"]:
        LeanDispatch(reactor).setServiceParent(top)
    if options["gc-intervals"] is not None:
        from chatproto.gcschedule import CollectionSchedule

        CollectionSchedule(reactor, options["gc-intervals"]).setServiceParent(top)
    # Stopped last: hashing still running for a session is waited for.
    kdf.setServiceParent(top)
    # Added before the listeners, stopped after them: listeners close
    # before sessions are ended.
    chat.setServiceParent(top)
    if hasattr(tokens, "prune"):
        from twisted.application.internet import TimerService

        pruner = TimerService(3600, tokens.prune)
        pruner.clock = reactor
        pruner.setServiceParent(top)
    idle = options["idle-timeout"] or None
    factory = ChatFactory(
        chat,
        reactor,
        maxLength=options["max-line"],
        idleTimeout=idle,
        loginTimeout=options["login-timeout"] or None,
        outputHighWater=options["output-high-water"],
        outputCap=options["output-cap"],
        pipelineDepth=options["pipeline-depth"],
    )
    for endpoint in endpoints:
        StreamServerEndpointService(endpoint, factory).setServiceParent(top)
    return top
