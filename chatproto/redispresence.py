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
by L{_Link}: C{reactor.connectTCP}/C{connectSSL} (TLS certificates are
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
import random

import txredisapi
from twisted.internet import defer, error, protocol, task
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto.interfaces import ClaimResult, IPresence, IRelay, Location, PresenceUnavailable, ServerInfo

log = Logger()

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

# --- Lua -------------------------------------------------------------------

# Shared by the scripts: the server part of a presence entry when that
# server is alive (memoised per call in `live`), else nil.
_LIVE_OWNER = """
local function liveOwner(P, value, live)
  if not value then return nil end
  local tab = string.find(value, '\\t', 1, true)
  if not tab then return nil end
  local srv = string.sub(value, 1, tab - 1)
  local alive = live[srv]
  if alive == nil then
    alive = redis.call('EXISTS', P .. 'server:' .. srv) == 1
    live[srv] = alive
  end
  if alive then return srv end
  return nil
end
"""

#: ARGV: prefix, me, uid, session, replace ("1"/"0").
#: Returns {-1} (this server is not registered), {0, owner} (lost to a live
#: owner) or {1, previous live owner or ""}.
CLAIM = (
    _LIVE_OWNER
    + """
local P, me, uid, sess, replace = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local mine = P .. 'server:' .. me
if redis.call('EXISTS', mine) == 0 then return {-1, ''} end
local key = P .. 'user:' .. uid
local value = me .. '\\t' .. sess
local current = redis.call('GET', key)
if current == value then return {1, ''} end
local owner = liveOwner(P, current, {})
if owner and replace ~= '1' then return {0, current} end
redis.call('SET', key, value)
if owner ~= me then
  redis.call('HINCRBY', mine, 'logins', 1)
  if owner then redis.call('HINCRBY', P .. 'server:' .. owner, 'logins', -1) end
end
if owner then return {1, current} end
return {1, ''}
"""
)

#: ARGV: prefix, me, uid, session.  Compare-and-delete; returns 1 if removed.
RELEASE = """
local P, me, uid, sess = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = P .. 'user:' .. uid
if redis.call('GET', key) ~= me .. '\\t' .. sess then return 0 end
redis.call('DEL', key)
local mine = P .. 'server:' .. me
if redis.call('EXISTS', mine) == 1 then redis.call('HINCRBY', mine, 'logins', -1) end
return 1
"""

#: ARGV: prefix, uid...  Returns one entry per uid ("" when offline).
LOCATE = (
    _LIVE_OWNER
    + """
local P, live, out = ARGV[1], {}, {}
for i = 2, #ARGV do
  local value = redis.call('GET', P .. 'user:' .. ARGV[i])
  if liveOwner(P, value, live) then out[i - 1] = value else out[i - 1] = '' end
end
return out
"""
)

#: ARGV: prefix, name, host, port, weight, logins, updated, ttl (ms).
#: Returns 1 if the hash existed, 0 if it was (re)created: this server had
#: been forgotten (Redis restarted, or this server was cut off past the TTL).
REGISTER = """
local P, name = ARGV[1], ARGV[2]
local key = P .. 'server:' .. name
local existed = redis.call('EXISTS', key)
redis.call('HSET', key, 'name', name, 'host', ARGV[3], 'port', ARGV[4], 'weight', ARGV[5],
           'logins', ARGV[6], 'updated', ARGV[7])
redis.call('PEXPIRE', key, ARGV[8])
local servers = P .. 'servers'
redis.call('SADD', servers, name)
for _, other in ipairs(redis.call('SMEMBERS', servers)) do
  if redis.call('EXISTS', P .. 'server:' .. other) == 0 then redis.call('SREM', servers, other) end
end
return existed
"""

#: ARGV: prefix, name.
DEREGISTER = """
redis.call('DEL', ARGV[1] .. 'server:' .. ARGV[2])
redis.call('SREM', ARGV[1] .. 'servers', ARGV[2])
return 1
"""

#: ARGV: prefix, me, uid1, session1, uid2, session2...  Re-asserts this
#: server's sessions; returns the uids now owned by another live server.
REASSERT = (
    _LIVE_OWNER
    + """
local P, me, live, lost = ARGV[1], ARGV[2], {}, {}
for i = 3, #ARGV, 2 do
  local key = P .. 'user:' .. ARGV[i]
  local owner = liveOwner(P, redis.call('GET', key), live)
  if owner and owner ~= me then
    lost[#lost + 1] = ARGV[i]
  else
    redis.call('SET', key, me .. '\\t' .. ARGV[i + 1])
  end
end
return lost
"""
)

#: Returns the HGETALL of every live server.
SERVERS = """
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'servers')) do
  local fields = redis.call('HGETALL', ARGV[1] .. 'server:' .. name)
  if #fields > 0 then out[#out + 1] = fields end
end
return out
"""

#: ARGV: prefix, count, then per delivery: store ("1"/"0"), n, n uids, the
#: message's JSON.  Looks every uid up, PUBLISHes one JSON array per owning
#: server, and returns per delivery the uids nobody took (offline, dead
#: server, or no subscriber on its channel).
RELAY = (
    _LIVE_OWNER
    + """
local P = ARGV[1]
local count = tonumber(ARGV[2])
local live, missed, records, routes, order = {}, {}, {}, {}, {}
local i = 3
for d = 1, count do
  local store, n = ARGV[i], tonumber(ARGV[i + 1])
  local message = ARGV[i + 2 + n]
  local lost, targets, servers = {}, {}, {}
  for k = i + 2, i + 1 + n do
    local uid = ARGV[k]
    local srv = liveOwner(P, redis.call('GET', P .. 'user:' .. uid), live)
    if srv then
      local t = targets[srv]
      if not t then
        t = {}
        targets[srv] = t
        servers[#servers + 1] = srv
      end
      t[#t + 1] = uid
    else
      lost[#lost + 1] = uid
    end
  end
  missed[d] = lost
  for _, srv in ipairs(servers) do
    local uids = targets[srv]
    if not records[srv] then
      records[srv] = {}
      routes[srv] = {}
      order[#order + 1] = srv
    end
    local r = records[srv]
    r[#r + 1] = '[' .. store .. ',[' .. table.concat(uids, ',') .. '],' .. message .. ']'
    local rt = routes[srv]
    rt[#rt + 1] = {d, uids}
  end
  i = i + 3 + n
end
for _, srv in ipairs(order) do
  local payload = '[' .. table.concat(records[srv], ',') .. ']'
  if redis.call('PUBLISH', P .. 'relay:' .. srv, payload) == 0 then
    for _, route in ipairs(routes[srv]) do
      local lost = missed[route[1]]
      for _, uid in ipairs(route[2]) do lost[#lost + 1] = uid end
    end
  end
end
return missed
"""
)


# --- connections -----------------------------------------------------------


def _readyProtocol(base):
    """A txredisapi protocol class that tells its L{_Link} when it is ready
    (after AUTH and SELECT) and when it is gone."""

    class Protocol(base):
        link = None

        def connectionMade(self):
            d = base.connectionMade(self)
            d.addCallback(self._made)
            d.addErrback(lambda f: log.failure("Redis connection set-up failed", f))

        def _made(self, _):
            if self._ready:
                self.link.protocolReady(self)

    return Protocol


class _CommandProtocol(_readyProtocol(txredisapi.RedisProtocol)):
    pass


class _SubscriberProtocol(_readyProtocol(txredisapi.SubscriberProtocol)):
    def messageReceived(self, pattern, channel, message):
        self.link.cluster._received(message)


class _Link(protocol.ClientFactory):
    """
    One Redis connection kept up: reconnects with exponential back-off
    (C{initialDelay} doubling up to C{maxDelay}, with jitter) for as long
    as it runs, whatever went wrong (refused, timed out, AUTH failed).

    It is also the C{factory} that txredisapi's protocol reports to.
    """

    noisy = False
    isLazy = True  # txredisapi: errors are logged, not raised to a caller
    initialDelay = 0.1
    maxDelay = 5.0
    factor = 2.0
    connectTimeout = 3

    def __init__(self, cluster, name: str, protocolClass, onReady) -> None:
        self.cluster = cluster
        self.name = name
        self.protocolClass = protocolClass
        self.onReady = onReady
        self.protocol = None  # the ready protocol, if any
        self.running = False
        self.connector = None
        self.delay = self.initialDelay
        self._retryCall = None
        self._transport = None  # the connection being set up or in use
        self._stopped: list[defer.Deferred] = []
        self._failures = 0
        #: "disconnected", "connecting" or "connected"
        self.state = "disconnected"

    @property
    def reactor(self):
        return self.cluster.reactor

    def start(self) -> None:
        if not self.running:
            self.running = True
            self._connect()

    def _connect(self) -> None:
        self._retryCall = None
        self.state = "connecting"
        url = self.cluster.url
        if url.tls:
            self.connector = self.reactor.connectSSL(
                url.host, url.port, self, optionsForClientTLS(url.host), timeout=self.connectTimeout
            )
        else:
            self.connector = self.reactor.connectTCP(url.host, url.port, self, timeout=self.connectTimeout)

    def buildProtocol(self, addr):
        self.state = "connected"
        url = self.cluster.url
        p = self.protocolClass(
            charset="utf-8",
            replyTimeout=self.cluster.replyTimeout,
            password=url.password,
            dbid=url.db or None,
            convertNumbers=False,
        )
        p.factory = self
        p.link = self
        # txredisapi binds these to the global reactor.
        p.callLater = self.reactor.callLater
        return p

    def protocolReady(self, p) -> None:
        if not self.running:
            p.transport.loseConnection()
            return
        self.protocol = p
        self.delay = self.initialDelay
        if self._failures:
            log.info("Redis {link} connection to {host}:{port} is back", link=self.name, host=self.cluster.url.host, port=self.cluster.url.port)
        self._failures = 0
        self.onReady(p)

    # txredisapi calls these when AUTH or SELECT fails; we keep retrying.
    def stopTrying(self) -> None:
        pass

    def connectionError(self, why) -> None:
        log.error("Redis {link} connection: {why}; retrying", link=self.name, why=why)

    def clientConnectionFailed(self, connector, reason) -> None:
        self._gone(reason)

    def clientConnectionLost(self, connector, reason) -> None:
        self._gone(reason)

    def _gone(self, reason) -> None:
        self.protocol = None
        self.state = "disconnected"
        if not self.running:
            waiters, self._stopped = self._stopped, []
            for d in waiters:
                d.callback(None)
            return
        self._failures += 1
        if self._failures == 1 or self._failures % 20 == 0:
            log.warn(
                "Redis {link} connection to {host}:{port} lost or failed ({why}); reconnecting",
                link=self.name,
                host=self.cluster.url.host,
                port=self.cluster.url.port,
                why=reason.getErrorMessage(),
            )
        delay = random.uniform(0.8, 1.2) * self.delay
        self.delay = min(self.delay * self.factor, self.maxDelay)
        self._retryCall = self.reactor.callLater(delay, self._connect)

    def drop(self) -> None:
        """Abort the current connection (it will be made again)."""
        p = self.protocol
        if p is not None and p.transport is not None:
            p.transport.abortConnection()

    def stop(self) -> defer.Deferred:
        """Stop reconnecting and close the connection; fires once closed."""
        self.running = False
        if self._retryCall is not None:
            self._retryCall.cancel()
            self._retryCall = None
            return defer.succeed(None)
        connector = self.connector
        if connector is None or self.state == "disconnected":
            return defer.succeed(None)
        d = defer.Deferred()
        self._stopped.append(d)
        if self.state == "connecting":
            connector.stopConnecting()
        else:
            connector.disconnect()
        return d


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
        self.commands = _Link(self, "command", _CommandProtocol, self._commandsReady)
        self.subscriber = _Link(self, "subscriber", _SubscriberProtocol, self._subscriberReady)
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
        p = self.subscriber.protocol
        if p is None or not self.subscribed:
            return
        # The protocol's reply timeout closes a connection that does not
        # answer (half-open socket); _Link then reconnects.
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
            self._flush()
        yield self._releaseCommands()

    def _received(self, payload) -> None:
        """A message on this server's channel."""
        receiver = self.receiver
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

    def deliver(self, uids, message, store) -> defer.Deferred:
        uids = [int(uid) for uid in uids]
        if not uids:
            return defer.succeed([])
        if self.commands.protocol is None:
            return defer.fail(PresenceUnavailable("not connected to Redis"))
        d = defer.Deferred()
        self._batch.append((uids, _compact(message), store, d))
        if self._flushCall is None:
            self._flushCall = self.reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        self._flushCall = None
        batch, self._batch = self._batch, []
        for start in range(0, len(batch), self.maxBatch):
            self._send(batch[start : start + self.maxBatch])

    def _send(self, batch) -> None:
        args = [len(batch)]
        for uids, message, store, _ in batch:
            args.append("1" if store else "0")
            args.append(len(uids))
            args.extend(uids)
            args.append(message)
        d = self.eval(RELAY, args)
        self._inflight.add(d)

        def done(result):
            self._inflight.discard(d)
            if isinstance(result, Failure):
                for *_, waiter in batch:
                    waiter.errback(result)
                return None
            for (*_, waiter), missed in zip(batch, result):
                waiter.callback([int(uid) for uid in missed])
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

    def deliver(self, uids, message, store) -> defer.Deferred:
        return self.cluster.deliver(uids, message, store)

    def kick(self, location, uid, reason) -> defer.Deferred:
        return self.cluster.kick(location, uid, reason)
