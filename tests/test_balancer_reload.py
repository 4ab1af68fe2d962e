"""
Configuration reload (SIGHUP) and Redis discovery, end to end.
"""

from __future__ import annotations

import os
import signal
import uuid

import txredisapi
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from balancer import config as configmod
from balancer.config import optionName

from tests.balancer_helpers import connect, roundtrip, startBackends, startBalancer, waitFor


def writeIni(path, backends, **extra):
    lines = ["[balancer]", "listen = tcp:0:interface=127.0.0.1", "backend ="]
    lines += [f"    {b}" for b in backends]
    for key, value in extra.items():
        lines.append(f"{optionName(key)} = {value}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


class ReloadTests(TestCase):
    @defer.inlineCallbacks
    def _start(self, backends, **extra):
        self.path = self.mktemp()
        writeIni(self.path, backends, checkInterval="0.05", **extra)
        cfg = configmod.load({}, self.path)
        svc = yield startBalancer(self, cfg, cmdline={})
        return svc

    @defer.inlineCallbacks
    def test_reload_adds_drains_and_reweights(self):
        a, b, c = startBackends(self, "a", "b", "c")
        svc = yield self._start([a.address, b.address])
        # one long-lived client on a, one on b
        ca = yield connect(svc.port)
        ca.transport.write(b"1")
        cb = yield connect(svc.port)
        cb.transport.write(b"2")
        yield waitFor(lambda: a.served == 1 and b.served == 1)

        writeIni(self.path, [f"{a.address} weight=3", c.address], checkInterval="0.05")
        self.assertTrue(svc.reload())
        self.assertEqual(svc.reloads, 1)
        self.assertEqual(sorted(svc.pool.peers), sorted([a.address, c.address]))
        self.assertEqual(svc.pool.peers[a.address].weight, 3)
        self.assertIn(b.address, svc.pool.draining)
        self.assertEqual(svc.pool.draining[b.address].state, "draining")

        # the established connection to b still works both ways
        cb.transport.write(b"-still-there")
        yield waitFor(lambda: bytes(cb.data) == b"2-still-there")

        # new clients go to a and c only, 3:1
        for _ in range(8):
            yield roundtrip(svc.port, b"n")
        self.assertEqual((a.served, b.served, c.served), (1 + 6, 1, 2))

        # b is forgotten once its last connection ends
        cb.transport.loseConnection()
        yield cb.done
        yield waitFor(lambda: b.address not in svc.pool.draining)
        self.assertNotIn(b.address, [p.key for p in svc.selector.peers])
        ca.transport.loseConnection()
        yield ca.done

    @defer.inlineCallbacks
    def test_drain_timeout_closes_leftovers(self):
        a, b = startBackends(self, "a", "b")
        svc = yield self._start([a.address, b.address], drainTimeout="0.2")
        yield roundtrip(svc.port)  # goes to a
        cb = yield connect(svc.port)
        cb.transport.write(b"x")
        yield waitFor(lambda: b.served == 1)
        writeIni(self.path, [a.address], checkInterval="0.05", drainTimeout="0.2")
        svc.reload()
        data = yield cb.done  # closed by the deadline
        self.assertEqual(data, b"x")
        self.assertNotIn(b.address, svc.pool.draining)

    @defer.inlineCallbacks
    def test_bad_config_keeps_running_one(self):
        (a,) = startBackends(self, "a")
        svc = yield self._start([a.address])
        with open(self.path, "w") as f:
            f.write("[balancer]\nbackend = nonsense\n")
        self.assertFalse(svc.reload())
        self.assertEqual(list(svc.pool.peers), [a.address])
        data = yield roundtrip(svc.port, b"ok")
        self.assertEqual(data, b"ok")

    @defer.inlineCallbacks
    def test_removed_then_readded_backend_comes_back(self):
        a, b = startBackends(self, "a", "b")
        svc = yield self._start([a.address, b.address])
        cb = yield connect(svc.port)  # a
        cb2 = yield connect(svc.port)  # b
        cb2.transport.write(b"x")
        yield waitFor(lambda: b.served == 1)
        writeIni(self.path, [a.address], checkInterval="0.05")
        svc.reload()
        self.assertIn(b.address, svc.pool.draining)
        writeIni(self.path, [a.address, b.address], checkInterval="0.05")
        svc.reload()
        self.assertNotIn(b.address, svc.pool.draining)
        self.assertEqual(svc.pool.peers[b.address].state, "up")
        for c in (cb, cb2):
            c.transport.loseConnection()
            yield c.done

    @defer.inlineCallbacks
    def test_sighup_handler_reloads(self):
        """
        The real signal: SIGHUP to this process re-reads the file.
        """
        a, b = startBackends(self, "a", "b")
        self.path = self.mktemp()
        writeIni(self.path, [a.address], checkInterval="0.05")
        cfg = configmod.load({}, self.path)
        svc = yield startBalancer(self, cfg, cmdline={}, handleSighup=True)
        writeIni(self.path, [a.address, b.address], checkInterval="0.05")
        os.kill(os.getpid(), signal.SIGHUP)
        yield waitFor(lambda: svc.reloads == 1)
        self.assertIn(b.address, svc.pool.peers)


class TwistedReloadTests(ReloadTests):
    """
    The same through the Twisted transports (used for ssl: listeners).
    """

    twistedPath = True


REDIS = ("127.0.0.1", 6379)


class DiscoveryTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.prefix = f"test-balancer:{uuid.uuid4().hex}:"
        self.redis = yield txredisapi.Connection(*REDIS, reconnect=False, convertNumbers=False)
        self.addCleanup(self._cleanup)

    @defer.inlineCallbacks
    def _cleanup(self):
        keys = yield self.redis.keys(self.prefix + "*")
        if keys:
            yield self.redis.delete(*keys)
        yield self.redis.disconnect()

    @defer.inlineCallbacks
    def register(self, name, backend, logins=0, weight=1, ttl=10):
        key = f"{self.prefix}server:{name}"
        yield self.redis.sadd(self.prefix + "servers", name)
        yield self.redis.hmset(key, {
            "name": name, "host": "127.0.0.1", "port": str(backend.portnum),
            "weight": str(weight), "logins": str(logins), "updated": "0",
        })
        yield self.redis.expire(key, ttl)

    @defer.inlineCallbacks
    def _start(self, **kw):
        from tests.balancer_helpers import makeConfig

        cfg = makeConfig([], redis=f"redis://{REDIS[0]}:{REDIS[1]}/0",
                          redisPrefix=self.prefix, discoveryInterval=0.05, **kw)
        svc = yield startBalancer(self, cfg)
        return svc

    @defer.inlineCallbacks
    def test_servers_appear_and_go(self):
        a, b = startBackends(self, "a", "b")
        svc = yield self._start()
        # nothing registered yet: clients are closed, not left hanging
        data = yield roundtrip(svc.port)
        self.assertEqual(data, b"")
        yield self.register("chat-a", a)
        yield waitFor(lambda: a.address in svc.pool.peers)
        data = yield roundtrip(svc.port, b"hi")
        self.assertEqual(data, b"hi")
        self.assertEqual(a.served, 1)
        yield self.register("chat-b", b)
        yield waitFor(lambda: b.address in svc.pool.peers)
        self.assertEqual(svc.pool.peers[b.address].name, "chat-b")
        # deregistration (the hash is gone; the name lingers in the set)
        yield self.redis.delete(f"{self.prefix}server:chat-a")
        yield waitFor(lambda: a.address not in svc.pool.peers)
        for _ in range(3):
            yield roundtrip(svc.port)
        self.assertEqual((a.served, b.served), (1, 3))

    @defer.inlineCallbacks
    def test_expiry_removes_server(self):
        (a,) = startBackends(self, "a")
        svc = yield self._start()
        yield self.register("chat-a", a)
        yield waitFor(lambda: a.address in svc.pool.peers)
        yield self.redis.execute_command("PEXPIRE", f"{self.prefix}server:chat-a", "100")
        yield waitFor(lambda: a.address not in svc.pool.peers, timeout=3)

    @defer.inlineCallbacks
    def test_least_logins_uses_registry(self):
        a, b = startBackends(self, "a", "b")
        svc = yield self._start(algorithm="least-logins")
        yield self.register("chat-a", a, logins=10)
        yield self.register("chat-b", b, logins=2)
        yield waitFor(lambda: len(svc.pool.peers) == 2
                       and svc.pool.peers.get(a.address).logins == 10)
        for _ in range(4):
            yield roundtrip(svc.port)
        self.assertEqual((a.served, b.served), (0, 4))
