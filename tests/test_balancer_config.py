"""
Options, ini file and backend line parsing; the twistd plugin.
"""

from __future__ import annotations

import textwrap

from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from balancer import tap
from balancer.config import (
    BackendSpec,
    ConfigError,
    buildConfig,
    normalizeAddress,
    parseBackend,
    parseBytes,
    parseDuration,
)
from balancer.workers import workerArgv


class ParseTests(SynchronousTestCase):
    def test_durations(self):
        self.assertEqual(parseDuration("10s"), 10.0)
        self.assertEqual(parseDuration("30"), 30.0)
        self.assertEqual(parseDuration("500ms"), 0.5)
        self.assertEqual(parseDuration("0.05"), 0.05)
        self.assertEqual(parseDuration("2m"), 120.0)
        self.assertRaises(ConfigError, parseDuration, "ten")

    def test_backend_defaults_match_nginx(self):
        self.assertEqual(
            parseBackend("127.0.0.1:6000"),
            BackendSpec("127.0.0.1:6000", weight=1, maxFails=1, failTimeout=10.0),
        )

    def test_backend_full_line(self):
        spec = parseBackend("127.0.0.1:6000 weight=5 max_fails=3 fail_timeout=30s backup")
        self.assertEqual(
            (spec.weight, spec.maxFails, spec.failTimeout, spec.backup, spec.down),
            (5, 3, 30.0, True, False),
        )
        self.assertTrue(parseBackend("h:1 down").down)

    def test_backend_errors(self):
        for line in ("127.0.0.1", "h:1 weight=0", "h:1 weight=x", "h:1 bogus=1", "h:1 fast",
                     "h:99999"):
            self.assertRaises(ConfigError, parseBackend, line)

    def test_addresses(self):
        self.assertEqual(normalizeAddress("10.0.0.1:6000"), ("10.0.0.1", 6000))
        self.assertEqual(normalizeAddress("[::1]:6000"), ("::1", 6000))
        self.assertEqual(normalizeAddress("tcp:host=h:port=7"), ("h", 7))
        self.assertEqual(normalizeAddress("tcp:h:7"), ("h", 7))
        self.assertIsNone(normalizeAddress("tls:chat.example.com:6000"))
        self.assertIsNone(normalizeAddress("tcp:host=h:port=7:timeout=3"))

    def test_escapes(self):
        self.assertEqual(parseBytes(r"PING\n"), b"PING\n")
        self.assertIsNone(parseBytes(""))

    def test_validation(self):
        self.assertRaises(ConfigError, buildConfig, {})
        self.assertRaises(ConfigError, buildConfig, {"backend": ["h:1"], "algorithm": "x"})
        self.assertRaises(ConfigError, buildConfig, {"backend": ["h:1", "h:1 weight=2"]})
        self.assertRaises(ConfigError, buildConfig, {"redis": "http://x"})
        cfg = buildConfig({"redis": "redis://127.0.0.1:6379/0"})
        self.assertEqual(cfg.backends, [])


class OptionsTests(SynchronousTestCase):
    def parse(self, argv):
        options = tap.Options()
        options.parseOptions(argv)
        return options

    def test_defaults(self):
        cfg = self.parse(["--backend", "127.0.0.1:6000"]).config
        self.assertEqual(cfg.listen, ["tcp:8000"])
        self.assertEqual(cfg.algorithm, "round-robin")
        self.assertEqual(
            (cfg.connectTimeout, cfg.tries, cfg.checkInterval, cfg.rise, cfg.fall),
            (1.0, None, 2.0, 2, 3),
        )
        self.assertEqual((cfg.redisPrefix, cfg.discoveryInterval), ("chat:", 1.0))
        self.assertIsNone(cfg.checkSend)

    def test_argv(self):
        cfg = self.parse([
            "--listen", "tcp:9000", "--listen", "tcp:9001",
            "--backend", "127.0.0.1:6000 weight=2", "--backend", "127.0.0.1:6001",
            "--algorithm", "least-conn", "--connect-timeout", "500ms", "--tries", "2",
            "--check-interval", "1s", "--rise", "3", "--fall", "4",
            "--check-send", r"PING\n", "--check-expect", "PONG",
            "--proxy-protocol", "v2", "--status", "tcp:8081", "--drain-timeout", "30s",
        ]).config
        self.assertEqual(cfg.listen, ["tcp:9000", "tcp:9001"])
        self.assertEqual([b.weight for b in cfg.backends], [2, 1])
        self.assertEqual(
            (cfg.algorithm, cfg.connectTimeout, cfg.tries, cfg.checkInterval),
            ("least-conn", 0.5, 2, 1.0),
        )
        self.assertEqual((cfg.rise, cfg.fall, cfg.checkSend, cfg.checkExpect),
                         (3, 4, b"PING\n", b"PONG"))
        self.assertEqual((cfg.proxyProtocol, cfg.status, cfg.drainTimeout),
                         ("v2", "tcp:8081", 30.0))

    def test_bad_option_is_usage_error(self):
        self.assertRaises(usage.UsageError, self.parse,
                          ["--backend", "h:1", "--proxy-protocol", "v3"])

    def writeIni(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def test_ini_and_command_line_wins(self):
        path = self.writeIni("""
            [balancer]
            listen = tcp:7000
            backend =
                127.0.0.1:6000 weight=1 max_fails=3 fail_timeout=30s
                127.0.0.1:6001 weight=2
            algorithm = least-conn
            check_interval = 5s
            check-send = PING\\n
            rise = 4
        """)
        options = self.parse(["--config", path, "--algorithm", "least-logins", "--rise", "1"])
        cfg = options.config
        self.assertEqual(cfg.listen, ["tcp:7000"])
        self.assertEqual([b.address for b in cfg.backends], ["127.0.0.1:6000", "127.0.0.1:6001"])
        self.assertEqual(cfg.backends[0].maxFails, 3)
        self.assertEqual(cfg.algorithm, "least-logins")  # command line wins
        self.assertEqual(cfg.rise, 1)  # command line wins
        self.assertEqual(cfg.checkInterval, 5.0)  # from the file
        self.assertEqual(cfg.checkSend, b"PING\n")
        self.assertEqual(cfg.fall, 3)  # default
        self.assertEqual(cfg.configFile, path)
        # a repeatable option on the command line replaces the file's list
        cfg = self.parse(["--config", path, "--backend", "127.0.0.1:7777"]).config
        self.assertEqual([b.address for b in cfg.backends], ["127.0.0.1:7777"])

    def test_ini_unknown_key(self):
        path = self.writeIni("[balancer]\nbackend = h:1\nfrobnicate = yes\n")
        self.assertRaises(usage.UsageError, self.parse, ["--config", path])

    def test_example_ini_parses(self):
        import os

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cfg = self.parse(["--config", os.path.join(here, "etc", "balancer.ini")]).config
        self.assertEqual([b.address for b in cfg.backends], ["127.0.0.1:6000", "127.0.0.1:6001"])
        self.assertEqual((cfg.checkSend, cfg.checkExpect), (b"PING\n", b"PONG"))

    def test_make_service(self):
        options = self.parse(["--backend", "127.0.0.1:6000", "--workers", "2"])
        top = tap.makeService(options, MemoryReactorClock())
        names = [type(s).__name__ for s in top]
        self.assertEqual(names, ["BalancerService", "WorkerMonitor"])
        self.assertTrue(list(top)[0].reusePort)
        monitor = list(top)[1]
        self.assertIs(list(top)[0].workers, monitor)
        self.assertEqual(sorted(monitor.argvs), [1])

    def test_workerArgv(self):
        argv = workerArgv(["--config", "x.ini", "--workers", "4", "--status=tcp:1"], 2)
        self.assertEqual(argv[-5:], ["balancer", "--config", "x.ini", "--worker-index", "2"])
        # the parent's twistd options go before the subcommand; workers log
        # to their standard output, which the parent logs
        argv = workerArgv(["--workers=2"], 1, ["--reactor=poll"])
        self.assertEqual(argv[argv.index("balancer") - 1], "--reactor=poll")
        self.assertIn("--logfile=-", argv[: argv.index("balancer")])
        self.assertNotIn("--workers=2", argv)


class PluginTests(SynchronousTestCase):
    def test_plugin_found(self):
        from twisted import plugins

        names = [p.tapname for p in getPlugins(IServiceMaker, plugins)]
        self.assertIn("balancer", names)


class ReusePortTests(SynchronousTestCase):
    def test_two_listeners_share_a_port(self):
        from twisted.internet import reactor

        from balancer.listen import SocketEndpoint, serverEndpoint
        from twisted.internet.protocol import Factory

        first = self.successResultOf(
            SocketEndpoint(reactor, 0, "127.0.0.1").listen(Factory())
        )
        self.addCleanup(first.stopListening)
        port = first.getHost().port
        second = self.successResultOf(
            serverEndpoint(reactor, f"tcp:{port}:interface=127.0.0.1", True, 10).listen(Factory())
        )
        self.addCleanup(second.stopListening)
        self.assertEqual(second.getHost().port, port)
        # a lean listener (--workers with a tcp: listener) shares it too
        third = self.successResultOf(
            serverEndpoint(
                reactor, f"tcp:{port}:interface=127.0.0.1", True, 10, lean=True
            ).listen(Factory())
        )
        self.addCleanup(third.stopListening)
        self.assertEqual(third.getHost().port, port)
