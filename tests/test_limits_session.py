"""
Issue 9, items 1, 5, 7, 9 and 10 at the session: output bounded per
connection (reading pauses past the high-water mark, log-out past the cap),
the login timeout and the idle timer counting only lines, errors that never
vanish, registrations per address, the start-up gate.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from chatproto import messages as m
from chatproto import textdialect
from chatproto.config import parseDatabaseURL, parseRedisURL
from chatproto.interfaces import StoreUnavailable
from chatproto.protocol import ChatProtocol
from chatproto.ratelimit import TokenBucketLimiter
from chatproto.tasks import loggedWait
from tests.chat_helpers import Client, Harness

HELP_REPLY = len(textdialect.HELP.replace("\n", "\r\n").encode()) + 2


class SlowTransport(StringTransport):
    """
    A transport whose peer reads nothing until L{drain}: what is written
    stays unsent (counted as a TCP transport counts it), and the registered
    streaming producer is paused past C{bufferSize} and resumed once all is
    sent, as C{FileDescriptor} does.
    """

    bufferSize = 65536
    _tempDataLen = 0
    offset = 0

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.dataBuffer = b""
        self.valvePaused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self.dataBuffer += data
        if len(self.dataBuffer) > self.bufferSize and self.producer is not None and not self.valvePaused:
            self.valvePaused = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """The peer reads everything sent so far."""
        sent, self.dataBuffer = self.dataBuffer, b""
        if self.valvePaused and self.producer is not None:
            self.valvePaused = False
            self.producer.resumeProducing()
        return sent


class SessionHarness(Harness):
    def connectWith(self, transport=None, host="10.0.0.1", **limits) -> Client:
        protocol = ChatProtocol(self.service, self.clock, self.maxLength, self.idleTimeout, **limits)
        transport = transport or StringTransport(peerAddress=IPv4Address("TCP", host, 1))
        protocol.makeConnection(transport)
        return Client(protocol, transport)


class OutputBoundTests(unittest.TestCase):
    HIGH = 8192

    def setUp(self):
        self.h = SessionHarness()
        self.transport = SlowTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 1))
        self.client = self.h.connectWith(self.transport, outputHighWater=self.HIGH, outputCap=64 * 1024)

    def test_helpFloodNeverRead(self):
        """
        A client sending C{help} lines and reading nothing: after about the
        high-water mark of replies the server stops carrying out its
        requests and pauses reading it; what it holds stays bounded however
        much is sent.  Once the client reads, every request is answered, in
        order.
        """
        lines = 5000
        self.client.sendRaw(b"help\n" * lines)
        self.h.clock.advance(0)
        unsent = len(self.transport.dataBuffer)
        self.assertLessEqual(unsent, self.HIGH + HELP_REPLY)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertTrue(self.client.connected if hasattr(self.client, "connected") else self.client.protocol.connected)
        answered = self.transport.drain().count(b"commands:")
        while answered < lines:
            self.h.clock.advance(0)
            chunk = self.transport.drain()
            self.assertLessEqual(len(chunk), self.HIGH + HELP_REPLY)
            self.assertGreater(len(chunk), 0)
            answered += chunk.count(b"commands:")
        self.assertEqual(answered, lines)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertFalse(self.transport.disconnecting)

    def test_repliesWaitBehindUnsentOutput(self):
        """While the transport holds more than the mark, new requests wait
        (in order) until it has sent it."""
        self.transport.write(b"x" * (self.HIGH + 1))  # the valve is paused
        self.client.send({"msgid": m.PING_MSG, "seq": 1})
        self.client.send({"msgid": m.PING_MSG, "seq": 2})
        self.assertEqual(self.transport.dataBuffer, b"x" * (self.HIGH + 1))
        self.assertEqual(self.transport.producerState, "paused")
        self.transport.clear()
        self.transport.drain()
        self.assertEqual([r["seq"] for r in self.client.replies()], [1, 2])
        self.assertEqual(self.transport.producerState, "producing")

    def test_pastTheCapLoggedOutAndStoredOffline(self):
        """Pushes past the cap: the session is logged out and closed with a
        notice, and what follows is stored offline."""
        a, b = self.h.register("alice"), self.h.register("bob")
        bob = self.h.connectWith(SlowTransport(), outputHighWater=self.HIGH, outputCap=16 * 1024)
        bob.send({"msgid": m.LOGIN_MSG, "id": b, "password": "secret"})
        alice = self.h.login(a)
        states = []
        for i in range(40):
            ack = alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": f"{i} " + "y" * 900})
            self.assertEqual(ack["errno"], 0, ack)
            states.append(ack["state"])
        self.assertIn("stored", states)
        self.assertNotIn(b, self.h.service.sessions)
        self.assertTrue(bob.transport.disconnecting)
        self.assertIn(b'"reason":"too slow reading', bob.transport.dataBuffer)
        self.assertLessEqual(len(bob.transport.dataBuffer), 16 * 1024 + 2048)
        stored = self.successResultOf(self.h.store.peekOffline(b))
        self.assertEqual(len(stored), states.count("stored"))


class TimerTests(unittest.TestCase):
    def test_loginTimeout(self):
        """A connection not logged in within the login timeout is told so
        and closed, whatever it sends meanwhile."""
        h = SessionHarness()
        client = h.connectWith(loginTimeout=30)
        for _ in range(29):
            client.send({"msgid": m.PING_MSG})
            h.clock.advance(1)
        self.assertFalse(client.closed)
        client.lines()
        h.clock.advance(1)
        self.assertEqual(client.replies(), [{"msgid": m.KICK_NOTICE, "reason": "not logged in within 30 s"}])
        self.assertTrue(client.closed)

    def test_loggedInNotTimedOut(self):
        h = SessionHarness()
        uid = h.register("alice")
        client = h.connectWith(loginTimeout=30)
        self.assertEqual(client.request({"msgid": m.LOGIN_MSG, "id": uid, "password": "secret"})["errno"], 0)
        h.clock.advance(31)
        self.assertFalse(client.closed)
        self.assertEqual(client.lines(), [])

    def test_trickledBytesAreNotActivity(self):
        """One byte a second of a line that never ends does not keep a
        connection: only complete lines reset the idle timer."""
        h = SessionHarness(idleTimeout=10)
        client = h.connectWith()
        for _ in range(10):
            client.sendRaw(b"x")
            h.clock.advance(1)
        self.assertEqual(client.replies(), [{"msgid": m.KICK_NOTICE, "reason": "idle for 10 s"}])
        self.assertTrue(client.closed)

    def test_linesAreActivity(self):
        h = SessionHarness(idleTimeout=10)
        client = h.connectWith()
        for _ in range(30):
            client.sendRaw(b"PING\n")
            h.clock.advance(1)
        self.assertFalse(client.closed)


class ErrorTests(unittest.TestCase):
    def setUp(self):
        self.h = SessionHarness()
        self.client = self.h.connectWith()

    def test_failureWhileReplyingIsAnswered(self):
        """A failure raised while writing an asynchronous reply is logged
        with its traceback once and answered with errno 31."""
        self.h.service.do_ping = lambda session, request: defer.succeed({"msgid": m.PONG_MSG, "bad": object()})
        self.client.send({"msgid": m.PING_MSG})
        [reply] = self.client.replies()
        self.assertEqual(reply["errno"], m.E_INTERNAL)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        del self.h.service.do_ping
        self.assertEqual(self.client.request({"msgid": m.PING_MSG}), {"msgid": m.PONG_MSG})

    def test_outageAnsweredWithoutTraceback(self):
        self.h.service.do_ping = lambda session, request: defer.fail(StoreUnavailable("db down"))
        reply = self.client.request({"msgid": m.PING_MSG})
        self.assertEqual(reply["errno"], m.E_UNAVAILABLE)
        self.assertIn("db down", reply["errmsg"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_unexpectedAnsweredWithTraceback(self):
        self.h.service.do_ping = lambda session, request: defer.fail(ZeroDivisionError())
        self.assertEqual(self.client.request({"msgid": m.PING_MSG})["errno"], m.E_INTERNAL)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class RegistrationTests(unittest.TestCase):
    def test_perAddress(self):
        """Registrations past the burst from one address get errno 3 with
        the wait; another address is not affected; the bucket refills."""
        h = SessionHarness()
        h.service.registerLimiter = TokenBucketLimiter(h.clock, burst=2, rate=0.5)
        client = h.connectWith(host="10.0.0.5")
        for name in ("a1", "a2"):
            self.assertEqual(client.request({"msgid": m.REG_MSG, "name": name, "password": "pw"})["errno"], 0)
        reply = client.request({"msgid": m.REG_MSG, "name": "a3", "password": "pw"})
        self.assertEqual(reply["errno"], m.E_THROTTLED)
        self.assertIn("retry in 2 s", reply["errmsg"])
        other = h.connectWith(host="10.0.0.6")
        self.assertEqual(other.request({"msgid": m.REG_MSG, "name": "b1", "password": "pw"})["errno"], 0)
        h.clock.advance(2)
        self.assertEqual(client.request({"msgid": m.REG_MSG, "name": "a3", "password": "pw"})["errno"], 0)

    def test_kdfBusyIsErrno30(self):
        """The KDF pool's "busy, retry" reaches the client as errno 30."""
        h = SessionHarness()
        h.hasher.hash = lambda password: defer.fail(m.RequestError(m.E_UNAVAILABLE, "busy, retry"))
        client = h.connectWith()
        reply = client.request({"msgid": m.REG_MSG, "name": "a", "password": "pw"})
        self.assertEqual((reply["errno"], reply["errmsg"]), (m.E_UNAVAILABLE, "busy, retry"))


class StartupTests(unittest.TestCase):
    def test_waitingIsLoggedWithoutPassword(self):
        """A start-up stage that takes long logs what it waits for (the
        Redis URL without its password), again every 30 s, and stops when
        done."""
        from twisted.internet.task import Clock

        from chatproto.config import redactedRedisURL

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        url = parseRedisURL("redis://:s3cret@redis.example:6380/2")
        gate = defer.Deferred()
        d = defer.Deferred.fromCoroutine(loggedWait(clock, f"Redis at {redactedRedisURL(url)}", gate))
        clock.advance(1)
        clock.advance(30)
        gate.callback("up")
        clock.advance(60)
        self.assertEqual(self.successResultOf(d), "up")
        waits = [e for e in events if "waiting for" in e.get("log_format", "")]
        self.assertEqual(len(waits), 2)
        self.assertEqual(waits[0]["what"], "Redis at redis://:***@redis.example:6380/2")
        self.assertEqual(waits[0]["log_level"], LogLevel.warn)
        self.assertNotIn("s3cret", repr(events))

    def test_databaseURLRedacted(self):
        from chatproto.config import redactedDatabaseURL

        url = parseDatabaseURL("mysql://chat:pw@db:3307/chat")
        self.assertEqual(redactedDatabaseURL(url), "mysql://chat@db:3307/chat")


class WrappedTransportTests(unittest.TestCase):
    def test_unsentCountedThroughWrappers(self):
        """Behind a wrapper (TLS, the PROXY header) the bytes unsent and the
        high-water mark are those of the transport that buffers."""
        from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

        from chatproto.sessionoutput import bufferingTransport

        h = SessionHarness()
        inner = SlowTransport(peerAddress=IPv4Address("TCP", "10.0.0.3", 1))
        protocol = ChatProtocol(h.service, h.clock, 1024, 300, None, 4096, 16 * 1024)
        wrapper = ProtocolWrapper(WrappingFactory(None), protocol)
        wrapper.makeConnection(inner)
        self.assertIs(bufferingTransport(wrapper), inner)
        self.assertEqual(inner.bufferSize, 4096)
        inner.write(b"x" * 5000)
        self.assertEqual(protocol.unsentBytes(), 5000)
        self.assertEqual(inner.producerState, "paused")
