"""
The balancer's control plane with a fake clock: option checks, the
all-or-nothing reload, the lean dispatch switch, the status endpoint's
limits and fields, and discovery errors.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from balancer import config as configmod
from balancer import fastpoll, tap
from balancer.config import buildConfig
from balancer.discovery import RedisDiscovery
from balancer.service import BalancerService, StartupFailed
from balancer.status import StatusResource, StatusSite, combine, snapshot


def parse(*argv: str):
    options = tap.Options()
    options.parseOptions(list(argv))
    return options.config


class OptionValueTests(SynchronousTestCase):
    """
    Every malformed value is a usage error naming the option and value.
    """

    def assertUsageError(self, argv, *words):
        with self.assertRaises(usage.UsageError) as c:
            parse(*argv)
        for word in words:
            self.assertIn(word, str(c.exception))

    def test_malformed_values(self):
        long = "9" * 400
        for argv, words in [
            (["--backend", "foo:bar:7220"], ["--backend", "'foo:bar:7220'"]),
            (["--backend", "[::1:7220"], ["--backend", "'[::1:7220'"]),
            (["--backend", "[]:7220"], ["--backend", "'[]:7220'"]),
            (["--backend", "tls:"], ["--backend", "'tls:'"]),
            (["--backend", "tls:localhost:7220:trustRoots=/nonexistent"], ["--backend", "trustRoots"]),
            (["--backend", "tcp:127.0.0.1:7220:timeout=abc"], ["--backend", "timeout=abc"]),
            (["--backend", "h:1", "--connect-timeout", long], ["--connect-timeout", "999"]),
            (["--redis", "redis://127.0.0.1:abc/0"], ["--redis", "'abc'"]),
            (["--backend", "h:1", "--listen", "bogus:1"], ["--listen", "'bogus:1'"]),
            (["--backend", "h:1", "--status", "bogus:1"], ["--status", "'bogus:1'"]),
            (["--backend", "h:1", "--proxy-timeout", "31d"], ["--proxy-timeout", "'31d'"]),
            (["--backend", "h:1", "--workers", "100000"], ["--workers", "'100000'"]),
            (["--backend", "h:1 weight=99999999999"], ["--backend", "weight"]),
        ]:
            self.assertUsageError(argv, *words)

    def test_long_values_are_shortened(self):
        with self.assertRaises(usage.UsageError) as c:
            parse("--backend", "h:1", "--connect-timeout", "9" * 400)
        self.assertLess(len(str(c.exception)), 250)

    def test_non_utf8_config(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"[balancer]\nbackend = h:1\nalgorithm = caf\xe9\n")
        self.assertUsageError(["--config", path], path, "not UTF-8")

    def test_redis_password_not_shown(self):
        with self.assertRaises(usage.UsageError) as c:
            parse("--redis", "redis://u:topsecret@h:abc/0")
        self.assertNotIn("topsecret", str(c.exception))

    def test_bare_port_is_tcp(self):
        cfg = parse("--backend", "h:1", "--listen", "7410", "--status", "7411")
        self.assertEqual((cfg.listen, cfg.status), (["tcp:7410"], "tcp:7411"))

    def test_tries(self):
        self.assertIsNone(parse("--backend", "h:1").tries)
        self.assertEqual(parse("--backend", "h:1", "--tries", "3").tries, 3)
        for bad in ("0", "-1", "abc", "1.5", "1001", "9" * 50):
            self.assertUsageError(["--backend", "h:1", "--tries", bad], "--tries")

    def test_proxy_timeout_and_lean_dispatch(self):
        cfg = parse("--backend", "h:1")
        self.assertEqual((cfg.proxyTimeout, cfg.leanDispatch), (600.0, True))
        cfg = parse("--backend", "h:1", "--proxy-timeout", "0", "--no-lean-dispatch")
        self.assertEqual((cfg.proxyTimeout, cfg.leanDispatch), (0.0, False))
        self.assertEqual(parse("--backend", "h:1", "--proxy-timeout", "90s").proxyTimeout, 90)
        self.assertUsageError(["--backend", "h:1", "--proxy-timeout", "-5"], "--proxy-timeout")
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[balancer]\nbackend = h:1\nlean-dispatch = no\nproxy-timeout = 1m\n")
        cfg = parse("--config", path)
        self.assertEqual((cfg.proxyTimeout, cfg.leanDispatch), (60.0, False))
        self.assertTrue(parse("--config", path, "--lean-dispatch").leanDispatch)
        with open(path, "w") as f:
            f.write("[balancer]\nbackend = h:1\nlean-dispatch = maybe\n")
        self.assertUsageError(["--config", path], "--lean-dispatch", "'maybe'")


def writeIni(path, *lines):
    with open(path, "w") as f:
        f.write("[balancer]\nlisten = tcp:0:interface=127.0.0.1\n" + "\n".join(lines) + "\n")


class ServiceTests(SynchronousTestCase):
    def service(self, *lines, **kw):
        self.path = self.mktemp()
        writeIni(self.path, *lines)
        cfg = configmod.load({}, self.path)
        self.reactor = MemoryReactorClock()
        svc = BalancerService(cfg, self.reactor, {}, handleSighup=False, **kw)
        return svc

    def test_reload_is_all_or_nothing(self):
        svc = self.service("backend = 127.0.0.1:6000", "check-interval = 0")
        writeIni(
            self.path,
            "backend =\n  127.0.0.1:6001\n  tls:localhost:7220:trustRoots=/nonexistent",
            "algorithm = least-conn", "rise = 5", "connect-timeout = 3s", "check-interval = 0",
        )
        self.assertFalse(svc.reload())
        self.assertEqual(svc.selector.algorithm, "round-robin")
        self.assertEqual(svc.pool.checks.rise, 2)
        self.assertEqual(svc.factory.connectTimeout, 1.0)
        self.assertEqual(list(svc.pool.peers), ["127.0.0.1:6000"])
        self.assertEqual((svc.reloads, svc.reloadFailures), (0, 1))
        self.assertIn("trustRoots", svc.lastReloadError)
        data = snapshot(svc)
        self.assertEqual((data["reloads"], data["reload_failures"]), (0, 1))
        self.assertIn("tls:localhost:7220", data["last_reload_error"])
        metrics = StatusResource(svc)
        from prometheus_client import generate_latest

        text = generate_latest(metrics.registry)
        self.assertIn(b"balancer_reload_failures_total 1.0", text)
        # a good file applies everything
        writeIni(self.path, "backend = 127.0.0.1:6001", "algorithm = least-conn",
                 "rise = 5", "proxy-timeout = 30s", "check-interval = 0")
        self.assertTrue(svc.reload())
        self.assertEqual((svc.selector.algorithm, svc.pool.checks.rise), ("least-conn", 5))
        self.assertEqual(svc.factory.proxyTimeout, 30.0)
        self.assertEqual(svc.reloads, 1)

    def test_proxy_timeout_from_start_and_reload(self):
        """
        The factory gets C{--proxy-timeout} when it is built and again on
        every reload.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[balancer]\nbackend = 127.0.0.1:6000\nproxy-timeout = 30s\n")
        svc = BalancerService(
            configmod.load({"check-interval": "0"}, path), MemoryReactorClock(),
            handleSighup=False,
        )
        self.assertEqual(svc.factory.idleSweep.timeout, 30.0)
        with open(path, "w") as f:
            f.write("[balancer]\nbackend = 127.0.0.1:6000\nproxy-timeout = 2m\n")
        self.assertTrue(svc.reload())
        self.assertEqual(svc.factory.idleSweep.timeout, 120.0)

    def test_reload_rolls_back_when_applying_fails(self):
        svc = self.service("backend = 127.0.0.1:6000", "check-interval = 0")
        writeIni(self.path, "backend = 127.0.0.1:6001", "algorithm = least-conn",
                 "check-interval = 0")

        def broken(source, specs):
            if any(s.address == "127.0.0.1:6001" for s in specs):
                raise RuntimeError("pool refused")
            original(source, specs)

        original = svc.pool.setSource
        svc.pool.setSource = broken
        self.assertFalse(svc.reload())
        self.assertEqual(svc.selector.algorithm, "round-robin")
        self.assertEqual(svc.lastReloadError, "pool refused")
        self.assertEqual(list(svc.pool.peers), ["127.0.0.1:6000"])
        self.flushLoggedErrors(RuntimeError)

    def test_lean_dispatch_installed_in_start_and_removed_in_stop(self):
        calls = []
        self.patch(fastpoll, "install", lambda r: calls.append(("install", r)) or True)
        had = hasattr(fastpoll, "uninstall")
        old = getattr(fastpoll, "uninstall", None)
        fastpoll.uninstall = lambda r: calls.append(("uninstall", r))
        self.addCleanup(lambda: setattr(fastpoll, "uninstall", old) if had
                        else delattr(fastpoll, "uninstall"))
        svc = self.service("backend = 127.0.0.1:6000", "check-interval = 0")
        self.assertEqual(calls, [])  # not at construction
        svc.startService()
        self.assertEqual(calls, [("install", self.reactor)])
        self.successResultOf(svc.stopService())
        self.assertEqual(calls, [("install", self.reactor), ("uninstall", self.reactor)])

    def test_no_lean_dispatch(self):
        calls = []
        self.patch(fastpoll, "install", lambda r: calls.append(r))
        svc = self.service("backend = 127.0.0.1:6000", "check-interval = 0", "lean-dispatch = off")
        svc.startService()
        self.successResultOf(svc.stopService())
        self.assertEqual(calls, [])

    def test_make_service_does_not_install(self):
        calls = []
        self.patch(fastpoll, "install", lambda r: calls.append(r))
        options = tap.Options()
        options.parseOptions(["--backend", "127.0.0.1:6000"])
        tap.makeService(options, MemoryReactorClock())
        self.assertEqual(calls, [])

    def test_listen_failure_is_startup_failed(self):
        import socket

        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        self.patch(fastpoll, "install", lambda r: False)
        svc = self.service("backend = 127.0.0.1:6000", "check-interval = 0",
                           "status = tcp:0:interface=127.0.0.1")
        svc.config.listen = ["tcp:0:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1"]
        with self.assertRaises(StartupFailed) as c:
            svc.startService()
        self.assertEqual(
            str(c.exception),
            f"cannot listen on tcp:{port}:interface=127.0.0.1: Address already in use",
        )
        self.assertIsInstance(c.exception, SystemExit)
        # the listener made before the failure is closed again
        self.assertEqual((svc.ports, svc.proxyPorts, svc.statusPort), ([], [], None))
        self.assertFalse(svc.running)


class FakeBalancer:
    def __init__(self, reactor):
        self.path = None
        svc = BalancerService(
            buildConfig({"backend": ["127.0.0.1:6000"], "check-interval": "0"}), reactor,
            handleSighup=False,
        )
        self.svc = svc


class StatusLimitTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.svc = FakeBalancer(self.reactor).svc
        self.site = StatusSite(self.svc, maxConnections=2, headerTimeout=5)

    def connect(self):
        proto = self.site.buildProtocol(None)
        if proto is None:
            return None, None
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_post_gets_405_without_reading_the_body(self):
        proto, t = self.connect()
        rendered = []
        self.patch(StatusResource, "render", lambda self, request: rendered.append(request))
        proto.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 52428800\r\n\r\n" + b"x" * 65536)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"))
        self.assertIn(b"Allow: GET, HEAD\r\n", t.value())
        self.assertEqual(t.producerState, "paused")
        self.assertTrue(t.disconnecting)
        self.assertEqual(rendered, [])
        self.assertEqual(proto.requests, [])  # no request object: no body spooled

    def test_get_still_works(self):
        proto, t = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = t.value().partition(b"\r\n\r\n")
        self.assertIn(b"200 OK", head)
        self.assertIn(b"connection: close", head.lower())
        self.assertIn(b'"reload_failures": 0', body)
        self.assertTrue(t.disconnecting)  # one request per connection

    def test_proxy_timeout_fields(self):
        """
        The status JSON and C{/metrics} show the proxy timeout in force and
        how many connections it closed.
        """
        self.svc.factory.idleSweep.expired = 3
        proto, t = self.connect()
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        body = json.loads(t.value().partition(b"\r\n\r\n")[2])
        self.assertEqual((body["proxy_timeout"], body["proxy_timeout_closed"]), (600.0, 3))
        proto, t = self.connect()
        proto.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"\nbalancer_proxy_timeout_seconds 600.0\n", t.value())
        self.assertIn(b"\nbalancer_proxy_timeout_closed_connections_total 3.0\n", t.value())

    def test_slow_headers_are_cut(self):
        proto, t = self.connect()
        for _ in range(4):
            proto.dataReceived(b"X")
            self.reactor.advance(1)
        self.assertFalse(t.disconnecting)
        self.reactor.advance(1.1)
        self.assertTrue(t.disconnecting or getattr(t, "aborting", False) or not t.connected)

    def test_headers_in_time_cancel_the_timer(self):
        proto, t = self.connect()
        proto.dataReceived(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", t.value())
        self.assertEqual(
            [c for c in self.reactor.getDelayedCalls() if c.func == proto._headersTooSlow], []
        )

    def test_connection_cap(self):
        (p1, _), (p2, _) = self.connect(), self.connect()
        self.assertIsNotNone(p1)
        self.assertIsNotNone(p2)
        self.assertEqual(self.connect(), (None, None))
        self.assertEqual(self.site.refused, 1)
        p1.connectionLost(None)
        p3, _ = self.connect()
        self.assertIsNotNone(p3)

    def test_combine_workers(self):
        own = {"pid": 1, "accepted": 2, "rejected": 0, "connect_failures": 1, "active": 1,
               "proxy_timeout_closed": 4}
        w = {"pid": 2, "accepted": 3, "rejected": 1, "connect_failures": 0, "active": 2,
             "proxy_timeout_closed": 1}
        data = combine(own, [(1, 2, w), (2, 3, None)])
        self.assertEqual(data["total"], {"processes": 3, "accepted": 5, "rejected": 1,
                                         "connect_failures": 1, "active": 3,
                                         "proxy_timeout_closed": 5})
        self.assertEqual([e.get("pid") for e in data["workers"]], [1, 2, 3])
        self.assertEqual(data["workers"][2]["error"], "no answer")


class DiscoveryErrorTests(SynchronousTestCase):
    def test_hung_poll_is_an_error_with_time_and_reason(self):
        clock = MemoryReactorClock()
        d = RedisDiscovery(clock, "redis://u:topsecret@127.0.0.1:1/0", "p:", 1.0,
                           lambda specs, logins: None)

        class Hung:
            def smembers(self, key):
                return defer.Deferred()

        d.conn = Hung()
        clock.advance(100)
        polled = d._pollLogged()
        clock.advance(d.pollTimeout())
        self.successResultOf(polled)
        self.assertEqual((d.polls, d.errors, d.consecutiveErrors), (0, 1, 1))
        self.assertEqual(d.lastError, "no answer from Redis within 2s")
        self.assertEqual(d.lastErrorTime, 102)
        self.assertEqual(d.redactedURL, "redis://u:***@127.0.0.1:1/0")

        class Works:
            def smembers(self, key):
                return defer.succeed(set())

        d.conn = Works()
        self.successResultOf(d._pollLogged())
        self.assertEqual((d.polls, d.errors, d.consecutiveErrors), (1, 1, 0))
        self.assertEqual(d.lastError, "no answer from Redis within 2s")  # kept for the record

    def test_status_shows_discovery(self):
        clock = MemoryReactorClock()
        svc = BalancerService(
            buildConfig({"redis": "redis://u:topsecret@127.0.0.1:1/0"}), clock,
            handleSighup=False,
        )
        svc.discovery.errors = 3
        svc.discovery.lastError = "boom"
        data = snapshot(svc)["discovery"]
        self.assertEqual((data["errors"], data["last_error"]), (3, "boom"))
        self.assertNotIn("topsecret", json.dumps(data))

class WatchParentTests(SynchronousTestCase):
    def test_fallback_watch_stops_the_worker(self):
        import os

        from balancer import workers

        self.patch(workers, "_setParentDeathSignal", lambda signum: False)
        parent = [4242]
        self.patch(os, "getppid", lambda: parent[0])
        reactor = MemoryReactorClock()
        loop = workers.watchParent(reactor, 4242, interval=1.0)
        self.assertIsNotNone(loop)
        for f, args, kwargs in reactor.whenRunningHooks:
            f(*args, **kwargs)
        reactor.advance(1)
        self.assertFalse(reactor.hasStopped)
        parent[0] = 1  # the parent died: we were reparented
        reactor.advance(1)
        self.assertTrue(reactor.hasStopped)
        self.assertFalse(loop.running)

    def test_parent_gone_before_the_watch(self):
        import os

        from balancer import workers

        self.patch(workers, "_setParentDeathSignal", lambda signum: True)
        self.patch(os, "getppid", lambda: 1)
        reactor = MemoryReactorClock()
        self.assertIsNone(workers.watchParent(reactor, 4242))
        self.assertEqual([f for f, _, _ in reactor.whenRunningHooks], [reactor.stop])
