"""
Cluster presence and relay in Redis (txredisapi): several C{twistd chat}
processes behave as one chat service.

Keys and channels (prefix C{P}, C{chat:} by default)
====================================================

C{P servers} (SET)
    Names of the registered chat servers.  A name whose hash has expired
    is dropped by the next refresh of any server.
C{P server:NAME} (HASH, TTL C{ttl}, 6 s by default)
    C{name}, C{host}, C{port}, C{weight}, C{logins}, C{updated} (unix
    time).  Refreshed every C{refreshInterval} (2 s); a server that stops
    refreshing (killed, cut off) is dead once the key expires, with nobody
    cleaning up.  C{logins} moves with C{HINCRBY} inside the claim/release
    scripts and is set from the server's own session count on each refresh.
C{P user:UID} (STRING)
    C{"SERVER<TAB>SESSION"}: where the user is logged in.  It counts only
    while C{P server:SERVER} exists: the scripts treat an entry of a dead
    server as offline.
C{P relay:NAME} (pub/sub channel)
    What other servers hand to server C{NAME}: a JSON array of
    C{[store, [uid, ...], message]} (deliveries) or a JSON object
    C{{"kick": uid, "session": ..., "reason": ...}}.

Every read-decide-write is one Lua script, so there is no check-then-act
window: a claim, a release (compare-and-delete), a delivery ("who is online
where" and PUBLISH in one step) and the registry refresh.

Connections
===========

Two connections per server, as Synapse does: one only subscribes to this
server's channel, the other carries commands and PUBLISH.  Each is kept up
by L{chatproto.redislink.Link}: C{reactor.connectTCP}/C{connectSSL} (TLS certificates are
verified for C{rediss://}) with exponential back-off that never gives up,
even after a failed AUTH.  The subscription is made again on every
connection; both connections are PINGed (the registry refresh is the
command connection's PING) and a reply that does not come within
C{replyTimeout} closes the connection, so half-open sockets are found.

While Redis is unreachable, claim/release/locate/servers fail at once with
L{PresenceUnavailable} and relay deliveries fail at once (the chat service
then stores the messages offline).  When Redis comes back the server
registers again and re-asserts the presence of its logged-in users (a
restarted Redis has lost every key).  If meanwhile another server claimed
one of those users (the user logged in there while this server was cut
off), the newer login wins: this server closes its own session of that
user with a kick notice.

Delivery guarantees
===================

A delivery is accepted by the relay only when C{PUBLISH} reports a
subscriber on the owning server's channel; otherwise the user is returned
as missed and the sender stores the message offline.  A receiving server
that no longer has the user stores it offline itself.  Redis pub/sub is
at-most-once: a message published in the instant before the receiving
server's subscriber connection breaks can be lost with that connection.

Deliveries issued within one reactor turn are coalesced into one script
call, and the script sends one PUBLISH per target server, so a group
message costs one round trip however many members it has.
"""

from __future__ import annotations

import json

import txredisapi
from twisted.internet import defer, error, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto.interfaces import ClaimResult, IPresence, IRelay, Location, PresenceUnavailable, ServerInfo
from chatproto.output import batch as batch_
from chatproto.redislink import CommandProtocol, Link, SubscriberProtocol
from chatproto.redisscripts import CLAIM, DEREGISTER, LOCATE, REASSERT, REGISTER, RELAY, RELEASE, SERVERS

log = Logger()

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _unavailable(failure: Failure):
    """Redis failures as L{PresenceUnavailable}."""
    if failure.check(PresenceUnavailable):
        return failure
    if failure.check(txredisapi.RedisError, error.ConnectionDone, error.ConnectionLost, defer.CancelledError):
        raise PresenceUnavailable(f"Redis: {failure.getErrorMessage()}")
    return failure


def _location(value: str) -> Location | None:
    if not value:
        return None
    server, _, session = value.partition("\t")
    return Location(server, session)


# --- the cluster -----------------------------------------------------------


class RedisCluster:
    """
    This server's membership of a Redis-backed cluster: owns the two
    connections and provides L{presence} (an L{IPresence}) and L{relay} (an
    L{IRelay}).

    @param url: a L{chatproto.config.RedisURL}.
    @param name: this server's name (unique in the cluster).
    @param host, port, weight: what the registry advertises for clients.
    """

    #: deliveries per script call, at most (bigger batches are split)
    maxBatch = 1000
    #: delivery batches sent and not yet answered, at most
    maxInflight = 8

    def __init__(
        self,
        url,
        name: str,
        host: str = "",
        port: int = 0,
        weight: int = 1,
        prefix: str = "chat:",
        reactor=None,
        ttl: float = 6.0,
        refreshInterval: float = 2.0,
        pingInterval: float = 2.0,
        replyTimeout: float = 3.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.url = url
        self.name = name
        self.host, self.port, self.weight = host, port, weight
        self.prefix = prefix
        self.reactor = reactor
        self.ttl = ttl
        self.refreshInterval = refreshInterval
        self.pingInterval = pingInterval
        self.replyTimeout = replyTimeout
        self.channel = f"{prefix}relay:{name}"
        self.presence = RedisPresence(self)
        self.relay = RedisRelay(self)
        self.commands = Link(self, "command", CommandProtocol, self._commandsReady)
        self.subscriber = Link(self, "subscriber", SubscriberProtocol, self._subscriberReady)
        self.receiver = None
        self.loginCount = lambda: 0
        #: set while this server's registry entry is believed current
        self.registered = False
        self._needReassert = False
        self.subscribed = False
        self._users = set()  # "presence", "relay": who needs the command link
        self._refresher: task.LoopingCall | None = None
        self._pinger: task.LoopingCall | None = None
        self._registeredWaiters: list[defer.Deferred] = []
        self._subscribedWaiters: list[defer.Deferred] = []
        self._batch: list = []
        self._flushCall = None
        self._inflight: set[defer.Deferred] = set()

    # --- commands ----------------------------------------------------------

    def _protocol(self):
        p = self.commands.protocol
        if p is None or not p.connected:
            raise PresenceUnavailable(f"not connected to Redis at {self.url.host}:{self.url.port}")
        return p

    def eval(self, script: str, args) -> defer.Deferred:
        """Run C{script} with C{args} as ARGV; Redis failures become
        L{PresenceUnavailable}."""
        try:
            d = self._protocol().eval(script, [], [self.prefix, *args])
        except Exception:
            d = defer.fail()
        return d.addErrback(_unavailable)

    # --- registry ----------------------------------------------------------

    def _commandsReady(self, p) -> None:
        if "presence" in self._users:
            self._refresh()

    @defer.inlineCallbacks
    def register(self):
        """Write this server's registry entry; re-assert its users if
        Redis had forgotten it.  Fires with whether it existed."""
        existed = yield self.eval(
            REGISTER,
            [
                self.name,
                self.host,
                self.port,
                self.weight,
                int(self.loginCount()),
                int(self.reactor.seconds()),
                int(self.ttl * 1000),
            ],
        )
        existed = int(existed) == 1
        if not existed and self.registered is not None:
            # Not the first registration: Redis forgot this server.
            self._needReassert = True
        self.registered = True
        if self._needReassert:
            yield self._reassert()
            self._needReassert = False
        waiters, self._registeredWaiters = self._registeredWaiters, []
        for d in waiters:
            d.callback(None)
        return existed

    def _refresh(self) -> defer.Deferred:
        if self.commands.protocol is None:
            return defer.succeed(None)
        d = self.register()

        def failed(f):
            self.registered = False
            if not f.check(PresenceUnavailable):
                log.failure("refreshing the registry entry of {name}", f, name=self.name)
            else:
                log.warn("cannot refresh the registry entry of {name}: {error}", name=self.name, error=f.getErrorMessage())

        return d.addErrback(failed)

    @defer.inlineCallbacks
    def _reassert(self):
        """Re-assert the presence of this server's logged-in users; kick the
        ones another server took meanwhile."""
        receiver = self.receiver
        if receiver is None:
            return
        sessions = list(receiver.localSessions())
        if not sessions:
            return
        sids = dict(sessions)
        lost = []
        for start in range(0, len(sessions), 500):
            args = [self.name]
            for uid, sid in sessions[start : start + 500]:
                args += [int(uid), sid]
            lost += (yield self.eval(REASSERT, args))
        log.info(
            "re-asserted {n} sessions of {name} in Redis; {lost} logged in elsewhere meanwhile",
            n=len(sessions) - len(lost),
            name=self.name,
            lost=len(lost),
        )
        for uid in lost:
            uid = int(uid)
            receiver.kickLocal(uid, sids[uid], "logged in elsewhere")

    def startPresence(self, loginCount) -> defer.Deferred:
        self.loginCount = loginCount
        self._users.add("presence")
        self.registered = None  # first registration: nothing to re-assert
        d = defer.Deferred()
        self._registeredWaiters.append(d)
        if self._refresher is None:
            self._refresher = task.LoopingCall(self._refresh)
            self._refresher.clock = self.reactor
            self._refresher.start(self.refreshInterval, now=False)
        if self.commands.running:
            self._refresh()
        else:
            self.commands.start()
        return d

    @defer.inlineCallbacks
    def stopPresence(self):
        self._users.discard("presence")
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        self._refresher = None
        if self.commands.protocol is not None:
            try:
                yield self.eval(DEREGISTER, [self.name])
            except PresenceUnavailable as e:
                log.warn("could not deregister {name}: {error}", name=self.name, error=e)
        self.registered = False
        yield self._releaseCommands()

    @defer.inlineCallbacks
    def _releaseCommands(self):
        if not self._users:
            if self._inflight:
                yield defer.DeferredList(list(self._inflight))
            yield self.commands.stop()

    # --- relay -------------------------------------------------------------

    def _subscriberReady(self, p) -> None:
        d = p.subscribe(self.channel)

        def subscribed(_):
            self.subscribed = True
            waiters, self._subscribedWaiters = self._subscribedWaiters, []
            for w in waiters:
                w.callback(None)

        def failed(f):
            log.warn("subscribing to {channel} failed: {error}", channel=self.channel, error=f.getErrorMessage())
            self.subscriber.drop()

        d.addCallbacks(subscribed, failed)
        p.whenDisconnected().addCallback(self._unsubscribed)

    def _unsubscribed(self, _) -> None:
        self.subscribed = False

    def _ping(self) -> None:
        # The protocol's reply timeout closes a connection that does not
        # answer (half-open socket, or a subscription never confirmed);
        # Link then reconnects.  The registry refresh is the command
        # connection's ping while presence runs.
        links = [self.subscriber] if self._refresher is not None else [self.subscriber, self.commands]
        for link in links:
            p = link.protocol
            if p is not None and p.connected:
                p.ping().addErrback(lambda f: None)

    def startRelay(self, receiver) -> defer.Deferred:
        self.receiver = receiver
        self._users.add("relay")
        d = defer.Deferred()
        self._subscribedWaiters.append(d)
        self.subscriber.start()
        if not self.commands.running:
            self.commands.start()
        if self._pinger is None:
            self._pinger = task.LoopingCall(self._ping)
            self._pinger.clock = self.reactor
            self._pinger.start(self.pingInterval, now=False)
        return d

    @defer.inlineCallbacks
    def stopRelay(self):
        self._users.discard("relay")
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None
        self.subscribed = False
        yield self.subscriber.stop()
        if self._flushCall is not None:
            self._flushCall.cancel()
        if self._batch:
            self._flush()
        yield self._releaseCommands()

    def _received(self, payload) -> None:
        """A message on this server's channel."""
        receiver = self.receiver
        batch_.begin()
        try:
            if isinstance(payload, bytes):
                payload = payload.decode("utf-8")
            data = json.loads(payload)
            if isinstance(data, dict):
                receiver.kickLocal(int(data["kick"]), data["session"], data.get("reason", "logged in elsewhere"))
                return
            for store, uids, message in data:
                receiver.deliverLocal(uids, message, bool(store))
        except Exception:
            log.failure("handling a relayed message {payload!r}", payload=payload[:200])
        finally:
            batch_.end()

    def deliver(self, uids, message, store, line=None) -> defer.Deferred:
        uids = [int(uid) for uid in uids]
        if not uids:
            return defer.succeed([])
        if self.commands.protocol is None:
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
        if self._batch and self._flushCall is None and len(self._inflight) < self.maxInflight:
            self._flushCall = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flushCall = None
        batch, self._batch = self._batch, []
        for start in range(0, len(batch), self.maxBatch):
            self._send(batch[start : start + self.maxBatch])

    def _send(self, batch) -> None:
        lines = [
            f"{'1' if store else '0'}{','.join(map(str, uids))}\t{message}\n" for uids, message, store, _ in batch
        ]
        d = self.eval(RELAY, ["".join(lines)])
        self._inflight.add(d)

        def done(result):
            self._inflight.discard(d)
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
            batch_.begin()
            try:
                for i, (*_, waiter) in enumerate(batch):
                    waiter.callback(missed.get(i, []))
            finally:
                batch_.end()
            return None

        d.addBoth(done)

    def kick(self, location: Location, uid: int, reason: str) -> defer.Deferred:
        payload = _compact({"kick": int(uid), "session": location.session, "reason": reason})
        try:
            d = self._protocol().publish(f"{self.prefix}relay:{location.server}", payload)
        except Exception:
            d = defer.fail()
        d.addErrback(_unavailable)
        return d.addCallback(lambda n: int(n) > 0)


@implementer(IPresence)
class RedisPresence:
    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self.serverName = cluster.name

    def start(self, loginCount) -> defer.Deferred:
        return self.cluster.startPresence(loginCount)

    def stop(self) -> defer.Deferred:
        return self.cluster.stopPresence()

    @defer.inlineCallbacks
    def claim(self, uid: int, session: str, replace: bool):
        cluster = self.cluster
        args = [cluster.name, int(uid), session, "1" if replace else "0"]
        status, owner = yield cluster.eval(CLAIM, args)
        if int(status) == -1:
            # This server's entry expired (Redis restarted or we were cut
            # off): register again, then claim.
            yield cluster.register()
            status, owner = yield cluster.eval(CLAIM, args)
            if int(status) == -1:
                raise PresenceUnavailable("this server is not registered in Redis")
        return ClaimResult(int(status) == 1, _location(owner))

    def release(self, uid: int, session: str) -> defer.Deferred:
        d = self.cluster.eval(RELEASE, [self.cluster.name, int(uid), session])
        return d.addCallback(lambda removed: int(removed) == 1)

    def locate(self, uids) -> defer.Deferred:
        uids = [int(uid) for uid in uids]
        if not uids:
            return defer.succeed({})
        d = self.cluster.eval(LOCATE, uids)
        return d.addCallback(lambda values: {uid: _location(v) for uid, v in zip(uids, values) if v})

    def servers(self) -> defer.Deferred:
        def parse(entries):
            infos = []
            for fields in entries:
                h = dict(zip(fields[::2], fields[1::2]))
                try:
                    infos.append(
                        ServerInfo(
                            h["name"],
                            h.get("host", ""),
                            int(h.get("port") or 0),
                            int(h.get("weight") or 0),
                            int(h.get("logins") or 0),
                            {"updated": int(h.get("updated") or 0)},
                        )
                    )
                except (KeyError, ValueError):
                    log.warn("malformed registry entry {entry!r}", entry=h)
            return sorted(infos, key=lambda s: s.name)

        return self.cluster.eval(SERVERS, []).addCallback(parse)


@implementer(IRelay)
class RedisRelay:
    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster

    def start(self, receiver) -> defer.Deferred:
        return self.cluster.startRelay(receiver)

    def stop(self) -> defer.Deferred:
        return self.cluster.stopRelay()

    def deliver(self, uids, message, store, line=None) -> defer.Deferred:
        return self.cluster.deliver(uids, message, store, line)

    def kick(self, location, uid, reason) -> defer.Deferred:
        return self.cluster.kick(location, uid, reason)
