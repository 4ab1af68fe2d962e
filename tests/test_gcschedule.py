"""
L{chatproto.gcschedule}: garbage collection from the reactor at a bounded
rate, with a fake collector and L{Clock}; and once with the real one.
"""

from __future__ import annotations

import gc
import weakref

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from chatproto.gcschedule import CHECK_INTERVAL, CollectionSchedule, parseIntervals
from chatproto.tap import Options, makeService


class FakeCollector:
    """The parts of C{gc} the schedule uses."""

    def __init__(self):
        self.enabled = True
        self.threshold = (700, 10, 10)
        self.counts = [0, 0, 0]
        self.collected = []

    def isenabled(self):
        return self.enabled

    def enable(self):
        self.enabled = True

    def disable(self):
        self.enabled = False

    def get_threshold(self):
        return self.threshold

    def get_count(self):
        return tuple(self.counts)

    def collect(self, generation):
        self.collected.append(generation)
        for g in range(generation + 1):
            self.counts[g] = 0
        if generation < 2:
            self.counts[generation + 1] += 1
        return 0


class CollectionScheduleTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.gc = FakeCollector()
        self.cpu = iter(range(0, 10**6, 2))
        self.schedule = CollectionSchedule(
            self.clock, (1.0, 10.0, 30.0), collector=self.gc, cpuTime=lambda: next(self.cpu) / 1000
        )
        self.schedule.startService()
        self.addCleanup(self.stop)

    def stop(self):
        if self.schedule.running:
            self.schedule.stopService()

    def test_automaticCollectionOffWhileRunning(self):
        self.assertFalse(self.gc.enabled)
        self.schedule.stopService()
        self.assertTrue(self.gc.enabled)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_staysOffIfItWasOff(self):
        self.schedule.stopService()
        self.gc.disable()
        schedule = CollectionSchedule(self.clock, collector=self.gc)
        schedule.startService()
        schedule.stopService()
        self.assertFalse(self.gc.enabled)

    def test_nothingBelowThreshold(self):
        self.gc.counts = [700, 10, 10]
        self.clock.pump([CHECK_INTERVAL] * 50)
        self.assertEqual(self.gc.collected, [])

    def test_youngGenerationAtMostOncePerInterval(self):
        """Past its threshold, generation 0 is collected at once, then not
        again for 1 s however many objects are made."""
        self.gc.counts[0] = 701
        self.clock.advance(CHECK_INTERVAL)
        self.assertEqual(self.gc.collected, [0])
        self.gc.counts[0] = 5000
        self.clock.pump([CHECK_INTERVAL] * 9)
        self.assertEqual(self.gc.collected, [0])
        self.clock.advance(CHECK_INTERVAL)
        self.assertEqual(self.gc.collected, [0, 0])

    def test_fullCollectionAtMostEvery30s(self):
        """A storm keeps every generation past its threshold: the full
        collection runs once per 30 s, and the younger ones in between at
        their own intervals."""
        for _ in range(int(60 / CHECK_INTERVAL)):
            self.gc.counts = [5000, 50, 50]
            self.clock.advance(CHECK_INTERVAL)
        self.assertEqual(self.gc.collected.count(2), 2)
        self.assertEqual(self.gc.collected.count(1), 4)
        self.assertLessEqual(self.gc.collected.count(0), 60)
        self.assertEqual(self.schedule.collections, [self.gc.collected.count(g) for g in range(3)])
        self.assertAlmostEqual(sum(self.schedule.seconds), 0.002 * len(self.gc.collected))

    def test_oneCollectionPerCheck(self):
        """An older generation's collection covers the younger ones."""
        self.gc.counts = [5000, 50, 50]
        self.clock.advance(CHECK_INTERVAL)
        self.assertEqual(self.gc.collected, [2])
        self.assertEqual(self.schedule.last, [self.clock.seconds()] * 3)
        self.gc.counts = [5000, 50, 50]
        self.clock.advance(CHECK_INTERVAL)
        self.assertEqual(self.gc.collected, [2])


class RealCollectorTests(SynchronousTestCase):
    def test_cyclesAreCollected(self):
        """With the real C{gc}: automatic collection is off, and a garbage
        cycle is freed by the schedule."""
        clock = Clock()
        schedule = CollectionSchedule(clock, (0.0, 0.0, 0.0))
        wasEnabled = gc.isenabled()
        schedule.startService()
        self.addCleanup(lambda: schedule.running and schedule.stopService())
        self.assertFalse(gc.isenabled())

        class Node:
            pass

        node = Node()
        node.self = node
        alive = weakref.ref(node)
        del node
        kept = [[] for _ in range(gc.get_threshold()[0] + 10)]  # past generation 0's threshold
        self.assertIsNotNone(alive())
        clock.advance(CHECK_INTERVAL)
        self.assertIsNone(alive())
        self.assertEqual(sum(schedule.collections), 1)
        del kept
        schedule.stopService()
        self.assertEqual(gc.isenabled(), wasEnabled)


class IntervalOptionTests(SynchronousTestCase):
    def test_parse(self):
        self.assertEqual(parseIntervals("1,10,30"), (1.0, 10.0, 30.0))
        self.assertEqual(parseIntervals(" 0.5, 5 ,60"), (0.5, 5.0, 60.0))
        self.assertIsNone(parseIntervals("off"))
        self.assertIsNone(parseIntervals("OFF"))

    def test_bad(self):
        for text in ("", "1,10", "1,10,30,40", "a,b,c", "1,10,nan", "-1,10,30", "1,10,4000", "10,1,30", "1,,30"):
            self.assertRaises(ValueError, parseIntervals, text)

    def test_option(self):
        options = Options()
        options.parseOptions([])
        self.assertEqual(options["gc-intervals"], (1.0, 10.0, 30.0))
        options = Options()
        options.parseOptions(["--gc-intervals", "off"])
        self.assertIsNone(options["gc-intervals"])
        with self.assertRaises(usage.UsageError) as e:
            Options().parseOptions(["--gc-intervals", "1,2"])
        self.assertIn("--gc-intervals", str(e.exception))
        self.assertIn("'1,2'", str(e.exception))

    def test_inServiceTree(self):
        """By default the server runs the schedule; C{off} leaves Python's
        automatic collection."""
        for value, expected in ((None, [(1.0, 10.0, 30.0)]), ("off", []), ("0,5,5", [(0.0, 5.0, 5.0)])):
            options = Options()
            options.parseOptions(["--port", "tcp:0", "--db", "sqlite::memory:"]
                                 + (["--gc-intervals", value] if value else []))
            top = makeService(options, MemoryReactorClock())
            self.assertEqual([s.intervals for s in top if isinstance(s, CollectionSchedule)], expected)
