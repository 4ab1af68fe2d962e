"""
Cluster presence and relay in Redis (txredisapi): several C{twistd chat}
processes behave as one chat service.

L{RedisCluster} (this module) owns the two connections and this server's
registry entry; L{chatproto.redispresence.RedisPresence} claims and locates
users; L{chatproto.redisrelay.RedisRelay} batches deliveries, receives what
other servers send here, and sends kicks.

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

import txredisapi
from twisted.internet import defer, error, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproto.interfaces import Location, PresenceUnavailable
from chatproto.redislink import CommandProtocol, Link, SubscriberProtocol
from chatproto.redischeck import SessionCheck
from chatproto.redisscripts import DEREGISTER, REGISTER, scriptCall

log = Logger()


def unavailable(failure: Failure):
    """Redis failures as L{PresenceUnavailable}."""
    if failure.check(PresenceUnavailable):
        return failure
    if failure.check(txredisapi.RedisError, error.ConnectionDone, error.ConnectionLost, defer.CancelledError):
        raise PresenceUnavailable(f"Redis: {failure.getErrorMessage()}")
    return failure


def parseLocation(value: str) -> Location | None:
    if not value:
        return None
    server, _, session = value.partition("\t")
    return Location(server, session)


class RedisCluster:
    """
    This server's membership of a Redis-backed cluster: owns the command
    and subscriber connections and this server's registry entry, and
    provides L{presence} (an L{IPresence}) and L{relay} (an L{IRelay}).

    @param url: a L{chatproto.config.RedisURL}.
    @param name: this server's name (unique in the cluster).
    @param host, port, weight: what the registry advertises for clients.
    """

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
        from chatproto.redispresence import RedisPresence
        from chatproto.redisrelay import RedisRelay

        self.url = url
        self.name = name
        self.host, self.port, self.weight = host, port, weight
        self.prefix = prefix
        self.reactor = reactor
        self.ttl = ttl
        self.refreshInterval = refreshInterval
        self.pingInterval = pingInterval
        self.replyTimeout = replyTimeout
        self.presence = RedisPresence(self)
        self.relay = RedisRelay(self)
        self.commands = Link(self, "command", CommandProtocol, self._commandsReady)
        self.subscriber = Link(self, "subscriber", SubscriberProtocol, self._subscriberReady, self.relay.received)
        self.loginCount = lambda: 0
        #: set while this server's registry entry is believed current
        self.registered = False
        #: set once this server has announced its shutdown (deregistered)
        self.stopping = False
        self.sessionCheck = SessionCheck(self)
        self._users = set()  # "presence", "relay": who needs the command link
        self._refresher: task.LoopingCall | None = None
        self._pinger: task.LoopingCall | None = None
        self._registeredWaiters: list[defer.Deferred] = []

    # --- commands ----------------------------------------------------------

    def protocol(self):
        """The ready command connection; L{PresenceUnavailable} if none."""
        p = self.commands.protocol
        if p is None or not p.connected:
            host, port = self.commands.address
            raise PresenceUnavailable(f"not connected to Redis at {host}:{port}")
        return p

    def commandConnection(self):
        """The ready command connection, or None while there is none (for
        L{chatproto.tokenstore_redis.RedisTokenStore})."""
        p = self.commands.protocol
        return p if p is not None and p.connected else None

    def eval(self, script: str, args) -> defer.Deferred:
        """Run C{script} (one of L{chatproto.redisscripts}) for C{args}: its
        KEYS and ARGV are built by L{scriptCall}.  Redis failures become
        L{PresenceUnavailable}."""
        try:
            keys, argv = scriptCall(script, self.prefix, args)
            d = self.protocol().eval(script, keys, argv)
        except Exception:
            d = defer.fail()
        return d.addErrback(unavailable)

    def command(self, *args) -> defer.Deferred:
        """One plain command on the command connection."""
        try:
            d = self.protocol().execute_command(*args)
        except Exception:
            d = defer.fail()
        return d.addErrback(unavailable)

    def publish(self, channel: str, payload: str) -> defer.Deferred:
        """PUBLISH; fires with the number of subscribers that got it."""
        try:
            d = self.protocol().publish(channel, payload)
        except Exception:
            d = defer.fail()
        return d.addErrback(unavailable)

    def channelOf(self, server: str) -> str:
        """The relay channel of C{server}."""
        return f"{self.prefix}relay:{server}"

    def acquire(self, user: str) -> None:
        """C{user} ("presence" or "relay") needs the command connection."""
        self._users.add(user)
        if not self.commands.running:
            self.commands.start()

    @defer.inlineCallbacks
    def release(self, user: str, pending=()):
        """C{user} is done with the command connection; it closes when
        nobody needs it, after C{pending} Deferreds have fired."""
        self._users.discard(user)
        if not self._users:
            if pending:
                yield defer.DeferredList(list(pending))
            yield self.commands.stop()

    # --- registry ----------------------------------------------------------

    def _commandsReady(self, p) -> None:
        if "presence" in self._users:
            self._refresh()

    @defer.inlineCallbacks
    def register(self, full: bool = True):
        """Write this server's registry entry, then check its sessions
        against presence (L{checkSessions}; not C{full}: the next slice,
        unless the entry was gone).  Fires with whether the entry
        existed."""
        if self.stopping:
            raise PresenceUnavailable(f"{self.name} is shutting down")
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
            log.info("the registry entry of {name} was gone (Redis restarted or failed over); re-asserting", name=self.name)
        self.registered = True
        yield self.sessionCheck.run(full or not existed)
        waiters, self._registeredWaiters = self._registeredWaiters, []
        for d in waiters:
            d.callback(None)
        return existed

    def _refresh(self, full: bool = True) -> defer.Deferred:
        if self.commands.protocol is None:
            return defer.succeed(None)
        d = self.register(full)

        def failed(f):
            self.registered = False
            if not f.check(PresenceUnavailable):
                log.failure("refreshing the registry entry of {name}", f, name=self.name)
            else:
                log.warn("cannot refresh the registry entry of {name}: {error}", name=self.name, error=f.getErrorMessage())

        return d.addErrback(failed)

    def checkSessions(self) -> defer.Deferred:
        """Compare this server's sessions with presence (see
        L{chatproto.redischeck.SessionCheck})."""
        return self.sessionCheck.run()

    def _subscriberReady(self, p) -> None:
        self.relay.subscriberReady(p)
        if "presence" in self._users and not self.stopping:
            self.sessionCheck.afterSubscribe(p)

    def startRegistry(self, loginCount) -> defer.Deferred:
        """Register this server and keep its entry fresh; fires once
        registered."""
        self.loginCount = loginCount
        self.stopping = False
        self._users.add("presence")
        self.registered = None  # first registration: nothing to re-assert
        d = defer.Deferred()
        self._registeredWaiters.append(d)
        if self._refresher is None:
            self._refresher = task.LoopingCall(self._refresh, full=False)
            self._refresher.clock = self.reactor
            self._refresher.start(self.refreshInterval, now=False)
        if self.commands.running:
            self._refresh()
        else:
            self.commands.start()
        return d

    @defer.inlineCallbacks
    def announceStop(self):
        """
        This server is shutting down: stop refreshing and delete its
        registry entry at once, so that its users count as offline
        everywhere (other servers store what they send them, and their
        logins elsewhere succeed even with C{--on-relogin reject}) and the
        balancer stops sending it clients.  Idempotent.
        """
        self.stopping = True
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        self._refresher = None
        if self.commands.protocol is not None:
            try:
                yield self.eval(DEREGISTER, [self.name])
            except PresenceUnavailable as e:
                log.warn("could not deregister {name}: {error}", name=self.name, error=e)
        self.registered = False

    @defer.inlineCallbacks
    def stopRegistry(self):
        yield self.announceStop()
        self._users.discard("presence")
        yield self.release("presence", self.relay.inflight)

    # --- keep-alive --------------------------------------------------------

    def startPinging(self) -> None:
        if self._pinger is None:
            self._pinger = task.LoopingCall(self._ping)
            self._pinger.clock = self.reactor
            self._pinger.start(self.pingInterval, now=False)

    def stopPinging(self) -> None:
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None

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
