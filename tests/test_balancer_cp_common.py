"""
chatproto.common: the Redis URL parser, the ini + options merge, the
registry reader and the rlimit helper.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from chatproto.common import options, redisurl, registry, rlimits


class RedisURLTests(SynchronousTestCase):
    def test_forms(self):
        p = redisurl.parseRedisURL
        self.assertEqual(p("redis://127.0.0.1:6380/2"), redisurl.RedisURL("127.0.0.1", 6380, 2))
        u = p("rediss://bal:s%40cret@redis.example/3?ca=/etc/ca.pem")
        self.assertEqual(
            (u.host, u.port, u.db, u.username, u.password, u.tls, u.ca),
            ("redis.example", 6379, 3, "bal", "s@cret", True, "/etc/ca.pem"),
        )
        u = p("redis://:pw@[::1]:7000")
        self.assertEqual((u.host, u.port, u.username, u.password), ("::1", 7000, None, "pw"))
        self.assertEqual(p("redis://").host, "127.0.0.1")

    def test_sentinel(self):
        u = redisurl.parseRedisURL("redis+sentinel://h1:26379,h2,[::1]:26380/mymaster/1")
        self.assertEqual(u.sentinels, (("h1", 26379), ("h2", 26379), ("::1", 26380)))
        self.assertEqual((u.master, u.db, u.host), ("mymaster", 1, "h1"))
        self.assertRaises(ValueError, redisurl.parseRedisURL, "redis+sentinel://h1:26379")

    def test_errors_name_the_part(self):
        for url, part in [
            ("http://x", "scheme"),
            ("redis://127.0.0.1:abc/0", "bad port 'abc'"),
            ("redis://127.0.0.1:99999/0", "bad port"),
            ("redis://h/x", "bad database number 'x'"),
            ("redis://[::1/0", "unclosed"),
            ("redis://[]:6379", "IPv6"),
            ("redis://::1:6379", "brackets"),
            ("redis://bad_host!/0", "bad host name"),
            ("redis://h/0/1", "unexpected path"),
        ]:
            with self.assertRaises(ValueError) as c:
                redisurl.parseRedisURL(url)
            self.assertIn(part, str(c.exception), url)

    def test_redacted_hides_password(self):
        u = redisurl.parseRedisURL("redis://bal:topsecret@h:1/0")
        self.assertEqual(u.redacted(), "redis://bal:***@h:1/0")
        with self.assertRaises(ValueError) as c:
            redisurl.parseRedisURL("redis://bal:topsecret@h:x/0")
        self.assertNotIn("topsecret", str(c.exception))


class OptionsTests(SynchronousTestCase):
    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_read_and_merge(self):
        path = self.write(b"[x]\nrise = 4\nfall_count = 2\nlisten =\n  a\n  b\n")
        raw = options.readSection(path, "x", ["rise", "fall-count"], ["listen"])
        self.assertEqual(raw, {"rise": "4", "fall-count": "2", "listen": ["a", "b"]})
        merged = options.mergeOptions(
            {"rise": "7", "listen": []}, raw,
            {"rise": (1, int), "fall-count": (3, int), "other": (9, int)}, {"listen": ["z"]},
        )
        self.assertEqual(merged, {"rise": 7, "fall-count": 2, "other": 9, "listen": ["a", "b"]})

    def test_errors(self):
        bad = self.write(b"[x]\nrise = caf\xe9\n")
        with self.assertRaises(options.OptionsError) as c:
            options.readSection(bad, "x", ["rise"])
        self.assertIn("not UTF-8", str(c.exception))
        with self.assertRaises(options.OptionsError) as c:
            options.readSection(os.path.join(self.mktemp(), "missing.ini"), "x", [])
        self.assertIn("cannot read", str(c.exception))
        with self.assertRaises(options.OptionsError) as c:
            options.readSection(self.write(b"no section\n"), "x", [])
        self.assertIn("not a valid ini file", str(c.exception))
        with self.assertRaises(options.OptionsError) as c:
            options.readSection(self.write(b"[x]\nbogus = 1\n"), "x", [])
        self.assertIn("unknown option 'bogus'", str(c.exception))
        with self.assertRaises(options.OptionsError) as c:
            options.mergeOptions({"rise": "x" * 500}, None, {"rise": (1, int)})
        self.assertIn("--rise", str(c.exception))
        self.assertLess(len(str(c.exception)), 300)


class FakeRedis:
    def __init__(self, data):
        self.data = data

    def smembers(self, key):
        return defer.succeed(set(self.data.get(key, ())))

    def pipeline(self):
        calls = []
        data = self.data

        class Pipe:
            def hgetall(self, key):
                calls.append(key)

            def execute_pipeline(self):
                return defer.succeed([data.get(k, {}) for k in calls])

        return defer.succeed(Pipe())


class RegistryTests(SynchronousTestCase):
    def test_parse(self):
        e = registry.parseServer("a", {b"name": b"a", b"host": b"::1", b"port": b"7",
                                       b"weight": b"0", b"logins": b"x", b"updated": b"5"})
        self.assertEqual(e, registry.ServerEntry("a", "::1", 7, 1, None, 5))
        self.assertEqual(e.address, "[::1]:7")
        # the flat list a Lua HGETALL returns
        e = registry.parseServer("b", ["host", "h", "port", "8", "logins", "3"])
        self.assertEqual((e.name, e.address, e.logins), ("b", "h:8", 3))
        for raw in ({}, None, {"host": "h"}, {"host": "h", "port": "0"}, {"port": "1"}):
            self.assertIsNone(registry.parseServer("c", raw))

    def test_read(self):
        conn = FakeRedis({
            "p:servers": {b"b", b"a", b"gone"},
            "p:server:a": {"host": "h", "port": "1", "logins": "2"},
            "p:server:b": {"host": "h", "port": "2"},
        })
        entries = self.successResultOf(registry.readRegistry(conn, "p:"))
        self.assertEqual([(e.name, e.address, e.logins) for e in entries],
                         [("a", "h:1", 2), ("b", "h:2", None)])


class RlimitTests(SynchronousTestCase):
    def test_raises_soft_to_hard(self):
        import resource

        calls = []
        self.patch(resource, "getrlimit", lambda what: (1024, 4096))
        self.patch(resource, "setrlimit", lambda what, limits: calls.append(limits))
        self.assertEqual(rlimits.raiseOpenFilesLimit(), 4096)
        self.assertEqual(calls, [(4096, 4096)])

        def refuse(what, limits):
            raise ValueError("no")

        self.patch(resource, "setrlimit", refuse)
        self.assertEqual(rlimits.raiseOpenFilesLimit(), 1024)
