"""
C{--workers N}: the first process runs a balancer itself and starts N-1
more with the same arguments.  Every process listens on the same ports
with C{SO_REUSEPORT}, so the kernel spreads new connections across them and
each process uses one core.  Each worker runs its own health checks and
discovery.

The workers are kept by L{WorkerMonitor}, Twisted's
L{ProcessMonitor<twisted.runner.procmon.ProcessMonitor>}: a worker that dies
is restarted (at once after a good run, with a doubling delay up to
C{maxRestartDelay} when it dies right away), stopping sends C{SIGTERM} and
C{SIGKILL} after C{killTime}, and every line a worker writes is logged by
the parent as C{[worker-N] ...}, so worker logs land wherever the parent's
log goes (also when twistd daemonizes).  C{SIGHUP} to the parent is passed
on to every worker.  A worker ends when its parent does
(C{PR_SET_PDEATHSIG}, or a watch on the parent pid where that is missing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.runner.procmon import ProcessMonitor

#: options the parent must not hand on to its workers
_DROPPED = ("--workers", "--worker-index", "--worker-parent", "--worker-status", "--status")

PR_SET_PDEATHSIG = 1


def workerArgv(argv: list[str], index: int, twistdArgs: list[str] = ()) -> list[str]:
    """
    The twistd command line of worker C{index}, from the balancer's own
    arguments C{argv}: without C{--workers}/C{--status}, plus
    C{--worker-index}; C{twistdArgs} (the parent's C{--reactor},
    C{--logger}) go to twistd itself.  The worker logs to its standard
    output, which the parent reads and logs.
    """
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _DROPPED:
            skip = "=" not in arg
            continue
        out.append(arg)
    return [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "--nodaemon", "--pidfile=", "--logfile=-", *twistdArgs,
        "balancer", *out, "--worker-index", str(index),
    ]


def _setParentDeathSignal(signum: int) -> bool:
    """
    Ask Linux to send C{signum} to this process when its parent ends.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watchParent(reactor: Any, parentPid: int, interval: float = 1.0) -> Any:
    """
    End this worker (a clean C{SIGTERM} shutdown) when the process
    C{parentPid} ends.  Returns the fallback L{LoopingCall} that watches
    the parent pid, or C{None} when the kernel does it.
    """
    kernel = _setParentDeathSignal(signal.SIGTERM)
    if os.getppid() != parentPid:
        # the parent ended before the death signal was set
        reactor.callWhenRunning(reactor.stop)
        return None
    if kernel:
        return None

    def check() -> None:
        if os.getppid() != parentPid:
            Logger().warn("parent {pid} is gone: stopping", pid=parentPid)
            loop.stop()
            reactor.stop()

    loop = LoopingCall(check)
    loop.clock = reactor
    reactor.callWhenRunning(loop.start, interval, now=False)
    return loop


class WorkerMonitor(ProcessMonitor):
    """
    The workers of one balancer: a L{ProcessMonitor} that adds each
    worker's private status socket and the parent pid to its command line
    when it starts, forwards signals, and waits for its workers to end when
    stopped.
    """

    log = Logger()
    maxRestartDelay = 30
    killTime = 5

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.reactor = reactor
        self.argvs: dict[int, list[str]] = {}
        self.statusDir: str | None = None
        self.ended: dict[str, defer.Deferred[None]] = {}

    @staticmethod
    def nameOf(index: int) -> str:
        return f"worker-{index}"

    def addWorker(self, index: int, argv: list[str]) -> None:
        """
        Run C{argv} as worker C{index} from C{startService} on.
        """
        self.argvs[index] = argv

    def statusPath(self, index: int) -> str | None:
        if self.statusDir is None:
            return None
        return os.path.join(self.statusDir, f"{index}.sock")

    def startService(self) -> None:
        # after twistd daemonized: the pid the workers watch is final now
        self.statusDir = tempfile.mkdtemp(prefix="balancer-workers-")
        for index, argv in sorted(self.argvs.items()):
            name = self.nameOf(index)
            if name in self.processes:
                self.removeProcess(name)
            self.addProcess(
                name,
                argv + ["--worker-parent", str(os.getpid()),
                        "--worker-status", f"unix:{self.statusPath(index)}"],
                env=dict(os.environ),
            )
        super().startService()

    def startProcess(self, name: str) -> None:
        super().startProcess(name)
        proto = self.protocols.get(name)
        if proto is None:
            return  # could not spawn: ProcessMonitor schedules a retry
        self.log.info("started {name} (pid {pid})", name=name, pid=proto.transport.pid)
        ended = proto.processEnded

        def processEnded(reason: Any) -> None:
            # the ProcessProtocol's own hook: log, let ProcessMonitor
            # schedule the restart, then wake stopService
            if self.running:
                self.log.warn("{name} ended ({why})", name=name, why=reason.getErrorMessage())
            waiter = self.ended.pop(name, None)
            ended(reason)
            if waiter is not None:
                waiter.callback(None)

        proto.processEnded = processEnded

    def pids(self) -> dict[int, int]:
        """
        Worker index -> pid of the running workers.
        """
        out = {}
        for index in self.argvs:
            proto = self.protocols.get(self.nameOf(index))
            pid = getattr(getattr(proto, "transport", None), "pid", None)
            if pid:
                out[index] = pid
        return out

    def signalAll(self, signum: str = "HUP") -> None:
        for proto in list(self.protocols.values()):
            try:
                proto.transport.signalProcess(signum)
            except (error.ProcessExitedAlready, OSError, AttributeError):
                pass

    def stopService(self) -> defer.Deferred[Any]:
        waiting = []
        for name in list(self.protocols):
            d: defer.Deferred[None] = defer.Deferred()
            self.ended[name] = d
            waiting.append(d)
        super().stopService()  # SIGTERM now, SIGKILL after killTime

        def cleanup(result: Any) -> Any:
            if self.statusDir is not None:
                shutil.rmtree(self.statusDir, ignore_errors=True)
                self.statusDir = None
            return result

        return defer.gatherResults(waiting).addBoth(cleanup)

    @defer.inlineCallbacks
    def collectStatus(self, timeout: float = 2.0) -> Any:
        """
        Every running worker's status snapshot: a list of C{(index, pid,
        snapshot or None)}.
        """
        pids = self.pids()
        results = yield defer.DeferredList(
            [self._fetch(index, timeout) for index in sorted(pids)], consumeErrors=True
        )
        out = []
        for index, (ok, value) in zip(sorted(pids), results):
            out.append((index, pids[index], value if ok else None))
        return out

    def _fetch(self, index: int, timeout: float) -> defer.Deferred[Any]:
        path = self.statusPath(index)
        if path is None:
            return defer.succeed(None)
        reader = _StatusReader()
        d = UNIXClientEndpoint(self.reactor, path, timeout=timeout).connect(
            protocol.Factory.forProtocol(lambda: reader)
        )
        d.addCallback(lambda _: reader.done)
        d.addTimeout(timeout, self.reactor)
        return d


MAX_WORKER_STATUS = 16 * 1024 * 1024


class _StatusReader(protocol.Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[Any] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_WORKER_STATUS:
            self.transport.abortConnection()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.done.called:
            return
        try:
            self.done.callback(json.loads(b"".join(self.chunks)))
        except ValueError as e:
            self.done.errback(e)


class StatusDump(protocol.Protocol):
    """
    A worker's side of L{WorkerMonitor.collectStatus}: write the snapshot,
    close.
    """

    def connectionMade(self) -> None:
        self.transport.write(json.dumps(self.factory.snapshot()).encode())
        self.transport.loseConnection()


def statusDumpFactory(snapshot: Any) -> protocol.Factory:
    factory = protocol.Factory.forProtocol(StatusDump)
    factory.snapshot = snapshot
    factory.noisy = False
    return factory
