"""
Issue 9 in the leaf modules: the login throttle counts attempts in flight,
registrations are rate-limited per address, password hashing has its own
bounded pool, text users never see forged lines, hostile JSON gets a clear
error, names have one spelling, and blank lines are blank.
"""

import json

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from chatproto import messages as m
from chatproto.framing import LineFramer
from chatproto.kdfpool import KDFPool
from chatproto.messages import RequestError
from chatproto.passwords import PasswordHasher
from chatproto.ratelimit import TokenBucketLimiter
from chatproto.textdialect import parseText, render, visible
from chatproto.throttle import LoginThrottle
from tests.chat_helpers import Harness

# Every character that may break or disguise a line for a text user.
LINE_BREAKERS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


class ThrottleInFlightTests(unittest.TestCase):
    def test_parallelGuessesThrottledLikeSequential(self):
        """200 parallel wrong logins on one account: only C{allowed} of them
        are checked, as if they had come one after another."""
        clock = Clock()
        t = LoginThrottle(clock, allowed=5, baseDelay=1, maxDelay=300)
        admitted = [t.admit(42, "10.0.0.1") for _ in range(200)]
        self.assertEqual(admitted.count(0.0), 5)
        self.assertTrue(all(w > 0 for w in admitted[5:]))
        for _ in range(5):
            t.finish(42, "10.0.0.1", ok=False)
        # Sequentially the 6th attempt waits baseDelay after the 5th failure.
        self.assertEqual(t.admit(42), 1.0)
        clock.advance(1)
        self.assertEqual(t.admit(42), 0.0)
        # Over the allowance: one attempt at a time.
        self.assertGreater(t.admit(42), 0)
        t.finish(42, ok=False)
        self.assertEqual(t.admit(42), 2.0)

    def test_sequentialMatchesOldBehaviour(self):
        clock = Clock()
        t = LoginThrottle(clock, allowed=2, baseDelay=1, maxDelay=300)
        for expected in (0, 0):
            self.assertEqual(t.admit("k"), expected)
            t.finish("k", ok=False)
        self.assertEqual(t.admit("k"), 1.0)

    def test_successClearsAndFreesTheSlot(self):
        clock = Clock()
        t = LoginThrottle(clock, allowed=1)
        self.assertEqual(t.admit("k"), 0.0)
        self.assertGreater(t.admit("k"), 0)
        t.finish("k", ok=True)
        self.assertEqual(t.admit("k"), 0.0)
        t.finish("k", ok=True)
        self.assertEqual(len(t), 0)

    def test_refusedAttemptCountsNothing(self):
        """A refused admit leaves every key as it was (no key is charged
        for another key's block)."""
        clock = Clock()
        t = LoginThrottle(clock, allowed=1)
        t.admit("acct")
        self.assertGreater(t.admit("acct", "other-addr"), 0)
        self.assertEqual(len(t), 1)

    def test_abandonedAttemptDoesNotCount(self):
        """A check that could not run (busy, storage down) frees its slot
        and is no failure."""
        clock = Clock()
        t = LoginThrottle(clock, allowed=1)
        self.assertEqual(t.admit("k"), 0.0)
        self.assertGreater(t.admit("k"), 0)
        t.abandon("k")
        self.assertEqual(len(t), 0)
        self.assertEqual(t.admit("k"), 0.0)

    def test_noOverflowAfterManyFailures(self):
        """The old delay was 2**failures: past ~1,030 failures it raised
        OverflowError.  Now the delay is capped whatever the count."""
        clock = Clock()
        t = LoginThrottle(clock, allowed=5, baseDelay=1, maxDelay=300)
        for _ in range(20_000):
            t.failed("k")
        self.assertEqual(t.retryAfter("k"), 300)
        for _ in range(2_000):
            clock.advance(300)
            self.assertEqual(t.admit("k"), 0.0)
            t.finish("k", ok=False)
        self.assertEqual(t.admit("k"), 300)

    def test_memoryBounded(self):
        """A spray of distinct keys (addresses) keeps at most maxKeys."""
        clock = Clock()
        t = LoginThrottle(clock, allowed=5, maxKeys=100)
        for i in range(1_000):
            t.admit(f"10.0.{i // 256}.{i % 256}")
            t.failed(("acct", i))
        self.assertLessEqual(len(t), 100)

    def test_quietKeysForgotten(self):
        clock = Clock()
        t = LoginThrottle(clock, allowed=1, maxDelay=10)
        for i in range(50):
            t.failed(i)
        clock.advance(11)
        t.admit("fresh")
        self.assertEqual(len(t), 1)


class RegistrationLimiterTests(unittest.TestCase):
    def test_burstThenOnePerSecond(self):
        clock = Clock()
        limit = TokenBucketLimiter(clock, burst=100, rate=1.0)
        self.assertEqual([limit.take("10.0.0.1") for _ in range(100)], [0.0] * 100)
        self.assertEqual(limit.take("10.0.0.1"), 1.0)
        # Another address has its own bucket.
        self.assertEqual(limit.take("10.0.0.2"), 0.0)
        clock.advance(0.5)
        self.assertAlmostEqual(limit.take("10.0.0.1"), 0.5)
        clock.advance(0.5)
        self.assertEqual(limit.take("10.0.0.1"), 0.0)
        self.assertEqual(limit.take("10.0.0.1"), 1.0)
        clock.advance(3600)
        self.assertEqual([limit.take("10.0.0.1") for _ in range(100)], [0.0] * 100)

    def test_configurable(self):
        clock = Clock()
        limit = TokenBucketLimiter(clock, burst=2, rate=0.1)
        self.assertEqual([limit.take("a") for _ in range(3)], [0.0, 0.0, 10.0])

    def test_memoryBounded(self):
        clock = Clock()
        limit = TokenBucketLimiter(clock, burst=5, rate=1.0, maxKeys=50)
        for i in range(500):
            limit.take(i)
        self.assertLessEqual(len(limit), 50)
        # Refilled buckets are forgotten.
        clock.advance(10)
        limit.take("x")
        self.assertEqual(len(limit), 1)


class FakeThreadPool:
    def __init__(self):
        self.calls = []
        self.started = self.stopped = False

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True

    def callInThreadWithCallback(self, onResult, f, *args, **kw):
        self.calls.append((onResult, f, args, kw))

    def runOne(self):
        onResult, f, args, kw = self.calls.pop(0)
        try:
            result = f(*args, **kw)
        except BaseException as e:  # as the real pool reports it
            onResult(False, defer.Failure(e))
        else:
            onResult(True, result)


class FakeReactor:
    """The reactor calls a KDF pool makes: no thread pool of its own."""

    def __init__(self):
        self.triggers = []

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)

    def addSystemEventTrigger(self, phase, event, f, *args):
        self.triggers.append((phase, event, f))
        return len(self.triggers)

    def removeSystemEventTrigger(self, trigger):
        self.triggers[trigger - 1] = None


class KDFPoolTests(unittest.TestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.threads = FakeThreadPool()
        self.pool = KDFPool(self.reactor, threads=2, queue=3, pool=self.threads)

    def test_boundedQueueFailsAtOnce(self):
        """threads + queue hashes may be pending; the next one fails at once
        with E_UNAVAILABLE "busy, retry" and nothing is queued for it."""
        pending = [self.pool.run(lambda i=i: i) for i in range(5)]
        self.assertEqual(self.pool.pending, 5)
        e = self.failureResultOf(self.pool.run(lambda: "late"), RequestError).value
        self.assertEqual((e.errno, e.errmsg), (m.E_UNAVAILABLE, "busy, retry"))
        self.assertEqual(len(self.threads.calls), 5)
        self.threads.runOne()
        self.assertEqual(self.successResultOf(pending[0]), 0)
        self.assertEqual(self.pool.pending, 4)
        d = self.pool.run(lambda: "now")
        while self.threads.calls:
            self.threads.runOne()
        self.assertEqual(self.successResultOf(d), "now")
        self.assertEqual(self.pool.pending, 0)
        for p in pending[1:]:
            self.successResultOf(p)

    def test_failureCountedOut(self):
        def boom():
            raise ValueError("x")

        d = self.pool.run(boom)
        self.threads.runOne()
        self.failureResultOf(d, ValueError)
        self.assertEqual(self.pool.pending, 0)

    def test_lifecycle(self):
        self.pool.startService()
        self.assertTrue(self.threads.started)
        self.pool.stopService()
        self.assertTrue(self.threads.stopped)
        self.assertEqual(self.reactor.triggers, [None])

    def test_hasherUsesItsOwnPoolNotTheReactors(self):
        """The reactor's shared pool (host name lookups) is never used: the
        fake reactor has none, and the work waits in the KDF pool."""
        hasher = PasswordHasher(self.reactor, n=16, pool=self.pool)
        d = hasher.hash("pw")
        self.assertNoResult(d)
        self.threads.runOne()
        stored = self.successResultOf(d)
        v = hasher.verify("pw", stored)
        self.threads.runOne()
        self.assertTrue(self.successResultOf(v))

    def test_hasherDefaultPoolIsBounded(self):
        hasher = PasswordHasher(self.reactor, n=16)
        self.assertIsInstance(hasher.pool, KDFPool)
        self.assertEqual(hasher.pool.queue, 64)
        self.assertGreaterEqual(hasher.pool.threads, 1)
        self.addCleanup(hasher.pool.stopService)

    def test_hasherBusy(self):
        hasher = PasswordHasher(self.reactor, n=16, pool=KDFPool(self.reactor, threads=1, queue=0, pool=self.threads))
        first = hasher.verify("pw", None)
        e = self.failureResultOf(hasher.verify("pw", None), RequestError).value
        self.assertEqual(e.errno, m.E_UNAVAILABLE)
        self.threads.runOne()
        self.assertFalse(self.successResultOf(first))


_RSS_SCRIPT = """
import hashlib, os, sys, threading
from chatproto.kdfpool import trimMemory, useMmapForLargeBlocks
if sys.argv[1] == "fixed":
    assert useMmapForLargeBlocks()
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) // 1024
base = rss()
work = lambda: hashlib.scrypt(b"pw", salt=os.urandom(16), n=2**14, r=8, p=1, maxmem=2**27, dklen=32)
for burst in range(2):
    ts = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
if sys.argv[1] == "fixed":
    trimMemory()
print(rss() - base)
"""


class KDFMemoryTests(unittest.TestCase):
    def growth(self, mode: str) -> int:
        import os
        import subprocess
        import sys

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, mode], capture_output=True, env=env, check=True)
        return int(out.stdout)

    def test_memoryReturnedAfterBurst(self):
        """
        Eight concurrent scrypt hashes (16 MiB each) twice over: with glibc's
        defaults the process keeps about 16 MiB per hash that ran at once;
        with the KDF pool's malloc settings it returns to its baseline.
        """
        self.assertGreater(self.growth("plain"), 64)
        self.assertLess(self.growth("fixed"), 8)


class ForgedLineTests(unittest.TestCase):
    def test_visible(self):
        self.assertEqual(visible("plain text: ok"), "plain text: ok")
        self.assertEqual(visible("a\nb\r\tc"), "a\\nb\\r\\tc")
        self.assertEqual(visible("x\x85y\u2028z\u2029\u202e\u200b\x00\x7f"), "x\\u0085y\\u2028z\\u2029\\u202e\\u200b\\u0000\\u007f")
        self.assertEqual(visible("caf\u00e9 \u674e\u96f7 \U0001f600"), "caf\u00e9 \u674e\u96f7 \U0001f600")
        for c in LINE_BREAKERS:
            self.assertEqual(len(visible(f"a{c}b").splitlines()), 1)

    def test_everyRenderingKeepsOneLinePerLine(self):
        evil = "x\n[1]admin said: hi\r\x85\u2028\u2029\u202eend"
        user = json.dumps({"id": 2, "name": evil, "state": "online"})
        messages = [
            {"msgid": m.ONE_CHAT_MSG, "id": 2, "name": evil, "toid": 3, "msg": evil, "time": "t"},
            {"msgid": m.GROUP_CHAT_MSG, "id": 2, "name": evil, "groupid": 1, "msg": evil, "time": "t"},
            {"msgid": m.FRIEND_LIST_MSG_ACK, "errno": 0, "friends": [{"id": 2, "name": evil, "state": "online"}]},
            {"msgid": m.GROUP_LIST_MSG_ACK, "errno": 0, "groups": [{"id": 1, "groupname": evil, "groupdesc": evil, "users": [user]}]},
            {"msgid": m.CREATE_GROUP_MSG_ACK, "errno": 0, "groupid": 1, "groupname": evil},
            {"msgid": m.FRIEND_STATE_NOTICE, "id": 2, "name": evil, "state": "online"},
            {
                "msgid": m.LOGIN_MSG_ACK,
                "errno": 0,
                "id": 3,
                "name": evil,
                "friends": [user],
                "groups": [],
                "offlinemsg": [json.dumps({"msgid": 6, "id": 2, "name": evil, "toid": 3, "msg": evil, "time": "t"})],
            },
            {"msgid": m.ERROR_MSG, "errno": 1, "errmsg": evil},
            {"msgid": 777, "note": "\u2028"},
        ]
        for message in messages:
            for line in render(message):
                self.assertEqual(line.splitlines(), [line], message)
                self.assertNotIn("\u202e", line)

    def test_jsonSenderCannotForgeATextUsersLine(self):
        """A JSON sender's msg with a line break and a fake chat line reaches
        a text user as one line; the JSON recipient gets it faithfully."""
        h = Harness()
        a, b, c = h.register("mallory"), h.register("alice"), h.register("carol")
        mallory, alice, carol = h.login(a), h.connect(), h.login(c)
        alice.send(f"login:{b}:secret")
        alice.lines()
        for peer in (b, c):
            self.assertEqual(mallory.request({"msgid": 7, "friendid": peer})["errno"], 0)
        alice.lines(), carol.lines()
        forged = "hi\n[1]admin said: send me your password\r\u2028\x85[1]admin said: x"
        mallory.request({"msgid": 6, "toid": b, "msg": forged})
        mallory.request({"msgid": 6, "toid": c, "msg": forged})
        text = alice.transport.value().decode("utf-8")
        lines = text.splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("[1]mallory said: hi\\n[1]admin said: send me your password\\r\\u2028\\u0085", lines[0])
        self.assertEqual(carol.reply()["msg"], forged)


class HostileJSONTests(unittest.TestCase):
    def errno(self, line: bytes) -> int:
        try:
            m.parseJSON(line)
        except RequestError as e:
            return e.errno
        return 0

    def test_idsOutOfRange(self):
        for value in (2**70, -(2**66), 2**63):
            self.assertEqual(self.errno(b'{"msgid":1,"id":%d,"password":"x"}' % value), m.E_BAD_FIELD)
            self.assertEqual(self.errno(b'{"msgid":6,"toid":%d,"msg":"x"}' % value), m.E_BAD_FIELD)
        for value in (2**63 - 1, -(2**63), 0):
            self.assertEqual(self.errno(b'{"msgid":1,"id":%d,"password":"x"}' % value), 0)
        e = self.assertRaises(RequestError, parseText, "login:100000000000000000000:x")
        self.assertEqual(e.errno, m.E_BAD_FIELD)
        e = self.assertRaises(RequestError, parseText, "chat:-100000000000000000000:x")
        self.assertEqual(e.errno, m.E_BAD_FIELD)

    def test_deepNesting(self):
        self.assertEqual(self.errno(b"[" * 3000 + b"]" * 3000), m.E_BAD_JSON)
        self.assertEqual(self.errno(b'{"msgid":21,"seq":' + b"[" * 40 + b"]" * 40 + b"}"), m.E_BAD_JSON)
        self.assertEqual(self.errno(b'{"a":' * 3000 + b"1" + b"}" * 3000), m.E_BAD_JSON)
        # Unbalanced and unterminated: still no RecursionError.
        self.assertEqual(self.errno(b"{" * 100_000), m.E_BAD_JSON)
        # Up to the limit is fine; brackets inside strings do not count.
        inner = b"[" * (m.MAX_JSON_DEPTH - 1) + b"]" * (m.MAX_JSON_DEPTH - 1)
        self.assertEqual(self.errno(b'{"msgid":21,"seq":' + inner + b"}"), 0)
        self.assertEqual(self.errno(b'{"msgid":21,"seq":"' + b"[{" * 500 + b'\\"[[["}'), 0)

    def test_nonFiniteNumbersRefused(self):
        for value in (b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"):
            self.assertEqual(self.errno(b'{"msgid":21,"seq":' + value + b"}"), m.E_BAD_JSON, value)
        self.assertEqual(self.errno(b'{"msgid":21,"seq":1.5e300}'), 0)

    def test_unencodableSeqRefused(self):
        """A seq is echoed: one that cannot be written as UTF-8 is refused
        (it used to fail while replying, an internal error)."""
        self.assertEqual(self.errno(b'{"msgid":21,"seq":"\\ud800"}'), m.E_BAD_FIELD)
        h = Harness()
        client = h.connect()
        reply = client.request({"msgid": 21, "seq": "\ud800"})
        self.assertEqual(reply["errno"], m.E_BAD_FIELD)

    def test_neverWritten(self):
        self.assertRaises(ValueError, m.encode, {"msgid": 22, "seq": float("nan")})

    def test_noInputIsAnInternalError(self):
        """Every hostile line gets a clear error reply that is strict JSON,
        never errno 31, before and after logging in."""
        lines = [
            b'{"msgid":1,"id":%d,"password":"x"}' % 2**70,
            b'{"msgid":1,"id":1e400,"password":"x"}',
            b'{"msgid":1,"id":' + b"9" * 5000 + b',"password":"x"}',
            b'{"msgid":' + b"9" * 30 + b"}",
            b'{"msgid":6,"toid":1,"msg":"\\ud800"}',
            b'{"msgid":6,"toid":true,"msg":"x"}',
            b'{"msgid":6,"toid":%d,"msg":"x"}' % -(2**66),
            b'{"msgid":7,"friendid":%d}' % 2**64,
            b'{"msgid":9,"groupid":%d}' % 2**63,
            b'{"msgid":21,"seq":{"a":[1,{"b":NaN}]}}',
            b'{"msgid":21,"seq":NaN}',
            b'{"msgid":21,"seq":-Infinity}',
            b'{"msgid":21,"seq":1e999}',
            b'{"msgid":21,"seq":"\\udc00"}',
            b'{"msgid":21,"seq":' + b"[" * 3000 + b"]" * 3000 + b"}",
            b"\xff\xfe{}",
            b"login:100000000000000000000:x",
            b"chat:99999999999999999999999:x",
        ]

        def strict(text):
            return json.loads(text, parse_constant=lambda c: self.fail(f"{c} written"))

        h = Harness()
        uid = h.register("probe")
        for client in (h.connect(), h.login(uid)):
            for line in lines:
                client.sendRaw(line + b"\n")
                replies = client.lines()
                self.assertEqual(len(replies), 1, (line[:60], replies))
                if replies[0].startswith("{"):
                    reply = strict(replies[0])
                    self.assertNotIn(reply["errno"], (0, m.E_INTERNAL), line[:60])
                else:
                    self.assertRegex(replies[0], r"^error 1[0-9]: ", line[:60])
            # The connection still works.
            self.assertEqual(client.request({"msgid": 21})["msgid"], m.PONG_MSG)


class NameTests(unittest.TestCase):
    def test_nfcOneSpelling(self):
        self.assertEqual(m.checkName("e\u0301"), "\u00e9")
        self.assertEqual(m.checkName("  Zoe\u0308 "), "Zo\u00eb")

    def test_refused(self):
        for bad in ("a\x85b", "a\u202eb", "a\u200bb", "a\u2028b", "a\u2029b", "a\x7fb", "a\x00b", "a\u200db", "\ufeffa", "a\tb"):
            e = self.assertRaises(RequestError, m.checkName, bad)
            self.assertEqual(e.errno, m.E_INVALID)

    def test_accepted(self):
        for good in ("alice", "Zo\u00eb", "\u674e\u96f7", "a b", "\U0001f600"):
            self.assertEqual(m.checkName(good), good)

    def test_sameAccountWhicheverSpelling(self):
        """Registering the decomposed spelling of a taken name is refused."""
        h = Harness()
        h.register("Ren\u00e9")
        client = h.connect()
        reply = client.request({"msgid": 4, "name": "Rene\u0301", "password": "pw"})
        self.assertEqual(reply["errno"], m.E_INVALID)
        self.assertIn("taken", reply["errmsg"])


class BlankLineTests(unittest.TestCase):
    def test_spacesOnlyIsBlank(self):
        framer = LineFramer(100)
        self.assertEqual(framer.feed(b"   \n\t \r\n \x00ping\n  x \n"), [b"ping", b"  x "])
        framer.feed(b"   ")
        self.assertIsNone(framer.finish())

    def test_noErrorForASpacesLine(self):
        h = Harness()
        client = h.connect()
        client.sendRaw(b"   \r\n")
        self.assertEqual(client.lines(), [])
