"""Repeated warnings are rate-limited into a count (issue 9, item 9)."""

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial import unittest

from chatproto.logrepeat import RepeatedWarnings, SessionLog


class RepeatedWarningsTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        self.clock = Clock()
        self.warnings = RepeatedWarnings(Logger(observer=self.events.append), self.clock, window=10)

    def texts(self):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]

    def test_firstLoggedRestCounted(self):
        for i in range(5800):
            self.warnings.warn("relay", "relay unavailable ({error})", error=f"e{i}")
        self.assertEqual(self.texts(), ["relay unavailable (e0)"])
        self.clock.advance(10)
        self.assertEqual(self.texts(), ["relay unavailable (e0)", "5799 more like this in the last 10 s: relay"])
        self.warnings.warn("relay", "relay unavailable ({error})", error="again")
        self.assertEqual(self.texts()[-1], "relay unavailable (again)")

    def test_kindsApartAndNoSummaryWhenAlone(self):
        self.warnings.warn("a", "A")
        self.warnings.warn("b", "B")
        self.clock.advance(10)
        self.assertEqual(self.texts(), ["A", "B"])
        self.warnings.warn("a", "A")
        self.warnings.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SessionLogTests(unittest.TestCase):
    """Login and logout lines: one by one up to a burst per window, then
    counted (a reconnect storm of thousands of logins is one line)."""

    def setUp(self):
        self.events = []
        self.clock = Clock()
        self.log = SessionLog(Logger(observer=self.events.append), self.clock)
        self.log.burst = 3

    def texts(self):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]

    def test_burstThenCountedThenOneByOneAgain(self):
        for uid in range(5000):
            self.log.info("login", "[{uid}] logged in", uid=uid)
        self.log.info("logout", "[{uid}] logged out", uid=7)
        self.assertEqual(self.texts(), ["[0] logged in", "[1] logged in", "[2] logged in", "[7] logged out"])
        self.clock.advance(10)
        self.assertEqual(self.texts()[4:], ["4,997 more login lines not logged one by one in the last 10 s"])
        self.log.info("login", "[{uid}] logged in", uid=1)
        self.assertEqual(self.texts()[-1], "[1] logged in")
        self.assertEqual(self.events[0]["log_level"].name, "info")

    def test_quietRateLogsEverything(self):
        for uid in range(10):
            self.log.info("login", "[{uid}] logged in", uid=uid)
            self.clock.advance(4)
        self.assertEqual(len(self.texts()), 10)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopLogsTheCount(self):
        for uid in range(5):
            self.log.info("login", "[{uid}] logged in", uid=uid)
        self.log.stop()
        self.assertEqual(self.texts()[-1], "2 more login lines not logged one by one in the last 10 s")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ServiceWarningTests(unittest.TestCase):
    def test_slowReadersAndFullMailboxesAreCounted(self):
        """Sessions logged out for not reading, and chats that a full
        mailbox refused in the background, are one warning line per kind
        and a count, not one line each (and no traceback)."""
        from twisted.internet import defer
        from twisted.logger import formatEvent, globalLogPublisher

        from chatproto.sqloffline import MailboxFull
        from tests.chat_helpers import Harness

        h = Harness()
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(3):
            h.service.congested(h.connect().protocol)
        for _ in range(4):
            h.service.tasks.track(defer.fail(MailboxFull([7], [])))
        h.clock.advance(10)
        texts = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith("chatproto.service")]
        self.assertEqual(
            texts,
            [
                "[None] does not read what it is sent; logging it out",
                "not stored offline: the mailbox of 1 recipient(s) is full",
                "2 more like this in the last 10 s: slow reader",
                "3 more like this in the last 10 s: mailbox full",
            ],
        )
        self.assertEqual(self.flushLoggedErrors(), [])
