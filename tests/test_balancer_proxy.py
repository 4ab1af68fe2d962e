"""
End-to-end tests of the balancer on loopback: real backends, real clients.
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from balancer.config import BalancerConfig
from balancer.earlydata import HOLD_LIMIT

from tests.balancer_helpers import (
    EchoBackend,
    buffered,
    connect,
    makeConfig,
    roundtrip,
    startBackends,
    startBalancer,
    waitFor,
)


def freePort() -> int:
    """
    A loopback port with nothing listening on it (connections get refused).
    """
    p = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
    num = p.getHost().port
    p.stopListening()
    return num


class DistributionTests(TestCase):
    @defer.inlineCallbacks
    def test_weights_across_three_backends(self):
        """
        60 sequential clients over weights 3,2,1 land 30/20/10, and every
        client gets its bytes echoed.
        """
        a, b, c = startBackends(self, "a", "b", "c")
        cfg = makeConfig(
            [f"{a.address} weight=3", f"{b.address} weight=2", f"{c.address} weight=1"],
            checkSend=b"PING\n", checkExpect=b"PONG",
        )
        svc = yield startBalancer(self, cfg)
        for i in range(60):
            data = yield roundtrip(svc.port, b"msg%d" % i)
            self.assertEqual(data, b"msg%d" % i)
        self.assertEqual((a.served, b.served, c.served), (30, 20, 10))
        peers = {p.key: p for p in svc.pool.allPeers()}
        self.assertEqual(peers[a.address].total, 30)
        yield waitFor(lambda: a.checks > 0 and b.checks > 0 and c.checks > 0)

    @defer.inlineCallbacks
    def test_least_conn_spreads_concurrent_clients(self):
        a, b = startBackends(self, "a", "b")
        cfg = makeConfig([a.address, b.address], algorithm="least-conn")
        svc = yield startBalancer(self, cfg)
        clients = []
        for _ in range(6):
            cl = yield connect(svc.port)
            cl.transport.write(b"x")
            clients.append(cl)
        yield waitFor(lambda: a.served + b.served == 6)
        self.assertEqual((a.served, b.served), (3, 3))
        for cl in clients:
            cl.transport.loseConnection()
        yield defer.gatherResults([cl.done for cl in clients])


class FailureTests(TestCase):
    twistedPath = False

    @defer.inlineCallbacks
    def test_connect_refused_retries_next(self):
        """
        A refused backend is skipped for the client (retry) and then marked
        failed (max_fails=1): every client is served by the live one.
        """
        (live,) = startBackends(self, "live")
        dead = f"127.0.0.1:{freePort()}"
        cfg = makeConfig([dead, live.address], checkInterval=0)
        svc = yield startBalancer(self, cfg)
        for i in range(4):
            data = yield roundtrip(svc.port, b"r%d" % i)
            self.assertEqual(data, b"r%d" % i)
        self.assertEqual(live.served, 4)
        peer = svc.pool.peers[dead]
        self.assertGreaterEqual(peer.failures, 1)
        self.assertFalse(peer.passive.available(reactor.seconds()))
        self.assertEqual(svc.factory.rejected, 0)

    @defer.inlineCallbacks
    def test_no_backend_closes_promptly(self):
        dead = f"127.0.0.1:{freePort()}"
        cfg = makeConfig([dead], checkInterval=60)
        svc = yield startBalancer(self, cfg)
        client = yield connect(svc.port)
        client.transport.write(b"anyone?")
        data = yield client.done
        self.assertEqual(data, b"")
        self.assertEqual(svc.factory.rejected, 1)
        # and the next one is refused without even trying (peer failed)
        data = yield roundtrip(svc.port)
        self.assertEqual(data, b"")
        self.assertEqual(svc.factory.rejected, 2)

    @defer.inlineCallbacks
    def test_killed_backend_leaves_and_returns(self):
        """
        Killing a backend takes it out of rotation within a few check
        intervals; restarting it brings it back after rise checks.
        """
        a, b = startBackends(self, "a", "b")
        cfg = makeConfig(
            [f"{a.address} max_fails=0", f"{b.address} max_fails=0"],
            checkInterval=0.05, rise=2, fall=2,
            checkSend=b"PING\n", checkExpect=b"PONG",
        )
        svc = yield startBalancer(self, cfg)
        peerB = svc.pool.peers[b.address]
        yield waitFor(lambda: peerB.active.health == 3)
        port = b.portnum
        yield b.stop()
        yield waitFor(lambda: peerB.state == "down", timeout=2)
        servedA = a.served
        for _ in range(4):
            data = yield roundtrip(svc.port, b"z")
            self.assertEqual(data, b"z")
        self.assertEqual(a.served, servedA + 4)
        b.start(port)
        yield waitFor(lambda: peerB.state == "up", timeout=2)
        self.assertGreaterEqual(peerB.active.health, 2)
        for _ in range(4):
            yield roundtrip(svc.port, b"y")
        self.assertEqual(b.served, 2)


def hungPort(test) -> int:
    """
    A loopback port whose accept queue is full: connects to it neither
    succeed nor fail (the SYN is dropped), so they time out.
    """
    import socket
    import time

    listener = socket.socket()
    test.addCleanup(listener.close)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.socket()
    test.addCleanup(filler.close)
    filler.connect(listener.getsockname())
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    test.addCleanup(probe.close)
    probe.connect_ex(listener.getsockname())
    time.sleep(0.05)  # the queue (1 entry) is full: the probe's SYN is dropped
    return listener.getsockname()[1]


class RawConnectTests(TestCase):
    """
    Backends with an IP address are connected by L{RawConnect} (a
    hand-made non-blocking connect), not by connectTCP.
    """

    twistedPath = False

    @defer.inlineCallbacks
    def test_success_bytes_flow(self):
        import socket

        from twisted.internet import tcp

        (a,) = startBackends(self, "a")
        svc = yield startBalancer(self, makeConfig([a.address], checkInterval=0))
        client = yield connect(svc.port)
        client.transport.write(b"hello")
        yield waitFor(lambda: bytes(client.data) == b"hello")
        server = next(iter(svc.factory.clients))
        if self.twistedPath:
            bt = server.backend.transport
            self.assertIsInstance(bt, tcp.Server)
            self.assertEqual(bt.getPeer().port, a.portnum)
            self.assertEqual(bt.getHost().host, "127.0.0.1")
            self.assertTrue(bt.getTcpNoDelay())
        else:
            # the raw sockets, both with TCP_NODELAY (the client's inherited
            # from the listening socket)
            for sock in (server.sock, server.backend.sock):
                self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            self.assertEqual(server.backend.sock.getpeername()[1], a.portnum)
            self.assertEqual(server.sock.getpeername()[1], client.transport.getHost().port)
        client.transport.loseConnection()
        yield client.done
        yield waitFor(lambda: not a.conns)

    @defer.inlineCallbacks
    def test_refused_goes_to_next(self):
        (live,) = startBackends(self, "live")
        dead = f"127.0.0.1:{freePort()}"
        svc = yield startBalancer(self, makeConfig([dead, live.address], checkInterval=0))
        for i in range(2):
            data = yield roundtrip(svc.port, b"r%d" % i)
            self.assertEqual(data, b"r%d" % i)
        peer = svc.pool.peers[dead]
        self.assertIn("refused", peer.active.lastError)
        self.assertEqual(peer.conns, 0)
        self.assertEqual(svc.factory.connectFailures, 1)

    @defer.inlineCallbacks
    def test_timeout_goes_to_next(self):
        from balancer.rawconnect import RawConnect

        timedOut = []
        realTimedOut = RawConnect.timedOut
        self.patch(RawConnect, "timedOut", lambda raw: (timedOut.append(raw), realTimedOut(raw)))
        (live,) = startBackends(self, "live")
        hung = f"127.0.0.1:{hungPort(self)}"
        cfg = makeConfig([hung, live.address], checkInterval=0, connectTimeout=0.2)
        svc = yield startBalancer(self, cfg)
        data = yield roundtrip(svc.port, b"slow")
        self.assertEqual(data, b"slow")
        data = yield roundtrip(svc.port, b"fast")
        self.assertEqual(data, b"fast")
        peer = svc.pool.peers[hung]
        self.assertEqual(peer.active.lastError, "connect: timed out")
        self.assertEqual(peer.failures, 1)
        self.assertEqual(peer.conns, 0)
        self.assertEqual(live.served, 2)
        # the hand-made connect's deadline (not connectTCP's) timed it out
        self.assertEqual(len(timedOut), 1)
        self.assertEqual(timedOut[0].sock.fileno(), -1)

    @defer.inlineCallbacks
    def test_immediate_failure_goes_to_next(self):
        """
        A connect() that fails at once (ENETUNREACH) is reported on the
        next reactor turn and the next backend is tried.
        """
        (live,) = startBackends(self, "live")
        cfg = makeConfig(["255.255.255.255:1", live.address], checkInterval=0)
        svc = yield startBalancer(self, cfg)
        data = yield roundtrip(svc.port, b"x")
        self.assertEqual(data, b"x")
        self.assertIn("connect: ", svc.pool.peers["255.255.255.255:1"].active.lastError)

    @defer.inlineCallbacks
    def test_client_leaves_while_connecting(self):
        hung = f"127.0.0.1:{hungPort(self)}"
        cfg = makeConfig([hung], checkInterval=0, connectTimeout=5)
        svc = yield startBalancer(self, cfg)
        client = yield connect(svc.port)
        yield waitFor(lambda: svc.factory.clients)
        server = next(iter(svc.factory.clients))
        raw = server.attempt.connector
        from balancer.rawconnect import RawConnect

        self.assertIsInstance(raw, RawConnect)
        # a reset, not an EOF (an EOF is held until the backend answers)
        client.transport.abortConnection()
        yield client.done
        yield waitFor(lambda: not svc.factory.clients)
        peer = svc.pool.peers[hung]
        self.assertEqual(peer.conns, 0)
        self.assertEqual(raw.sock.fileno(), -1)
        self.assertIsNone(raw.timer)
        self.assertEqual(svc.factory.connectFailures, 0)


class TransparencyTests(TestCase):
    twistedPath = False

    @defer.inlineCallbacks
    def test_large_transfer_and_half_close(self):
        """
        Several MB go through both ways byte for byte; the client's
        half-close reaches the backend, whose echo and EOF come back.
        """
        (a,) = startBackends(self, "a")
        svc = yield startBalancer(self, makeConfig([a.address]))
        payload = os.urandom(6 * 1024 * 1024)
        client = yield connect(svc.port)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        data = yield client.done
        self.assertEqual(len(data), len(payload))
        self.assertEqual(hashlib.sha256(data).digest(), hashlib.sha256(payload).digest())
        self.assertTrue(client.eof)

    @defer.inlineCallbacks
    def test_backend_answers_after_client_eof(self):
        """
        The client's EOF is passed on at once as a half-close: the backend
        still gets to answer after it, then both connections close.
        """
        from tests.balancer_helpers import AnswerAtEOF

        factory = Factory.forProtocol(AnswerAtEOF)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        addr = f"127.0.0.1:{port.getHost().port}"
        svc = yield startBalancer(self, makeConfig([addr], checkInterval=0))
        for _ in range(3):
            data = yield roundtrip(svc.port, b"question")
            self.assertEqual(data, b"got question")
        yield waitFor(lambda: not svc.factory.clients)
        self.assertEqual(svc.pool.peers[addr].conns, 0)

    @defer.inlineCallbacks
    def test_data_before_backend_connect_is_held(self):
        """
        Bytes the client sends before the backend connection is up are
        held (the attempt is not started until they are) and arrive first
        and intact once it is.
        """
        from balancer import attempt as attemptmod
        from balancer import proxy, rawconnect

        realStart = attemptmod.Attempt.start
        started = []
        self.patch(attemptmod.Attempt, "start",
                   lambda attempt, *args: started.append((attempt, args)))
        # no loopback shortcut: the lean client's connect is an Attempt too
        self.patch(proxy, "connectStart",
                   lambda family, addr, loopback=False: rawconnect.connectStart(family, addr))
        (a,) = startBackends(self, "a")
        svc = yield startBalancer(self, makeConfig([a.address], checkInterval=0))
        client = yield connect(svc.port)
        client.transport.write(b"early-")
        client.transport.write(b"bird")
        [(attempt, args)] = yield waitFor(lambda: started)
        proxied = attempt.client
        yield waitFor(lambda: proxied.held is not None and proxied.held.size == 10)
        self.assertEqual((a.received, proxied.peer), (0, None))
        realStart(attempt, *args)
        yield waitFor(lambda: bytes(client.data) == b"early-bird")
        self.assertIsNone(proxied.held)
        self.assertEqual(a.received, 10)
        client.transport.loseConnection()
        yield client.done

    @defer.inlineCallbacks
    def test_slow_reader_backpressure(self):
        """
        A client that stops reading makes the balancer stop reading from the
        backend: its buffers stay bounded.
        """
        big = EchoBackend("big")

        class Flood(Protocol):
            def connectionMade(self):
                big.conns.add(self)
                self.sent = 0
                self.transport.registerProducer(self, True)
                self.paused = False
                self.resumeProducing()

            def resumeProducing(self):
                self.paused = False
                while not self.paused and self.sent < 64 * 1024 * 1024:
                    self.transport.write(b"x" * 65536)
                    self.sent += 65536

            def pauseProducing(self):
                self.paused = True

            def stopProducing(self):
                self.paused = True

            def connectionLost(self, reason=None):
                big.conns.discard(self)

        big.protocol = Flood
        big.start()
        self.addCleanup(big.stop)
        svc = yield startBalancer(self, makeConfig([big.address], checkInterval=60))
        client = yield connect(svc.port)
        client.transport.pauseProducing()
        yield waitFor(lambda: svc.factory.clients and next(iter(svc.factory.clients)).backend)
        # let the pipes fill up
        flood = yield waitFor(lambda: next(iter(big.conns), None))
        yield waitFor(lambda: flood.paused)
        server = next(iter(svc.factory.clients))
        self.assertLess(buffered(server), 1024 * 1024)
        self.assertLess(flood.sent, 32 * 1024 * 1024)
        client.transport.resumeProducing()
        yield waitFor(lambda: len(client.data) > 4 * 1024 * 1024)
        client.transport.loseConnection()
        yield client.done


class _PeerReporter(Protocol):
    def dataReceived(self, data):
        # the PROXY header has been parsed once data arrives
        peer = self.transport.getPeer()
        self.transport.write(f"{peer.host} {peer.port}\n".encode())
        self.factory.seen.append(peer)


class ProxyProtocolTests(TestCase):
    twistedPath = False

    @defer.inlineCallbacks
    def _check(self, version):
        factory = Factory.forProtocol(_PeerReporter)
        factory.seen = []
        endpoint = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
        port = yield endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        addr = f"127.0.0.1:{port.getHost().port}"
        cfg = makeConfig([addr], proxyProtocol=version, checkInterval=0.05)
        svc = yield startBalancer(self, cfg)
        client = yield connect(svc.port)
        client.transport.write(b"who am I?\n")
        local = client.transport.getHost()
        line = yield waitFor(lambda: bytes(client.data).endswith(b"\n") and bytes(client.data))
        self.assertEqual(line, f"{local.host} {local.port}\n".encode())
        client.transport.loseConnection()
        yield client.done
        # health checks got through the haproxy: listener too
        peer = svc.pool.peers[addr]
        yield waitFor(lambda: peer.active.lastResult is True)
        self.assertEqual(peer.state, "up")

    def test_v1(self):
        return self._check("v1")

    def test_v2(self):
        return self._check("v2")


class StatusTests(TestCase):
    @defer.inlineCallbacks
    def test_json_and_metrics(self):
        import json

        from twisted.web.client import Agent, readBody

        (a,) = startBackends(self, "a")
        cfg = makeConfig([a.address], status="tcp:0:interface=127.0.0.1")
        svc = yield startBalancer(self, cfg)
        yield roundtrip(svc.port)
        sport = svc.statusPort.getHost().port
        agent = Agent(reactor)
        resp = yield agent.request(b"GET", b"http://127.0.0.1:%d/" % sport)
        body = yield readBody(resp)
        data = json.loads(body)
        self.assertEqual(data["backends"][0]["address"], a.address)
        self.assertEqual(data["backends"][0]["total"], 1)
        self.assertEqual(data["backends"][0]["state"], "up")
        resp = yield agent.request(b"GET", b"http://127.0.0.1:%d/metrics" % sport)
        body = yield readBody(resp)
        self.assertIn(b'balancer_backend_connections_total{backend="%s"' % a.address.encode(), body)
        self.assertIn(b"balancer_accepted_connections_total 1.0", body)

        yield agent._pool.closeCachedConnections()


class LeanPathTests(TestCase):
    """
    What is special to the lean path (L{balancer.lean}); the tests above
    run on it and, in their C{Twisted...} subclasses, on Twisted's.
    """

    @defer.inlineCallbacks
    def test_tcp_listener_is_lean(self):
        from balancer.lean import LeanClient, LeanPort

        (a,) = startBackends(self, "a")
        svc = yield startBalancer(self, makeConfig([a.address], checkInterval=0))
        self.assertIsInstance(svc.proxyPorts[0], LeanPort)
        client = yield connect(svc.port)
        client.transport.write(b"x")
        yield waitFor(lambda: bytes(client.data) == b"x")
        [server] = svc.factory.clients
        self.assertIsInstance(server, LeanClient)
        self.assertEqual(svc.factory.accepted, 1)
        self.assertEqual(svc.pool.peers[a.address].conns, 1)
        client.transport.loseConnection()
        yield client.done
        yield waitFor(lambda: not svc.factory.clients)
        self.assertEqual(svc.pool.peers[a.address].conns, 0)

    @defer.inlineCallbacks
    def test_loopback_backend_linked_at_once(self):
        """
        On loopback the kernel completes the handshake inside connect():
        the backend socket is linked to the lean client at once, without
        an Attempt, a RawConnect or a connect deadline.
        """
        from balancer import attempt as attemptmod

        attempts = []
        realInit = attemptmod.Attempt.__init__
        self.patch(attemptmod.Attempt, "__init__",
                   lambda attempt, *args: (attempts.append(attempt), realInit(attempt, *args)))
        (a,) = startBackends(self, "a")
        svc = yield startBalancer(self, makeConfig([a.address], checkInterval=0))
        data = yield roundtrip(svc.port, b"at once")
        self.assertEqual(data, b"at once")
        self.assertEqual(attempts, [])
        self.assertEqual(list(svc.factory.deadlines.queue), [])
        self.assertEqual((svc.pool.peers[a.address].total, a.served), (1, 1))

    @defer.inlineCallbacks
    def test_host_name_backend_hands_over_to_twisted(self):
        """
        A backend given by host name is connected by connectTCP: the client
        is handed over to the Twisted path, bytes and counters intact.
        """
        from balancer.sides import ServerSide

        (a,) = startBackends(self, "a")
        addr = f"localhost:{a.portnum}"
        svc = yield startBalancer(self, makeConfig([addr], checkInterval=0))
        client = yield connect(svc.port)
        client.transport.write(b"by name")
        yield waitFor(lambda: bytes(client.data) == b"by name")
        [server] = svc.factory.clients
        self.assertIsInstance(server, ServerSide)
        data = yield roundtrip(svc.port, b"again")
        self.assertEqual(data, b"again")
        client.transport.loseConnection()
        yield client.done
        yield waitFor(lambda: not svc.factory.clients)
        self.assertEqual((svc.factory.accepted, svc.pool.peers[addr].total), (2, 2))

    @defer.inlineCallbacks
    def test_early_data_past_hold_limit_survives_a_timeout(self):
        """
        A client sends 1 MiB and its EOF at once while the first backend
        does not answer: the balancer holds a bounded amount, stops reading,
        and after the connect timeout delivers everything to the next
        backend, whose echo and EOF come back.
        """
        from balancer.lean import READ_SIZE

        (live,) = startBackends(self, "live")
        hung = f"127.0.0.1:{hungPort(self)}"
        cfg = makeConfig([hung, live.address], checkInterval=0, connectTimeout=0.3)
        svc = yield startBalancer(self, cfg)
        payload = os.urandom(1024 * 1024)
        client = yield connect(svc.port)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        server = yield waitFor(lambda: next(iter(svc.factory.clients), None))
        yield waitFor(lambda: server.held is not None and server.held.size > HOLD_LIMIT)
        self.assertFalse(server.reading)
        self.assertLessEqual(server.held.size, HOLD_LIMIT + READ_SIZE)
        data = yield client.done
        self.assertEqual(hashlib.sha256(data).digest(), hashlib.sha256(payload).digest())
        self.assertTrue(client.eof)
        self.assertEqual(svc.pool.peers[hung].failures, 1)


class TwistedFailureTests(FailureTests):
    """
    The same through the Twisted transports (used for ssl: listeners).
    """

    twistedPath = True


class TwistedRawConnectTests(RawConnectTests):
    twistedPath = True


class TwistedTransparencyTests(TransparencyTests):
    twistedPath = True


class TwistedProxyProtocolTests(ProxyProtocolTests):
    twistedPath = True


class ConfigObjectTests(TestCase):
    def test_make_config_type(self):
        cfg = makeConfig(["127.0.0.1:1"])
        self.assertIsInstance(cfg, BalancerConfig)
        self.assertEqual(cfg.backends[0].address, "127.0.0.1:1")
