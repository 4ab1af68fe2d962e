"""
The balancer end to end over TLS and with retries: an C{ssl:} listener,
C{tls:} backends (and why a proxied connection to one failed), C{--tries},
and discovery over C{rediss://} from a private TLS redis-server.
Certificates are made by the test (L{tests.test_balancer_cp_network.makeCert}).
"""

from __future__ import annotations

import os

import txredisapi
from twisted.internet import defer, reactor
from twisted.internet.endpoints import clientFromString, connectProtocol, serverFromString
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.balancer_helpers import (
    Client, EchoBackend, connect, makeConfig, roundtrip, startBackends, startBalancer, waitFor,
)
from tests.cluster_helpers import RedisServer, canConnect, until
from tests.test_balancer_cp_network import firstDiscovery, makeCert


class _Certs:
    def __init__(self, test: TestCase, name: str = "localhost") -> None:
        self.directory = os.path.abspath(test.mktemp())
        self.key, self.cert = makeCert(self.directory, name, (-1, 30))

    @property
    def serverArgs(self) -> str:
        return f"privateKey={self.key}:certKey={self.cert}"


@defer.inlineCallbacks
def _tlsEcho(test: TestCase, certs: _Certs) -> EchoBackend:
    backend = EchoBackend("tls")
    backend.port = yield serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:{certs.serverArgs}"
    ).listen(backend)
    backend.portnum = backend.port.getHost().port
    test.addCleanup(backend.stop)
    return backend


@defer.inlineCallbacks
def _echoOnce(client: Client, payload: bytes) -> bytes:
    # write, wait for the echo, then close (no half-close over TLS needed)
    client.transport.write(payload)
    yield waitFor(lambda: len(client.data) >= len(payload))
    client.transport.loseConnection()
    data = yield client.done
    return data


class TLSTests(TestCase):
    @defer.inlineCallbacks
    def test_ssl_listener(self):
        """
        An C{ssl:} listener: a TLS client that trusts the certificate gets
        its bytes through to a plain backend.
        """
        certs = _Certs(self)
        (backend,) = startBackends(self, "plain")
        cfg = makeConfig(
            [backend.address], checkInterval=0,
            listen=[f"ssl:0:interface=127.0.0.1:{certs.serverArgs}"],
        )
        svc = yield startBalancer(self, cfg)
        client = yield connectProtocol(
            clientFromString(reactor, f"tls:localhost:{svc.port}:trustRoots={certs.directory}"),
            Client(),
        )
        data = yield _echoOnce(client, b"over tls")
        self.assertEqual(data, b"over tls")
        self.assertEqual((backend.served, backend.received), (1, 8))
        self.assertFalse(svc.proxyPorts[0].__class__.__name__.startswith("Lean"))

    @defer.inlineCallbacks
    def test_tls_backend(self):
        """
        A C{tls:} backend: a plain client's bytes reach it encrypted, and
        its health checks pass.
        """
        certs = _Certs(self)
        backend = yield _tlsEcho(self, certs)
        address = f"tls:localhost:{backend.portnum}:trustRoots={certs.directory}"
        svc = yield startBalancer(self, makeConfig([address], checkInterval=0.05))
        peer = svc.pool.peers[address]
        yield waitFor(lambda: peer.active.lastResult)
        client = yield connect(svc.port)
        data = yield _echoOnce(client, b"to a tls backend")
        self.assertEqual(data, b"to a tls backend")
        self.assertEqual(backend.served, 1)

    @defer.inlineCallbacks
    def test_tls_backend_failure_is_logged_with_its_reason(self):
        """
        A proxied connection to a C{tls:} backend whose certificate names
        another host is closed, and the log says why.
        """
        certs = _Certs(self, "other.example")
        backend = yield _tlsEcho(self, certs)
        address = f"tls:localhost:{backend.portnum}:trustRoots={certs.directory}"
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        svc = yield startBalancer(self, makeConfig([address], checkInterval=0))
        client = yield connect(svc.port)
        client.transport.write(b"hello")
        data = yield client.done
        self.assertEqual(data, b"")
        self.assertEqual(backend.served, 0)
        whys = [e.get("why") for e in events if e.get("peer") == address and "why" in e]
        self.assertIn("TLS: host name mismatch (the certificate is not for localhost)", whys)


class TriesTests(TestCase):
    @defer.inlineCallbacks
    def start(self, tries):
        from tests.test_balancer_proxy import freePort

        (live,) = startBackends(self, "live")
        dead = f"127.0.0.1:{freePort()}"
        # max_fails=0: the dead backend stays first in line for every client
        cfg = makeConfig([f"{dead} max_fails=0", f"{live.address} max_fails=0"],
                         checkInterval=0, tries=tries)
        svc = yield startBalancer(self, cfg)
        return svc, live

    @defer.inlineCallbacks
    def test_one_try_gives_up_after_the_first_backend(self):
        svc, live = yield self.start(1)
        data = yield roundtrip(svc.port, b"x")
        self.assertEqual(data, b"")
        self.assertEqual((svc.factory.rejected, svc.factory.connectFailures, live.served),
                         (1, 1, 0))

    @defer.inlineCallbacks
    def test_two_tries_reach_the_second(self):
        svc, live = yield self.start(2)
        data = yield roundtrip(svc.port, b"x")
        self.assertEqual(data, b"x")
        self.assertEqual((svc.factory.rejected, svc.factory.connectFailures, live.served),
                         (0, 1, 1))


class _TLSRedis(RedisServer):
    """A private redis-server that only speaks TLS."""

    def __init__(self, certs: _Certs) -> None:
        super().__init__()
        self.certs = certs

    def start(self) -> defer.Deferred:
        from tests.cluster_helpers import REDIS_SERVER, Process

        argv = [
            REDIS_SERVER, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
            "--tls-cert-file", self.certs.cert, "--tls-key-file", self.certs.key,
            "--tls-ca-cert-file", self.certs.cert, "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", self.directory, "--daemonize", "no",
            "--requirepass", "s3cret",
        ]
        self.process = Process(argv, os.path.join(self.directory, "redis.log"))
        return until(lambda: canConnect("127.0.0.1", self.port), 10, what="TLS redis-server")


class RedissDiscoveryTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_rediss_with_password_and_private_ca(self):
        """
        C{rediss://:PASSWORD@localhost:PORT/0?ca=...}: discovery verifies
        the server against the private CA, authenticates, and reads the
        registry.
        """
        from twisted.internet import ssl

        certs = _Certs(self)
        server = _TLSRedis(certs)
        self.addCleanup(server.cleanup)
        yield server.start()
        with open(certs.cert, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        admin = yield txredisapi.Connection(
            "127.0.0.1", server.port, reconnect=False, convertNumbers=False, password="s3cret",
            ssl_context_factory=ssl.optionsForClientTLS("localhost", trustRoot=trust),
        )
        self.addCleanup(admin.disconnect)
        yield admin.execute_command("SADD", "p:servers", "chat-a")
        yield admin.execute_command("HSET", "p:server:chat-a", "name", "chat-a", "host",
                                    "127.0.0.1", "port", "6000", "weight", "3", "logins", "1",
                                    "updated", "0")
        d, specs, logins = yield firstDiscovery(
            self, f"rediss://:s3cret@localhost:{server.port}/0?ca={certs.cert}"
        )
        self.assertEqual([(s.address, s.weight, s.name) for s in specs],
                         [("127.0.0.1:6000", 3, "chat-a")])
        self.assertEqual(d.errors, 0)
