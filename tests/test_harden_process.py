"""
`twistd chat` start-up failures as a real process: each exits non-zero
with one clear line and no traceback; a bare port number is tcp:PORT.
"""

import os
import socket
import sys

from twisted.internet import reactor
from twisted.trial import unittest

from tests.test_process import Exited, freePort, waitForPort

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class StartUpFailureTests(unittest.TestCase):
    async def twistd(self, *args, logfile=None):
        """Run C{twistd -n chat ARGS}; its exit code and all it printed."""
        exited = Exited()
        log = ["--logfile", logfile] if logfile else []
        process = reactor.spawnProcess(
            exited,
            TWISTD,
            [TWISTD, "-n", "--pidfile=", *log, "chat", "--scrypt-n", "16", *args],
            env=dict(os.environ),
        )
        self.addCleanup(lambda: exited.ended if exited.ended.called else (process.signalProcess("KILL"), exited.ended)[1])
        code, signal = await exited.ended
        output = exited.output.decode("utf-8", "replace")
        if logfile and os.path.exists(logfile):
            with open(logfile) as f:
                output += f.read()
        return code, output

    async def assertFailsWith(self, text, *args, **kw):
        code, output = await self.twistd(*args, **kw)
        self.assertEqual(code, 1, output)
        self.assertIn(text, output)
        self.assertNotIn("Traceback", output)
        return output

    async def test_sqliteDirectoryMissing(self):
        await self.assertFailsWith("no such directory /no/such/dir", "--db", "sqlite:/no/such/dir/x.db", "--port", "tcp:0")

    async def test_nanIdleTimeout(self):
        await self.assertFailsWith("--idle-timeout must be a finite number", "--idle-timeout", "nan")

    async def test_outOfRangeOption(self):
        await self.assertFailsWith("--login-timeout must be at most 86400", "--login-timeout", "1e9")

    async def test_unknownEndpointType(self):
        output = await self.assertFailsWith("cannot use --port bogus:1: Unknown endpoint type: 'bogus'", "--port", "bogus:1")
        self.assertEqual(len(output.strip().splitlines()), 1, output)

    async def test_missingTLSKey(self):
        await self.assertFailsWith(
            "cannot use --port ssl:0:privateKey=/no/key.pem", "--port", "ssl:0:privateKey=/no/key.pem"
        )

    async def test_configNotUTF8(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"[chat]\nname = caf\xe9\n")
        await self.assertFailsWith("not UTF-8", "--config", path)

    async def test_portInUse(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            output = await self.assertFailsWith(
                f"cannot listen on tcp:{port}:interface=127.0.0.1", "--port", f"tcp:{port}:interface=127.0.0.1",
                "--db", "sqlite::memory:",
            )
        self.assertIn("Address already in use", output)

    async def test_storageFailsAfterStart(self):
        """The store cannot open (the path is a directory): the service's
        start-up failure stops twistd with status 1 (it used to be 0)."""
        directory = os.path.abspath(self.mktemp())
        os.mkdir(directory)
        logfile = os.path.abspath(self.mktemp()) + ".log"
        code, output = await self.twistd("--db", f"sqlite:{directory}", "--port", "tcp:0:interface=127.0.0.1", logfile=logfile)
        self.assertEqual(code, 1, output)
        self.assertIn("cannot start: ", output)

    async def test_mysqlUnreachable(self):
        """MySQL refuses connections: after the store's retries (about 5 s)
        twistd stops with status 1 (it used to exit 0)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]  # nothing listens there once closed
        logfile = os.path.abspath(self.mktemp()) + ".log"
        code, output = await self.twistd(
            "--db", f"mysql://root@127.0.0.1:{closed}/chat", "--port", "tcp:0:interface=127.0.0.1", logfile=logfile
        )
        self.assertEqual(code, 1, output)
        self.assertIn("cannot start: database unavailable", output)

    async def test_barePortIsTCP(self):
        port = freePort()
        exited = Exited()
        process = reactor.spawnProcess(
            exited,
            TWISTD,
            [TWISTD, "-n", "--pidfile=", "chat", "--port", str(port), "--db", "sqlite::memory:", "--scrypt-n", "16"],
            env=dict(os.environ),
        )
        self.addCleanup(lambda: exited.ended if exited.ended.called else (process.signalProcess("KILL"), exited.ended)[1])
        await waitForPort(port)
        process.signalProcess("TERM")
        self.assertIn(await exited.ended, [(0, None), (None, 15)])
        self.assertNotIn(b"Traceback", exited.output)
