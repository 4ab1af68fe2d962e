"""
C{twistd balancer}: options and service construction.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application import service
from twisted.python import usage

from balancer import config as configmod
from balancer.config import LISTS, SCALARS, ConfigError
from balancer.selection import ALGORITHMS

_HELP = {
    "config": "ini file with a [balancer] section (command line wins)",
    "algorithm": f"{' | '.join(ALGORITHMS)} [default: round-robin]",
    "connect-timeout": "backend connect timeout per try, e.g. 1, 500ms [default: 1s]",
    "tries": "backends to try per client, 1 to 1000 [default: every backend once]",
    "check-interval": "health check interval [default: 2s]",
    "check-timeout": "health check timeout [default: 1s]",
    "rise": "successful checks to mark a backend up [default: 2]",
    "fall": "failed checks to mark a backend down [default: 3]",
    "check-send": r"bytes a check sends, C escapes allowed, e.g. 'PING\n' [default: none]",
    "check-expect": r"bytes a check expects in the reply, e.g. 'PONG' [default: none]",
    "redis": "discover chat servers from this Redis: "
             "redis://[user:password@]host:port/db or rediss://",
    "redis-prefix": "registry key prefix [default: chat:]",
    "discovery-interval": "registry poll interval [default: 1s]",
    "proxy-protocol": "send a PROXY protocol header to backends: v1 | v2 [default: none]",
    "proxy-timeout": "close a proxied connection after this long without a byte "
                     "either way; 0 = never [default: 10m]",
    "status": "HTTP status/metrics endpoint (unauthenticated), "
              "e.g. tcp:8081:interface=127.0.0.1",
    "drain-timeout": "close connections of removed backends after this long; "
                     "0 waits for them to end [default: 0]",
    "workers": "processes sharing the listen ports with SO_REUSEPORT [default: 1]",
    "backlog": "listen backlog [default: 1024]",
}

#: options of the parent's twistd that its workers get too
PASSED_TWISTD_OPTIONS = ("reactor", "logger")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A TCP load balancer for chat servers: smooth weighted round-robin, "
        "least-conn or least-logins selection, passive (max_fails/fail_timeout) "
        "and active (rise/fall) health checks, Redis discovery, PROXY protocol, "
        "SIGHUP reload.  See docs/balancer.md."
    )
    optParameters = (
        [["config", "c", None, _HELP["config"]]]
        + [[name, None, None, _HELP[name]] for name in SCALARS if name in _HELP]
        + [
            ["worker-index", None, None, "(internal) index of a worker process"],
            ["worker-parent", None, None, "(internal) pid of the worker's parent"],
            ["worker-status", None, None, "(internal) unix socket for the parent's status"],
        ]
    )

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["backend"] = []
        self["lean-dispatch"] = None
        self["half-close"] = None
        self.argv: list[str] = []

    def opt_listen(self, description: str) -> None:
        """
        Endpoint to accept clients on, repeatable (tcp:8000, 8000,
        ssl:8443:...) [default: tcp:8000]
        """
        self["listen"].append(description)

    def opt_backend(self, line: str) -> None:
        """
        Backend, repeatable: "HOST:PORT weight=N max_fails=N fail_timeout=10s
        [backup] [down]"; HOST:PORT may be a client endpoint (tls:host:port).
        """
        self["backend"].append(line)

    def opt_lean_dispatch(self) -> None:
        """
        Use the lean epoll dispatch loop (balancer.fastpoll) [default]
        """
        self["lean-dispatch"] = True

    def opt_no_lean_dispatch(self) -> None:
        """
        Use the reactor's stock dispatch loop
        """
        self["lean-dispatch"] = False

    def opt_half_close(self) -> None:
        """
        Pass an EOF on as a half-close: a client that shuts down its
        writing side still gets the replies [default]
        """
        self["half-close"] = True

    def opt_no_half_close(self) -> None:
        """
        An EOF from either side closes both connections once the bytes
        read before it are sent (nginx's proxy_half_close off)
        """
        self["half-close"] = False

    def parseOptions(self, options: list[str] | None = None) -> None:
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def cmdline(self) -> dict[str, Any]:
        values: dict[str, Any] = {name: self[name] for name in SCALARS}
        for name in LISTS:
            values[name] = list(self[name])
        return values

    def postOptions(self) -> None:
        for name in ("worker-index", "worker-parent"):
            value = self[name]
            if value is not None:
                if not str(value).isdigit():
                    raise usage.UsageError(f"bad value for --{name}: {value!r}")
                self[name] = int(value)
        try:
            self.config = configmod.load(self.cmdline(), self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None

    def twistdArguments(self) -> list[str]:
        """
        The options of the parent C{twistd} that workers repeat
        (C{--reactor}, C{--logger}), as arguments.
        """
        parent = getattr(self, "parent", None)
        out: list[str] = []
        if parent is None:
            return out
        for name in PASSED_TWISTD_OPTIONS:
            try:
                value = parent[name]
            except KeyError:
                continue
            if value:
                out.append(f"--{name}={value}")
        return out


def makeService(options: Options, reactor=None) -> service.IService:
    """
    The service tree.  Called by twistd (no C{reactor}): SIGTERM/SIGINT
    then get handlers that never log (L{chatproto.common.stopsignals}).
    """
    underTwistd = reactor is None
    if reactor is None:
        from twisted.internet import reactor

    from balancer.service import BalancerService
    from balancer.workers import WorkerMonitor, watchParent, workerArgv
    from chatproto.common.rlimits import raiseOpenFilesLimit

    raiseOpenFilesLimit()
    if underTwistd:
        from chatproto.common.stopsignals import installStopHandlers

        reactor.callWhenRunning(installStopHandlers, reactor)
    cfg = options.config
    index = options["worker-index"]
    top = service.MultiService()
    if index is not None:
        # a worker: no public status page, its own to the parent instead
        cfg.status = None
        if options["worker-parent"] is not None:
            watchParent(reactor, options["worker-parent"])
    balancer = BalancerService(
        cfg, reactor, options.cmdline(), reusePort=cfg.workers > 1 or index is not None,
        workerStatus=options["worker-status"],
    )
    balancer.setServiceParent(top)
    if cfg.workers > 1 and index is None:
        monitor = WorkerMonitor(reactor)
        for n in range(1, cfg.workers):
            monitor.addWorker(
                n, workerArgv(options.argv, n, options.twistdArguments())
            )
        monitor.setServiceParent(top)
        balancer.workers = monitor
    return top
