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
    "tries": "backends to try per client [default: every backend once]",
    "check-interval": "health check interval [default: 2s]",
    "check-timeout": "health check timeout [default: 1s]",
    "rise": "successful checks to mark a backend up [default: 2]",
    "fall": "failed checks to mark a backend down [default: 3]",
    "check-send": r"bytes a check sends, C escapes allowed, e.g. 'PING\n' [default: none]",
    "check-expect": r"bytes a check expects in the reply, e.g. 'PONG' [default: none]",
    "redis": "discover chat servers from this Redis: redis://host:port/db or rediss://",
    "redis-prefix": "registry key prefix [default: chat:]",
    "discovery-interval": "registry poll interval [default: 1s]",
    "proxy-protocol": "send a PROXY protocol header to backends: v1 | v2 [default: none]",
    "status": "HTTP status/metrics endpoint, e.g. tcp:8081:interface=127.0.0.1",
    "drain-timeout": "close connections of removed backends after this long; "
                     "0 waits for them to end [default: 0]",
    "workers": "processes sharing the listen ports with SO_REUSEPORT [default: 1]",
    "backlog": "listen backlog [default: 1024]",
}


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A TCP load balancer for chat servers: smooth weighted round-robin, "
        "least-conn or least-logins selection, passive (max_fails/fail_timeout) "
        "and active (rise/fall) health checks, Redis discovery, PROXY protocol, "
        "SIGHUP reload.  See docs/balancer.md."
    )
    optParameters = [["config", "c", None, _HELP["config"]]] + [
        [name, None, None, _HELP[name]] for name in SCALARS
    ] + [["worker-index", None, None, "(internal) index of a worker process", int]]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["backend"] = []
        self.argv: list[str] = []

    def opt_listen(self, description: str) -> None:
        """
        Endpoint to accept clients on, repeatable (tcp:8000, ssl:8443:...)
        [default: tcp:8000]
        """
        self["listen"].append(description)

    def opt_backend(self, line: str) -> None:
        """
        Backend, repeatable: "HOST:PORT weight=N max_fails=N fail_timeout=10s
        [backup] [down]"; HOST:PORT may be a client endpoint (tls:host:port).
        """
        self["backend"].append(line)

    def parseOptions(self, options: list[str] | None = None) -> None:
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def cmdline(self) -> dict[str, Any]:
        values: dict[str, Any] = {name: self[name] for name in SCALARS}
        for name in LISTS:
            values[name] = list(self[name])
        return values

    def postOptions(self) -> None:
        try:
            self.config = configmod.load(self.cmdline(), self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from balancer.service import BalancerService
    from balancer.workers import WorkerSupervisor

    from balancer import fastpoll
    from chatproto.limits import raiseOpenFilesLimit

    fastpoll.install(reactor)
    raiseOpenFilesLimit()
    cfg = options.config
    index = options["worker-index"]
    workers = cfg.workers
    top = service.MultiService()
    if index is not None:
        cfg.status = None  # only the first process serves the status page
    balancer = BalancerService(
        cfg, reactor, options.cmdline(), reuse_port=workers > 1 or index is not None
    )
    balancer.setServiceParent(top)
    if workers > 1 and index is None:
        supervisor = WorkerSupervisor(reactor, options.argv, workers)
        supervisor.setServiceParent(top)
        balancer.sighup_hooks.append(supervisor.signal_all)
    return top
