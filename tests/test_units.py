"""Pure logic: framing, text dialect, login throttle, passwords."""

from twisted.internet.task import Clock
from twisted.trial import unittest

from chatproto import messages as m
from chatproto.framing import TOO_LONG, LineFramer
from chatproto.messages import RequestError
from chatproto.passwords import PasswordHasher
from chatproto.textdialect import parseText, render
from chatproto.throttle import LoginThrottle


class LineFramerTests(unittest.TestCase):
    def test_terminators(self):
        f = LineFramer(10)
        self.assertEqual(f.feed(b"a\nb\r\nc\0d"), [b"a", b"b", b"c"])
        self.assertEqual(f.buffered, 1)
        self.assertEqual(f.feed(b"\n"), [b"d"])

    def test_byteAtATime(self):
        f = LineFramer(10)
        out = []
        for byte in b'{"x":1}\r\nPING\0':
            out += f.feed(bytes([byte]))
        self.assertEqual(out, [b'{"x":1}', b"PING"])

    def test_exactlyMaxLength(self):
        f = LineFramer(5)
        self.assertEqual(f.feed(b"12345\r\n123456\n"), [b"12345", TOO_LONG])

    def test_overlongPartialReportedOnceThenResyncs(self):
        f = LineFramer(5)
        self.assertEqual(f.feed(b"1234567"), [TOO_LONG])
        self.assertEqual(f.feed(b"89" * 10), [])
        self.assertEqual(f.feed(b"0\nok\n"), [b"ok"])
        self.assertEqual(f.buffered, 0)

    def test_finishReturnsUnterminatedLine(self):
        f = LineFramer(8)
        self.assertEqual(f.feed(b"a\nbc\r"), [b"a"])
        self.assertEqual(f.finish(), b"bc")
        self.assertIsNone(f.finish())
        f.feed(b"123456789")
        self.assertEqual(f.finish(), TOO_LONG)
        self.assertEqual(f.feed(b"x" * 20), [TOO_LONG])  # discarding
        self.assertIsNone(f.finish())

    def test_emptyLinesSkipped(self):
        self.assertEqual(LineFramer().feed(b"\n\n\r\n\0\0x\n"), [b"x"])


class TextDialectTests(unittest.TestCase):
    def test_parse(self):
        r = parseText("chat:2:hello: world")
        self.assertEqual((r.msgid, r.args), (m.ONE_CHAT_MSG, {"toid": 2, "msg": "hello: world"}))
        r = parseText("  LOGIN:7:p:w ")
        self.assertEqual((r.msgid, r.args), (m.LOGIN_MSG, {"id": 7, "password": "p:w"}))
        r = parseText("creategroup:g")
        self.assertEqual(r.args, {"groupname": "g", "groupdesc": ""})
        self.assertEqual(parseText("PING").msgid, m.PING_MSG)
        self.assertEqual(parseText("help"), "help")
        self.assertEqual(parseText("quit"), "quit")

    def test_parseErrors(self):
        for line, errno in (
            ("nope", m.E_UNKNOWN_COMMAND),
            ("chat:x:hi", m.E_BAD_FIELD),
            ("chat:2", m.E_BAD_FIELD),
            ("friends:extra", m.E_BAD_FIELD),
            ("addgroup:", m.E_BAD_FIELD),
        ):
            with self.assertRaises(RequestError) as e:
                parseText(line)
            self.assertEqual(e.exception.errno, errno, line)

    def test_renderEverySpecReply(self):
        """Every reply and notice renders to its readable text."""
        samples = [
            ({"msgid": m.REG_MSG_ACK, "errno": 0, "id": 1, "name": "a"}, "registered: your id is 1; log in with login:1:PASSWORD"),
            ({"msgid": m.LOGINOUT_MSG_ACK, "errno": 0}, "logged out"),
            ({"msgid": m.ONE_CHAT_MSG_ACK, "errno": 0, "toid": 2, "state": "delivered"}, "delivered to [2]"),
            (
                {"msgid": m.ADD_FRIEND_MSG_ACK, "errno": 0, "friend": {"id": 2, "name": "b", "state": "online"}},
                "friend added: [2]b online",
            ),
            ({"msgid": m.CREATE_GROUP_MSG_ACK, "errno": 0, "groupid": 1, "groupname": "g"}, "group created: [1]g"),
            ({"msgid": m.ADD_GROUP_MSG_ACK, "errno": 0, "groupid": 1, "groupname": "g"}, "joined group [1]g"),
            (
                {"msgid": m.GROUP_CHAT_MSG_ACK, "errno": 0, "groupid": 1, "delivered": 1, "stored": 0},
                "sent to group [1]: 1 online, 0 stored offline",
            ),
            ({"msgid": m.FRIEND_LIST_MSG_ACK, "errno": 0, "friends": []}, "no friends yet"),
            ({"msgid": m.GROUP_LIST_MSG_ACK, "errno": 0, "groups": []}, "no groups yet"),
            ({"msgid": m.PONG_MSG}, "PONG"),
            ({"msgid": m.KICK_NOTICE, "reason": "r"}, "disconnected: r"),
            ({"msgid": m.FRIEND_STATE_NOTICE, "id": 2, "name": "b", "state": "offline"}, "[2]b is now offline"),
            ({"msgid": m.FRIEND_ADDED_NOTICE, "id": 2, "name": "b"}, "[2]b added you as a friend"),
            (
                {"msgid": m.GROUP_CHAT_MSG, "id": 2, "name": "b", "groupid": 1, "msg": "hi", "time": "t"},
                "t group[1] [2]b said: hi",
            ),
            (m.error(m.E_BAD_JSON), "error 10: malformed JSON"),
            (
                {"msgid": m.ONE_CHAT_MSG_ACK, "errno": m.E_MAILBOX_FULL, "errmsg": m.ERROR_TEXT[m.E_MAILBOX_FULL]},
                "error 25: the recipient's mailbox is full",
            ),
        ]
        for sample, text in samples:
            self.assertEqual(render(sample), [text], sample)

    def test_renderGroupChat(self):
        msg = {"msgid": 10, "id": 2, "name": "bob", "groupid": 3, "msg": "hi", "time": "2026-11-22 10:00:00"}
        self.assertEqual(render(msg), ["2026-11-22 10:00:00 group[3] [2]bob said: hi"])


class ThrottleTests(unittest.TestCase):
    def test_backoffDoublesAndSuccessClears(self):
        clock = Clock()
        t = LoginThrottle(clock, allowed=3, baseDelay=1, maxDelay=8)
        for _ in range(2):
            t.failed("k")
        self.assertEqual(t.retryAfter("k"), 0)
        t.failed("k")
        self.assertEqual(t.retryAfter("k"), 1)
        t.failed("k")
        self.assertEqual(t.retryAfter("k"), 2)
        for _ in range(5):
            t.failed("k")
        self.assertEqual(t.retryAfter("k"), 8)
        self.assertEqual(t.retryAfter("other"), 0)
        clock.advance(8)
        self.assertEqual(t.retryAfter("k"), 0)
        t.succeeded("k")
        t.failed("k")
        self.assertEqual(t.retryAfter("k"), 0)

    def test_anyKeyBlocks(self):
        t = LoginThrottle(Clock(), allowed=1)
        t.failed(("peer", "1.2.3.4"))
        self.assertGreater(t.retryAfter(("uid", 1), ("peer", "1.2.3.4")), 0)

    def test_forgetsAfterQuiet(self):
        clock = Clock()
        t = LoginThrottle(clock, allowed=2, maxDelay=10)
        t.failed("k")
        clock.advance(11)
        t.failed("k")
        self.assertEqual(t.retryAfter("k"), 0)


class PasswordTests(unittest.TestCase):
    def test_hashAndVerify(self):
        hasher = PasswordHasher(None, n=16)
        stored = self.successResultOf(hasher.hash("s3cret \u00e9"))
        self.assertTrue(stored.startswith("scrypt$16$8$1$"))
        self.assertNotEqual(stored, self.successResultOf(hasher.hash("s3cret \u00e9")))
        self.assertTrue(self.successResultOf(hasher.verify("s3cret \u00e9", stored)))
        self.assertFalse(self.successResultOf(hasher.verify("s3cret", stored)))
        self.assertFalse(self.successResultOf(hasher.verify("x", None)))
        self.assertFalse(self.successResultOf(hasher.verify("x", "garbage")))

    def test_verifiesWithStoredCost(self):
        old = self.successResultOf(PasswordHasher(None, n=32).hash("pw"))
        self.assertTrue(self.successResultOf(PasswordHasher(None, n=16).verify("pw", old)))

    def test_runsInThreadPool(self):
        from twisted.internet import reactor

        hasher = PasswordHasher(reactor, n=16)
        self.addCleanup(hasher.pool.stopService)
        d = hasher.hash("pw")
        d.addCallback(lambda stored: hasher.verify("pw", stored))
        return d.addCallback(self.assertTrue)


class OpenFilesLimitTests(unittest.TestCase):
    def test_raisedToHardLimit(self):
        """
        A server started with a low soft limit on open files raises it to
        the hard limit (run in a child process so the test's own limit is
        left alone).
        """
        import os
        import resource
        import subprocess
        import sys

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 4096
        low = min(256, hard)

        def lower():
            resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

        code = (
            "import resource; from chatproto.common.rlimits import raiseOpenFilesLimit;"
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], raiseOpenFilesLimit(),"
            " resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], preexec_fn=lower, capture_output=True, text=True, check=True,
            env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        ).stdout.split()
        self.assertEqual([int(x) for x in out], [low, hard, hard])
