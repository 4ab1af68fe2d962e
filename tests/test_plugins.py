"""The twistd plugins are found, and the chat options parse as documented."""

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest

from chatproto.config import parseDatabaseURL, parseRedisURL
from chatproto.tap import Options, advertisedAddress


class PluginTests(unittest.TestCase):
    def test_pluginsFound(self):
        names = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("chat", names)
        self.assertIn("balancer", names)
        self.assertEqual(names["chat"].module, "chatproto.tap")
        self.assertEqual(names["balancer"].module, "balancer.tap")


class ChatOptionsTests(unittest.TestCase):
    def parse(self, *argv):
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self):
        o = self.parse()
        self.assertEqual(o["port"], ["tcp:6000"])
        self.assertEqual(o["db"], "sqlite:chat.sqlite3")
        self.assertIsNone(o["redis-url"])
        self.assertEqual((o["on-relogin"], o["idle-timeout"], o["max-line"]), ("kick", 300.0, 65536))
        self.assertTrue(o["name"].endswith(":6000"))
        self.assertEqual((o["advertise-host"], o["advertise-port"]), ("127.0.0.1", 6000))

    def test_repeatablePort(self):
        o = self.parse("--port", "tcp:6001", "--port", "ssl:6002:privateKey=k.pem:certKey=c.pem")
        self.assertEqual(o["port"], ["tcp:6001", "ssl:6002:privateKey=k.pem:certKey=c.pem"])
        self.assertEqual(o["advertise-port"], 6001)

    def test_fileThenCommandLine(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                "[chat]\nport = tcp:7001\n  tcp:7002\nname = from-file\n"
                "on-relogin = reject\nidle-timeout = 60\nredis = redis://10.1.1.1:6380/2\n"
            )
        o = self.parse("--config", path, "--name", "from-cli")
        self.assertEqual(o["port"], ["tcp:7001", "tcp:7002"])
        self.assertEqual(o["name"], "from-cli")
        self.assertEqual((o["on-relogin"], o["idle-timeout"]), ("reject", 60.0))
        self.assertEqual((o["redis-url"].host, o["redis-url"].port, o["redis-url"].db), ("10.1.1.1", 6380, 2))
        o = self.parse("--config", path, "--port", "tcp:9")
        self.assertEqual(o["port"], ["tcp:9"])

    def test_badValues(self):
        for argv in (
            ["--on-relogin", "maybe"],
            ["--idle-timeout", "soon"],
            ["--db", "postgres://x"],
            ["--redis", "http://x"],
            ["--scrypt-n", "1000"],
            ["--advertise", "nohost"],
            ["--config", "/nonexistent.ini"],
        ):
            self.assertRaises(usage.UsageError, self.parse, *argv)

    def test_clusterOnPortZeroNeedsAdvertise(self):
        e = self.assertRaises(usage.UsageError, self.parse, "--port", "tcp:0", "--redis", "redis://127.0.0.1")
        self.assertIn("--advertise", str(e))
        o = self.parse("--port", "tcp:0", "--redis", "redis://127.0.0.1", "--advertise", "10.0.0.5:6000")
        self.assertEqual((o["advertise-host"], o["advertise-port"]), ("10.0.0.5", 6000))

    def test_unknownFileSetting(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[chat]\nprot = tcp:1\n")
        e = self.assertRaises(usage.UsageError, self.parse, "--config", path)
        self.assertIn("prot", str(e))

    def test_urls(self):
        self.assertEqual(parseDatabaseURL("sqlite:/tmp/x.db").path, "/tmp/x.db")
        url = parseDatabaseURL("mysql://chat:p%40ss@db.example:3307/chatdb")
        self.assertEqual((url.user, url.password, url.host, url.port, url.database), ("chat", "p@ss", "db.example", 3307, "chatdb"))
        self.assertRaises(usage.UsageError, parseDatabaseURL, "mysql://root@host/")
        r = parseRedisURL("rediss://:pw@r.example:6390/3")
        self.assertEqual((r.host, r.port, r.db, r.password, r.tls, r.ca), ("r.example", 6390, 3, "pw", True, None))
        self.assertEqual(parseRedisURL("rediss://r.example/0?ca=/etc/ca.pem").ca, "/etc/ca.pem")

    def test_advertisedAddress(self):
        self.assertEqual(advertisedAddress("tcp:port=6005:interface=10.0.0.2", None), ("10.0.0.2", 6005))
        self.assertEqual(advertisedAddress("haproxy:tcp:6006", None), ("127.0.0.1", 6006))
        self.assertEqual(advertisedAddress("tcp:1", "chat1.example:7000"), ("chat1.example", 7000))


class HardeningOptionsTests(unittest.TestCase):
    """The limits of issue 9: defaults, ini keys, range checks."""

    def parse(self, *argv):
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self):
        from chatproto.kdfpool import defaultThreads

        o = self.parse()
        self.assertEqual(
            {k: o[k] for k in NEW_OPTIONS},
            {
                "login-timeout": 30.0,
                "output-high-water": 256 * 1024,
                "output-cap": 4 * 1024 * 1024,
                "mailbox-max-messages": 1000,
                "mailbox-max-bytes": 1024 * 1024,
                "register-burst": 100,
                "register-rate": 1.0,
                "kdf-threads": defaultThreads(),
                "kdf-queue": 64,
            },
        )

    def test_fromFileAndCommandLine(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(
                "[chat]\nlogin_timeout = 10\noutput-high-water = 65536\noutput-cap = 1048576\n"
                "mailbox-max-messages = 50\nmailbox-max-bytes = 20000\nregister-burst = 5\n"
                "register-rate = 0.5\nkdf-threads = 3\nkdf-queue = 7\n"
            )
        o = self.parse("--config", path, "--kdf-queue", "9")
        self.assertEqual(
            [o[k] for k in NEW_OPTIONS], [10.0, 65536, 1048576, 50, 20000, 5, 0.5, 3, 9]
        )

    def test_rangeChecked(self):
        for argv in (
            ["--idle-timeout", "nan"],
            ["--idle-timeout", "inf"],
            ["--idle-timeout", "-1"],
            ["--login-timeout", "nan"],
            ["--login-timeout", "1e9"],
            ["--max-line", "1e3"],
            ["--max-line", "99999999999"],
            ["--output-high-water", "10"],
            ["--output-cap", "2000", "--output-high-water", "4000"],
            ["--mailbox-max-messages", "0"],
            ["--register-burst", "0"],
            ["--register-rate", "0"],
            ["--register-rate", "nan"],
            ["--kdf-threads", "0"],
            ["--kdf-queue", "-1"],
            ["--scrypt-n", str(2**20)],
            ["--weight", "-1"],
            ["--port", "tcp:x"],
        ):
            self.assertRaises(usage.UsageError, self.parse, *argv)

    def test_barePort(self):
        o = self.parse("--port", "7410", "--port", "haproxy:7411", "--port", "tcp:7412")
        self.assertEqual(o["port"], ["tcp:7410", "haproxy:tcp:7411", "tcp:7412"])
        self.assertEqual(o["advertise-port"], 7410)

    def test_configNotUTF8(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"[chat]\nname = caf\xe9\n")
        e = self.assertRaises(usage.UsageError, self.parse, "--config", path)
        self.assertIn("not UTF-8", str(e))

    def test_sqliteDirectoryMustExist(self):
        e = self.assertRaises(usage.UsageError, self.parse, "--db", "sqlite:/no/such/dir/x.db")
        self.assertIn("/no/such/dir", str(e))
        self.parse("--db", "sqlite::memory:")


NEW_OPTIONS = (
    "login-timeout",
    "output-high-water",
    "output-cap",
    "mailbox-max-messages",
    "mailbox-max-bytes",
    "register-burst",
    "register-rate",
    "kdf-threads",
    "kdf-queue",
)


class MakeServiceTests(unittest.TestCase):
    def test_badPortIsOneLine(self):
        from twisted.internet.testing import MemoryReactorClock

        from chatproto.tap import makeService

        options = Options()
        options.parseOptions(["--port", "bogus:1", "--db", "sqlite::memory:"])
        e = self.assertRaises(SystemExit, makeService, options, MemoryReactorClock())
        self.assertEqual(str(e), "cannot use --port bogus:1: Unknown endpoint type: 'bogus'")

    def test_kdfPoolIsAChildService(self):
        from twisted.internet.testing import MemoryReactorClock

        from chatproto.kdfpool import KDFPool
        from chatproto.tap import makeService

        options = Options()
        options.parseOptions(["--port", "tcp:0", "--db", "sqlite::memory:", "--kdf-threads", "3", "--kdf-queue", "5"])
        top = makeService(options, MemoryReactorClock())
        [pool] = [s for s in top if isinstance(s, KDFPool)]
        self.assertEqual((pool.threads, pool.queue), (3, 5))

    def test_startFailureStopsTheReactor(self):
        from twisted.internet.testing import MemoryReactorClock

        from chatproto.tap import StartFailure

        reactor = MemoryReactorClock()
        failed = StartFailure(reactor, exitStatus=False)
        failed("database unavailable")
        self.assertTrue(failed.failed)
        reactor.run()  # MemoryReactor: runs the when-running calls
        self.assertTrue(reactor.hasStopped)
