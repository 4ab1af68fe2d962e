"""
Control-plane paths that need real sockets: health checks of C{tls:}
backends say why TLS failed, and discovery with Redis ACL credentials
against a private redis-server.
"""

from __future__ import annotations

import datetime
import os

import txredisapi
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.trial.unittest import TestCase

from balancer.checker import HealthChecker
from balancer.discovery import RedisDiscovery
from balancer.selection import Peer
from tests.cluster_helpers import RedisServer


def makeCert(directory: str, name: str, days: tuple[int, int]) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    # the certificate alone in C{directory}: it is the trustRoots directory
    keyPath, certPath = directory + ".key.pem", os.path.join(directory, "cert.pem")
    with open(keyPath, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(certPath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath


class TLSCheckTests(TestCase):
    @defer.inlineCallbacks
    def check(self, certName: str, days=(-1, 30), trusted: bool = True):
        directory = os.path.abspath(self.mktemp())
        keyPath, certPath = makeCert(directory, certName, days)
        port = yield serverFromString(
            reactor, f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}"
        ).listen(protocol.Factory.forProtocol(protocol.Protocol))
        self.addCleanup(port.stopListening)
        address = f"tls:localhost:{port.getHost().port}"
        if trusted:
            address += f":trustRoots={directory}"
        peer = Peer(address, address=address)
        peer.extra["endpoint"] = clientFromString(reactor, address)
        checker = HealthChecker(reactor, peer, 60, 5)
        checker.start()  # the first check runs now
        self.addCleanup(checker.stop)
        yield checker._inflight
        return peer.active

    @defer.inlineCallbacks
    def test_good_certificate_passes(self):
        active = yield self.check("localhost")
        self.assertEqual((active.lastResult, active.lastError), (True, ""))

    @defer.inlineCallbacks
    def test_hostname_mismatch(self):
        active = yield self.check("other.example")
        self.assertFalse(active.lastResult)
        self.assertEqual(
            active.lastError, "TLS: host name mismatch (the certificate is not for localhost)"
        )

    @defer.inlineCallbacks
    def test_untrusted_issuer(self):
        active = yield self.check("localhost", trusted=False)
        self.assertFalse(active.lastResult)
        self.assertTrue(active.lastError.startswith("TLS: untrusted issuer"), active.lastError)

    @defer.inlineCallbacks
    def test_expired(self):
        active = yield self.check("localhost", days=(-30, -1))
        self.assertFalse(active.lastResult)
        self.assertTrue(active.lastError.startswith("TLS: certificate expired"), active.lastError)


@defer.inlineCallbacks
def firstDiscovery(test, url: str):
    """
    Run a L{RedisDiscovery} of prefix C{p:} at C{url} until its first
    successful poll: C{(discovery, specs, logins)}.
    """
    from tests.cluster_helpers import until

    seen = []
    d = RedisDiscovery(reactor, url, "p:", 0.2, lambda specs, logins: seen.append((specs, logins)))
    d.startService()
    test.addCleanup(d.stopService)
    yield until(lambda: seen, 10, 0.05, what=f"discovery from {url}")
    return (d,) + seen[0]


class ACLDiscoveryTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.server = RedisServer()
        self.addCleanup(self.server.cleanup)
        yield self.server.start()
        admin = yield txredisapi.Connection("127.0.0.1", self.server.port, reconnect=False,
                                            convertNumbers=False)
        self.addCleanup(admin.disconnect)
        self.admin = admin
        yield admin.execute_command(
            "ACL", "SETUSER", "balancer", "on", ">s3cret", "~p:*", "+smembers", "+hgetall",
            "+ping", "+select", "+info", "+client",
        )
        yield admin.execute_command("SADD", "p:servers", "chat-a")
        yield admin.execute_command("HSET", "p:server:chat-a", "name", "chat-a", "host",
                                    "127.0.0.1", "port", "6000", "weight", "2", "logins", "4",
                                    "updated", "0")

    @defer.inlineCallbacks
    def waitFor(self, predicate, timeout=10.0):
        from tests.cluster_helpers import until

        yield until(predicate, timeout, 0.05, what="discovery")

    @defer.inlineCallbacks
    def test_acl_user_reads_registry(self):
        d, specs, logins = yield firstDiscovery(
            self, f"redis://balancer:s3cret@127.0.0.1:{self.server.port}/0"
        )
        self.assertEqual([(s.address, s.weight, s.name) for s in specs],
                         [("127.0.0.1:6000", 2, "chat-a")])
        self.assertEqual(logins, {"127.0.0.1:6000": 4})
        self.assertEqual(d.errors, 0)

    @defer.inlineCallbacks
    def test_recovers_once_the_password_works(self):
        """
        txredisapi stops reconnecting after a refused AUTH; discovery makes
        a new connection after a few failed polls, so fixing the password
        on the Redis side is enough.
        """
        seen = []
        d = RedisDiscovery(
            reactor, f"redis://late:s3cret@127.0.0.1:{self.server.port}/0", "p:", 0.1,
            lambda specs, logins: seen.append(specs),
        )
        d.pollTimeout = lambda: 0.3
        d.startService()
        try:
            yield self.waitFor(lambda: d.errors >= 1)
            self.assertEqual(seen, [])
            yield self.admin.execute_command(
                "ACL", "SETUSER", "late", "on", ">s3cret", "~p:*", "+smembers", "+hgetall",
                "+ping", "+select", "+info", "+client",
            )
            yield self.waitFor(lambda: seen, timeout=15)
        finally:
            yield d.stopService()
        self.assertEqual([s.address for s in seen[-1]], ["127.0.0.1:6000"])
        self.assertEqual(d.consecutiveErrors, 0)
        import gc

        gc.collect()
        self.flushLoggedErrors(ValueError)

    @defer.inlineCallbacks
    def test_wrong_password_is_counted(self):
        d = RedisDiscovery(
            reactor, f"redis://balancer:wrong@127.0.0.1:{self.server.port}/0", "p:", 0.2,
            lambda specs, logins: None,
        )
        d.startService()
        try:
            yield self.waitFor(lambda: d.errors >= 1)
        finally:
            yield d.stopService()
        self.assertEqual(d.polls, 0)
        self.assertIsNotNone(d.lastError)
        self.assertIsNotNone(d.lastErrorTime)
        self.assertNotIn("wrong", d.redactedURL)
        # txredisapi leaves the refused AUTH in a Deferred nobody waits on
        import gc

        gc.collect()
        self.flushLoggedErrors(ValueError)
