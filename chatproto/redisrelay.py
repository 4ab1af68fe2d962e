"""
The relay half of the Redis cluster (see L{chatproto.rediscluster}):
deliveries to other servers, batched into one script call per reactor turn;
what other servers send to this one; kicks.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto.interfaces import IRelay, Location, PresenceUnavailable
from chatproto.redisscripts import RELAY

log = Logger()

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class _NoBatch:
    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass


@implementer(IRelay)
class RedisRelay:
    """
    @ivar receiver: the L{IRelayReceiver} of this server, once started.
    @ivar subscribed: whether this server's channel is subscribed now.
    """

    #: deliveries per script call, at most (bigger batches are split)
    maxBatch = 1000
    #: delivery batches sent and not yet answered, at most
    maxInflight = 8

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.channel = cluster.channelOf(cluster.name)
        #: this server's name as a JSON string, named in what it relays
        self.origin = _compact(cluster.name)
        self.receiver = None
        self.subscribed = False
        self.inflight: set[defer.Deferred] = set()
        self._subscribedWaiters: list[defer.Deferred] = []
        self._batch: list = []
        self._flushCall = None

    def _writeBatch(self):
        return getattr(self.receiver, "writeBatch", None) or _NoBatch()

    # --- lifecycle ---------------------------------------------------------

    def start(self, receiver) -> defer.Deferred:
        self.receiver = receiver
        d = defer.Deferred()
        self._subscribedWaiters.append(d)
        cluster = self.cluster
        cluster.subscriber.start()
        cluster.acquire("relay")
        cluster.startPinging()
        return d

    @defer.inlineCallbacks
    def stop(self):
        cluster = self.cluster
        cluster.stopPinging()
        self.subscribed = False
        yield cluster.subscriber.stop()
        if self._flushCall is not None:
            self._flushCall.cancel()
            self._flushCall = None
        if self._batch:
            self._flush()
        yield cluster.release("relay", self.inflight)

    def subscriberReady(self, p) -> None:
        d = p.subscribe(self.channel)

        def subscribed(_):
            self.subscribed = True
            waiters, self._subscribedWaiters = self._subscribedWaiters, []
            for w in waiters:
                w.callback(None)

        def failed(f):
            log.warn("subscribing to {channel} failed: {error}", channel=self.channel, error=f.getErrorMessage())
            self.cluster.subscriber.drop()

        d.addCallbacks(subscribed, failed)
        p.whenDisconnected().addCallback(self._unsubscribed)

    def _unsubscribed(self, _) -> None:
        self.subscribed = False

    # --- receiving ---------------------------------------------------------

    def received(self, payload) -> None:
        """A message on this server's channel."""
        receiver = self.receiver
        batch = self._writeBatch()
        batch.begin()
        try:
            if isinstance(payload, bytes):
                payload = payload.decode("utf-8")
            data = json.loads(payload)
            if isinstance(data, dict):
                if "confirm" in data:
                    receiver.confirmed(data["confirm"])
                    return
                receiver.kickLocal(int(data["kick"]), data["session"], data.get("reason", "logged in elsewhere"))
                return
            for store, uids, message, *origin in data:
                # origin: the sending server (it waits for a confirmation)
                receiver.deliverLocal(uids, message, bool(store), *origin[:1])
        except Exception:
            log.failure("handling a relayed message {payload!r}", payload=payload[:200])
        finally:
            batch.end()

    # --- sending -----------------------------------------------------------

    def deliver(self, uids, message, store, line=None) -> defer.Deferred:
        uids = [int(uid) for uid in uids]
        if not uids:
            return defer.succeed([])
        if self.cluster.commands.protocol is None:
            return defer.fail(PresenceUnavailable("not connected to Redis"))
        d = defer.Deferred()
        encoded = line.decode("utf-8") if line is not None else _compact(message)
        self._batch.append((uids, encoded, store, d))
        self._scheduleFlush()
        return d

    def _scheduleFlush(self) -> None:
        """
        Send what is queued at the end of this reactor turn, unless
        C{maxInflight} batches are out already: then when one comes back.
        Under load batches grow by themselves, which keeps the cost per
        message low; when idle a delivery leaves at once.
        """
        if self._batch and self._flushCall is None and len(self.inflight) < self.maxInflight:
            self._flushCall = self.cluster.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flushCall = None
        batch, self._batch = self._batch, []
        for start in range(0, len(batch), self.maxBatch):
            self._send(batch[start : start + self.maxBatch])

    def _send(self, batch) -> None:
        lines = [
            f"{'1' if store else '0'}{','.join(map(str, uids))}\t{message}\n" for uids, message, store, _ in batch
        ]
        d = self.cluster.eval(RELAY, ["".join(lines), self.origin])
        self.inflight.add(d)

        def done(result):
            self.inflight.discard(d)
            self._scheduleFlush()
            if isinstance(result, Failure):
                for *_, waiter in batch:
                    waiter.errback(result)
                return None
            missed = {}
            if result:
                for part in result.split(";"):
                    index, _, uids = part.partition(":")
                    missed[int(index) - 1] = [int(uid) for uid in uids.split(",")]
            # Acknowledgements written while completing the batch leave in
            # one piece per session.
            writeBatch = self._writeBatch()
            writeBatch.begin()
            try:
                for i, (*_, waiter) in enumerate(batch):
                    waiter.callback(missed.get(i, []))
            finally:
                writeBatch.end()
            return None

        d.addBoth(done)

    def confirm(self, server: str, entries) -> defer.Deferred:
        """Tell C{server} the states of messages it relayed here
        (L{chatproto.acks}); lost if nobody listens (it times out)."""
        return self.cluster.publish(self.cluster.channelOf(server), _compact({"confirm": entries}))

    def kick(self, location: Location, uid: int, reason: str) -> defer.Deferred:
        payload = _compact({"kick": int(uid), "session": location.session, "reason": reason})
        d = self.cluster.publish(self.cluster.channelOf(location.server), payload)
        return d.addCallback(lambda n: int(n) > 0)
