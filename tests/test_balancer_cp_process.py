"""
C{twistd balancer} as real processes: start-up failures end the process
with one line and a non-zero status; C{--workers} spawns, restarts,
forwards SIGHUP, reports every worker, and its workers end with it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import urllib.request

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from tests.cluster_helpers import freePort, until

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Exited(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred = defer.Deferred()
        self.output = b""

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = HERE + os.pathsep + e.get("PYTHONPATH", "")
    return e


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is as good as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class _BalancerProcess:
    """Runs `twistd balancer` (a backend that never answers, no checks),
    killed at cleanup if still running."""

    def runBalancer(self, *args: str, daemon: bool = False):
        exited = Exited()
        argv = [TWISTD]
        if daemon:
            d = self.mktemp()
            os.makedirs(d)
            argv += [f"--pidfile={d}/b.pid", f"--logfile={d}/b.log"]
        else:
            argv += ["-n", "--pidfile="]
        argv += ["balancer", "--backend", "127.0.0.1:1", "--check-interval", "0", *args]
        process = reactor.spawnProcess(exited, TWISTD, argv, env=env())

        def cleanup():
            if not exited.ended.called:
                process.signalProcess("KILL")
                return exited.ended

        self.addCleanup(cleanup)
        return exited


class StartupFailureTests(_BalancerProcess, unittest.TestCase):
    def busyPort(self) -> int:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        self.addCleanup(s.close)
        return s.getsockname()[1]

    async def test_listenPortInUse(self):
        port = self.busyPort()
        exited = self.runBalancer("--listen", f"tcp:{port}:interface=127.0.0.1")
        self.assertEqual(await exited.ended, 1)
        out = exited.output.decode()
        self.assertIn(f"cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use", out)
        self.assertNotIn("Traceback", out)

    async def test_daemonizedListenFailureExitsNonZero(self):
        port = self.busyPort()
        exited = self.runBalancer("--listen", f"tcp:{port}:interface=127.0.0.1", daemon=True)
        self.assertEqual(await exited.ended, 1)
        self.assertIn(b"cannot listen on", exited.output)

    async def test_statusPortInUse(self):
        port = self.busyPort()
        exited = self.runBalancer(
            "--listen", f"tcp:{freePort()}:interface=127.0.0.1",
            "--status", f"tcp:{port}:interface=127.0.0.1",
        )
        self.assertEqual(await exited.ended, 1)
        out = exited.output.decode()
        self.assertIn(f"cannot serve --status on tcp:{port}:interface=127.0.0.1", out)
        self.assertNotIn("Traceback", out)

    async def test_badListenAndStatusAreUsageErrors(self):
        for args, expected in [
            (["--listen", "bogus:1"], "bad --listen 'bogus:1': Unknown endpoint type"),
            (["--status", "bogus:1"], "bad value for --status: 'bogus:1'"),
            (["--backend", "foo:bar:7220"], "bad backend address 'foo:bar:7220'"),
        ]:
            exited = self.runBalancer(*args)
            self.assertNotEqual(await exited.ended, 0)
            out = exited.output.decode()
            self.assertIn(expected, out)
            self.assertNotIn("Traceback", out)


class StopSignalTests(_BalancerProcess, unittest.TestCase):
    async def test_sigtermStopsWithoutLoggingFromTheHandler(self):
        """SIGTERM ends twistd balancer cleanly (exit 0), through the
        handler that only stops the reactor: Twisted's own handler logs
        "Received SIGTERM" from inside the signal handler, which can
        deadlock against the log file's lock."""
        port = freePort()
        exited = self.runBalancer("--listen", f"tcp:{port}:interface=127.0.0.1")

        def serving() -> bool:
            # The port listens before the reactor runs (and installs the
            # handlers); a client closed for want of a backend shows the
            # reactor at work.
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.settimeout(5)
                    return s.recv(64) == b""
            except OSError:
                return False

        await until(serving, 30, what="the balancer to serve")
        exited.transport.signalProcess("TERM")
        self.assertEqual(await exited.ended, 0)
        out = exited.output.decode()
        self.assertNotIn("Received SIGTERM", out)
        self.assertIn("Main loop terminated", out)
        self.assertNotIn("Traceback", out)


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
        return json.loads(r.read())


class WorkersTests(unittest.TestCase):
    async def test_spawnRestartSighupAndParentDeath(self):
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        ini = os.path.join(d, "b.ini")
        with open(ini, "w") as f:
            f.write("[balancer]\nbackend = 127.0.0.1:1\ncheck-interval = 0\n")
        listen, sport = freePort(), freePort()
        log = os.path.join(d, "b.log")
        exited = Exited()
        process = reactor.spawnProcess(exited, TWISTD, [
            TWISTD, "-n", "--pidfile=", f"--logfile={log}", "balancer", "--config", ini,
            "--listen", f"tcp:{listen}:interface=127.0.0.1",
            "--status", f"tcp:{sport}:interface=127.0.0.1", "--workers", "2",
        ], env=env())
        workerPids: list[int] = []

        def cleanup():
            for pid in workerPids:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            if not exited.ended.called:
                process.signalProcess("KILL")
                return exited.ended

        self.addCleanup(cleanup)

        def workers():
            try:
                data = status(sport)
            except OSError:
                return None
            entries = [w for w in data.get("workers", []) if "error" not in w]
            return data if len(entries) == 2 else None

        # spawn: the status endpoint reports both processes
        data = await until(workers, 30, 0.1, what="two processes in the status")
        self.assertEqual(data["total"]["processes"], 2)
        self.assertEqual(data["workers"][0]["pid"], process.pid)
        first = data["workers"][1]["pid"]
        workerPids.append(first)
        self.assertNotEqual(first, process.pid)

        # restart after a kill
        os.kill(first, signal.SIGKILL)

        def restarted():
            data = workers()
            return data if data and data["workers"][1]["pid"] != first else None

        data = await until(restarted, 30, 0.1, what="the worker to be restarted")
        second = data["workers"][1]["pid"]
        workerPids.append(second)

        # SIGHUP to the parent reloads the parent and the worker
        with open(ini, "w") as f:
            f.write("[balancer]\nbackend = 127.0.0.1:1\ncheck-interval = 0\nalgorithm = least-conn\n")
        process.signalProcess("HUP")

        def reloaded():
            data = workers()
            return data and [w["reloads"] for w in data["workers"]] == [1, 1]

        await until(reloaded, 30, 0.1, what="both processes to reload")
        data = status(sport)
        self.assertEqual([w["algorithm"] for w in data["workers"]], ["least-conn"] * 2)

        # the worker's log lines are in the parent's log
        with open(log) as f:
            text = f.read()
        self.assertIn("[worker-1]", text)
        self.assertIn("worker-1 ended", text)

        # killing the parent ends its worker
        process.signalProcess("KILL")
        await exited.ended
        await until(lambda: not alive(second), 30, 0.1, what="the worker to end")
