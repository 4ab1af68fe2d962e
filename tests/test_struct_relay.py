"""
L{chatproto.redisrelay.RedisRelay}'s batching on a L{Clock} with a fake
cluster: coalescing per reactor turn, splitting at C{maxBatch}, the cap on
batches in flight, and the receiver's write batch around completions and
received payloads.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from chatproto.interfaces import PresenceUnavailable
from chatproto.redisrelay import RedisRelay
from chatproto.redisscripts import RELAY
from tests.contract_presence import RecordingReceiver


class FakeLink:
    def __init__(self) -> None:
        self.protocol = object()


class FakeCluster:
    """What RedisRelay uses of a RedisCluster; script calls wait for the
    test to answer them."""

    name = "a"

    def __init__(self) -> None:
        self.reactor = Clock()
        self.commands = FakeLink()
        self.calls: list[tuple[list[str], defer.Deferred]] = []

    def channelOf(self, server: str) -> str:
        return f"chat:relay:{server}"

    def eval(self, script, args) -> defer.Deferred:
        assert script is RELAY
        d = defer.Deferred()
        self.calls.append(([line for line in args[0].split("\n") if line], d))
        return d


class BatchingTests(unittest.TestCase):
    def setUp(self) -> None:
        self.cluster = FakeCluster()
        self.relay = RedisRelay(self.cluster)
        self.receiver = RecordingReceiver()
        self.relay.receiver = self.receiver

    def deliver(self, n: int, start: int = 0) -> list[defer.Deferred]:
        return [self.relay.deliver([start + i], {"m": start + i}, True) for i in range(n)]

    def test_oneCallPerTurn(self) -> None:
        """Deliveries of one reactor turn leave in one script call, one
        line each, in order."""
        results = self.deliver(3)
        self.assertEqual(self.cluster.calls, [])
        self.cluster.reactor.advance(0)
        [(lines, d)] = self.cluster.calls
        self.assertEqual(lines, ['10\t{"m":0}', '11\t{"m":1}', '12\t{"m":2}'])
        d.callback("2:1")
        self.assertEqual([self.successResultOf(r) for r in results], [[], [1], []])

    def test_splitAtMaxBatch(self) -> None:
        """More than C{maxBatch} queued deliveries are split into calls of
        at most C{maxBatch}; each answer's indexes are its own call's."""
        self.relay.maxBatch = 2
        results = self.deliver(5)
        self.cluster.reactor.advance(0)
        self.assertEqual([len(lines) for lines, _ in self.cluster.calls], [2, 2, 1])
        for (_, d), answer in zip(self.cluster.calls, ["1:0", "2:3", ""]):
            d.callback(answer)
        self.assertEqual([self.successResultOf(r) for r in results], [[0], [], [], [3], []])

    def test_inflightCap(self) -> None:
        """With C{maxInflight} calls unanswered, new deliveries queue (and
        grow one batch) until a call comes back."""
        self.relay.maxInflight = 2
        clock = self.cluster.reactor
        first = self.deliver(1, 0)
        clock.advance(0)
        second = self.deliver(1, 1)
        clock.advance(0)
        queued = self.deliver(3, 2)
        clock.advance(0)
        self.assertEqual(len(self.cluster.calls), 2)
        self.assertEqual(len(self.relay.inflight), 2)
        self.cluster.calls[0][1].callback("")
        self.assertEqual(self.successResultOf(first[0]), [])
        clock.advance(0)
        self.assertEqual(len(self.cluster.calls), 3)
        self.assertEqual(len(self.cluster.calls[2][0]), 3)
        for _, d in self.cluster.calls[1:]:
            d.callback("")
        self.assertEqual([self.successResultOf(r) for r in second + queued], [[]] * 4)
        self.assertEqual(self.relay.inflight, set())

    def test_failedCallFailsItsDeliveries(self) -> None:
        results = self.deliver(2)
        self.cluster.reactor.advance(0)
        self.cluster.calls[0][1].errback(PresenceUnavailable("gone"))
        for r in results:
            self.failureResultOf(r, PresenceUnavailable)

    def test_notConnectedFailsAtOnce(self) -> None:
        self.cluster.commands.protocol = None
        self.failureResultOf(self.relay.deliver([1], {}, True), PresenceUnavailable)

    def test_completionInOneWriteBatch(self) -> None:
        """The deliveries of one answered call complete inside one write
        batch of the receiver (their acks leave in one piece per session)."""
        depths = []
        results = self.deliver(2)
        for r in results:
            r.addCallback(lambda _: depths.append(self.receiver.writeBatch.depth))
        self.cluster.reactor.advance(0)
        self.cluster.calls[0][1].callback("")
        self.assertEqual(depths, [1, 1])
        self.assertEqual(self.receiver.writeBatch.ended, 1)

    def test_receivedInOneWriteBatch(self) -> None:
        depths = []
        self.receiver.online = {1}
        original = self.receiver.deliverLocal

        def deliverLocal(uids, message, store, origin=None):
            depths.append(self.receiver.writeBatch.depth)
            return original(uids, message, store, origin)

        self.receiver.deliverLocal = deliverLocal
        self.relay.received(json.dumps([[1, [1], {"m": 1}], [0, [1], {"m": 2}]]).encode())
        self.assertEqual(depths, [1, 1])
        self.assertEqual(self.receiver.writeBatch.ended, 1)
        self.assertEqual(self.receiver.delivered, [(1, {"m": 1}), (1, {"m": 2})])
