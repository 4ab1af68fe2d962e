"""
The proxy timeout (nginx's proxy_timeout) on both data paths, the
preference for checked backends, and the pool's drain timer, all on a fake
clock.
"""

from __future__ import annotations

import socket

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from balancer.config import BalancerConfig, parseBackend
from balancer.idletimeout import STEPS
from balancer.pool import CheckSettings, Pool
from balancer.proxy import DEFAULT_PROXY_TIMEOUT, BalancerFactory
from balancer.selection import Peer, Selector

TIMEOUT = 10.0


def _factory(timeout: float = TIMEOUT) -> tuple[BalancerFactory, MemoryReactorClock, Peer]:
    reactor = MemoryReactorClock()
    selector = Selector(reactor)
    peer = Peer("127.0.0.1:7000")
    peer.extra["tcp"] = ("127.0.0.1", 7000)
    selector.peers.append(peer)
    factory = BalancerFactory(reactor, selector, proxyTimeout=timeout)
    return factory, reactor, peer


class TwistedPathTimeoutTests(SynchronousTestCase):
    """
    A L{ServerSide} and its L{BackendSide} on string transports.
    """

    def proxied(self, timeout: float = TIMEOUT):
        factory, reactor, peer = _factory(timeout)
        factory.rawConnect = False  # connectTCP, recorded by the fake reactor
        server = factory.buildProtocol(None)
        client = StringTransport()
        server.makeConnection(client)
        [(_, _, attempt, _, _)] = reactor.tcpClients
        backend = attempt.buildProtocol(None)
        backendTransport = StringTransport()
        backend.makeConnection(backendTransport)
        self.assertIs(server.backend, backend)
        return factory, reactor, server, client, backendTransport

    def test_silent_backend_closes_client(self):
        """
        A backend that accepts and never answers: the client is closed once
        nothing has moved for the timeout (at most a quarter more), not
        before.
        """
        factory, reactor, server, client, backendTransport = self.proxied()
        server.dataReceived(b"request")
        reactor.advance(TIMEOUT * 0.99)
        self.assertFalse(client.disconnecting)
        for _ in range(STEPS + 1):
            reactor.advance(TIMEOUT / STEPS)
        self.assertTrue(client.disconnecting)
        self.assertEqual(backendTransport.value(), b"request")
        self.assertEqual(factory.idleSweep.expired, 1)

    def test_traffic_keeps_it_open(self):
        """
        Bytes in either direction, less than the timeout apart, keep the
        connection open for many timeouts.
        """
        factory, reactor, server, client, backendTransport = self.proxied()
        for i in range(20):
            reactor.advance(TIMEOUT * 0.6)
            if i % 2:
                server.dataReceived(b"ping")
            else:
                server.backend.dataReceived(b"pong")
        self.assertFalse(client.disconnecting)
        self.assertEqual(client.value(), b"pong" * 10)

    def test_zero_is_off(self):
        factory, reactor, server, client, _ = self.proxied(timeout=0)
        reactor.advance(TIMEOUT * 100)
        self.assertFalse(client.disconnecting)
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_default_is_nginx(self):
        factory, _, _ = _factory()
        self.assertEqual(BalancerFactory(MemoryReactorClock(), Selector(Clock())).proxyTimeout,
                         DEFAULT_PROXY_TIMEOUT)
        self.assertEqual(DEFAULT_PROXY_TIMEOUT, 600.0)

    def test_sweep_stops_without_clients(self):
        """
        The sweep timer does not outlive the last client.
        """
        factory, reactor, server, client, _ = self.proxied()
        server.connectionLost(None)
        reactor.advance(TIMEOUT)
        self.assertEqual(reactor.getDelayedCalls(), [])


class LeanPathTimeoutTests(SynchronousTestCase):
    """
    A L{LeanClient} and its backend half on socket pairs.
    """

    def pair(self):
        app, lb = socket.socketpair()
        self.addCleanup(app.close)
        self.addCleanup(lb.close)
        lb.setblocking(False)
        app.setblocking(False)
        return app, lb

    def proxied(self):
        from balancer.lean import LeanClient

        factory, reactor, peer = _factory()
        factory.dispatch = lambda client: None
        cApp, cLb = self.pair()
        client = LeanClient(factory, cLb, ("127.0.0.1", 1))
        factory.accept(client)
        bApp, bLb = self.pair()
        peer.connectionStarted()
        from tests.test_balancer_fastpath import connected

        client.backendConnected(connected(factory, bLb), peer)
        return factory, reactor, peer, client, cApp, bApp

    def test_silent_backend_closes_client(self):
        factory, reactor, peer, client, cApp, bApp = self.proxied()
        cApp.send(b"request")
        client.doRead()
        self.assertEqual(bApp.recv(100), b"request")
        reactor.advance(TIMEOUT * 0.99)
        self.assertFalse(client.closed)
        for _ in range(STEPS + 1):
            reactor.advance(TIMEOUT / STEPS)
        self.assertTrue(client.closed)
        self.assertEqual(cApp.recv(100), b"")  # the client sees the close
        self.assertEqual((peer.conns, factory.clients), (0, set()))
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_traffic_keeps_it_open(self):
        factory, reactor, peer, client, cApp, bApp = self.proxied()
        for i in range(20):
            reactor.advance(TIMEOUT * 0.6)
            if i % 2:
                cApp.send(b"ping")
                client.doRead()
                self.assertEqual(bApp.recv(100), b"ping")
            else:
                bApp.send(b"pong")
                client.backend.doRead()
                self.assertEqual(cApp.recv(100), b"pong")
        self.assertFalse(client.closed)
        self.assertEqual(factory.idleSweep.expired, 0)


class CheckedFirstTests(SynchronousTestCase):
    """
    A backend whose first health check has not completed is not preferred
    over one that has passed.
    """

    def setUp(self):
        self.clock = Clock()
        self.selector = Selector(self.clock)
        self.checked, self.fresh = Peer("checked"), Peer("fresh")
        self.selector.peers += [self.checked, self.fresh]

    def test_unchecked_not_chosen_while_a_checked_one_is_up(self):
        self.checked.active.record(True, 0.0)
        picks = {self.selector.pick().key for _ in range(10)}
        self.assertEqual(picks, {"checked"})

    def test_unchecked_used_once_checked(self):
        self.checked.active.record(True, 0.0)
        self.fresh.active.record(True, 0.0)
        picks = {self.selector.pick().key for _ in range(10)}
        self.assertEqual(picks, {"checked", "fresh"})

    def test_all_unchecked_all_used(self):
        """
        Checks off (or nobody checked yet): every backend is used.
        """
        picks = {self.selector.pick().key for _ in range(10)}
        self.assertEqual(picks, {"checked", "fresh"})

    def test_unchecked_used_when_the_checked_one_is_down(self):
        self.checked.active.record(False, 0.0)
        picks = {self.selector.pick().key for _ in range(4)}
        self.assertEqual(picks, {"fresh"})


class _Drained:
    def __init__(self, peer):
        self.peer = peer
        self.closed = 0

    def close(self):
        self.closed += 1


class PoolDrainTimerTests(SynchronousTestCase):
    """
    The drain deadline on a L{Clock}.
    """

    def test_deadline_closes_leftovers_then_forgets(self):
        clock = Clock()
        pool = Pool(clock, Selector(clock), CheckSettings.fromConfig(BalancerConfig(checkInterval=0)), drainTimeout=5.0)
        a, b = parseBackend("127.0.0.1:7001"), parseBackend("127.0.0.1:7002")
        pool.setSource("static", [a, b])
        peer = pool.peers[b.key]
        peer.connectionStarted()
        left = _Drained(peer)

        class Factory:
            clients = {left}

        pool.factory = Factory()
        pool.setSource("static", [a])
        self.assertIn(b.key, pool.draining)
        clock.advance(4.9)
        self.assertEqual(left.closed, 0)
        clock.advance(0.2)
        self.assertEqual(left.closed, 1)
        self.assertIn(b.key, pool.draining)  # until its connection ends
        peer.connectionEnded()
        pool.connectionEnded(peer)
        self.assertNotIn(b.key, pool.draining)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_back_before_deadline_cancels_it(self):
        clock = Clock()
        pool = Pool(clock, Selector(clock), CheckSettings.fromConfig(BalancerConfig(checkInterval=0)), drainTimeout=5.0)
        a = parseBackend("127.0.0.1:7001")
        pool.setSource("static", [a])
        pool.peers[a.key].connectionStarted()
        pool.setSource("static", [])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        pool.setSource("static", [a])
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertIn(a.key, pool.peers)


class ProxiedClientInterfaceTests(SynchronousTestCase):
    """
    Both kinds of proxied client provide L{IProxiedClient}, the seam
    C{dispatch}, L{Attempt}, the idle sweep and the pool use.
    """

    def test_server_side(self):
        from zope.interface.verify import verifyObject

        from balancer.interfaces import IProxiedClient

        factory, reactor, peer = _factory()
        factory.rawConnect = False
        server = factory.buildProtocol(None)
        server.makeConnection(StringTransport())
        self.assertTrue(verifyObject(IProxiedClient, server))

    def test_lean_client(self):
        from zope.interface.verify import verifyObject

        from balancer.interfaces import IProxiedClient
        from balancer.lean import LeanClient

        factory, reactor, peer = _factory()
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertTrue(verifyObject(IProxiedClient, LeanClient(factory, b, ("127.0.0.1", 1))))
