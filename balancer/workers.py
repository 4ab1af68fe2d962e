"""
C{--workers N}: the first process runs a balancer itself and starts N-1
more with the same arguments.  Every process listens on the same ports
with C{SO_REUSEPORT}, so the kernel spreads new connections across them and
each process uses one core.  Each worker runs its own health checks and
discovery; C{SIGHUP} to the first process is passed on to the others.
Workers that die are restarted after a second.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application import service
from twisted.internet import protocol
from twisted.logger import Logger


def worker_argv(argv: list[str], index: int) -> list[str]:
    """
    The twistd command line of worker C{index}, from the balancer's own
    arguments C{argv}: without C{--workers}/C{--status}, plus
    C{--worker-index}.
    """
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--workers", "--worker-index", "--status"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "--nodaemon", "--pidfile=", "balancer", *out, "--worker-index", str(index),
    ]


class _Worker(protocol.ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index

    def processEnded(self, reason: Any) -> None:
        self.supervisor.ended(self, reason)


class WorkerSupervisor(service.Service):
    log = Logger()

    def __init__(self, reactor: Any, argv: list[str], count: int) -> None:
        self.reactor = reactor
        self.argv = argv
        self.count = count
        self.procs: dict[int, Any] = {}
        self._respawn: dict[int, Any] = {}

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._respawn.pop(index, None)
        args = worker_argv(self.argv, index)
        proto = _Worker(self, index)
        self.procs[index] = self.reactor.spawnProcess(
            proto, args[0], args, env=dict(os.environ), childFDs={0: "w", 1: 1, 2: 2}
        )
        self.log.info("started worker {i} (pid {pid})", i=index, pid=self.procs[index].pid)

    def ended(self, proto: _Worker, reason: Any) -> None:
        self.procs.pop(proto.index, None)
        if self.running:
            self.log.warn("worker {i} ended ({why}); restarting", i=proto.index,
                          why=reason.getErrorMessage())
            self._respawn[proto.index] = self.reactor.callLater(1.0, self._spawn, proto.index)

    def signal_all(self, signum: int = signal.SIGHUP) -> None:
        for proc in self.procs.values():
            try:
                proc.signalProcess(signum)
            except Exception:
                pass

    def stopService(self) -> None:
        super().stopService()
        for call in self._respawn.values():
            if call.active():
                call.cancel()
        self._respawn.clear()
        self.signal_all(signal.SIGTERM)
