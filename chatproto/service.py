"""
The chat service: the request handlers and the lifecycle.

Sessions (L{IChatSession}, see L{chatproto.protocol}) call
L{ChatService.handle}; the handlers use the parts the service is made of:

 - L{chatproto.registry.SessionRegistry}: connections, logged-in sessions,
   local kicks, online states;
 - L{chatproto.login.LoginFlow}: throttle, password check, claim/kick,
   hand-over of offline messages, logout;
 - L{chatproto.delivery.Delivery}: local, relayed and offline delivery, held
   messages; the L{IRelayReceiver} the relay hands messages to;

and the seams: an L{IChatStore}, an L{IPresence} and an L{IRelay}.

A handler returns a reply (a L{dict}), L{None}, or a Deferred of either, and
raises L{RequestError} for an error reply.
"""

from __future__ import annotations

import inspect
import math
import time

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from chatproto import _twisted
from chatproto import messages as m
from chatproto.acks import DELIVERED, Confirmations, checkCid, checkMids, midFor, newMid
from chatproto.delivery import Delivery
from chatproto.friendrequests import AUTO, FriendRequests
from chatproto.groups import GroupHandlers
from chatproto.interfaces import NameTaken
from chatproto.listening import describeFailure
from chatproto.login import LoginFlow
from chatproto.logrepeat import RepeatedWarnings
from chatproto.messages import RequestError
from chatproto.pipeline import Pipelined
from chatproto.ratelimit import TokenBucketLimiter
from chatproto.remotechat import ackOf
from chatproto.registry import SessionRegistry
from chatproto.shutdown import GracefulStop
from chatproto.tasks import BackgroundTasks, ReadyGate, storeCall


class _Clock:
    """Formats the server's time once per second."""

    def __init__(self, clock) -> None:
        self._clock = clock
        self._second = None
        self._text = ""

    def now(self) -> str:
        second = int(self._clock.seconds())
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return self._text


def _limit(limiter, key, what: str) -> None:
    """Take a token of C{limiter} for C{key}, or refuse with errno 3."""
    wait = limiter.take(key)
    if wait > 0:
        raise RequestError(m.E_THROTTLED, f"{what}; retry in {math.ceil(wait)} s")


class ChatService(service.Service):
    """
    @param onRelogin: C{"kick"} (a new login closes the old session) or
        C{"reject"} (a new login is refused while the old one lives).
    @param friendRequests: C{"auto"} or C{"approve"} (see
        L{chatproto.friendrequests}).
    @ivar registry: the L{SessionRegistry}.
    @ivar loginFlow: the L{LoginFlow}.
    @ivar delivery: the L{Delivery} (also the relay's receiver).
    """

    log = Logger()

    def __init__(
        self, store, presence, relay, hasher, clock, onRelogin: str = "kick", friendRequests: str = AUTO, tokens=None
    ) -> None:
        self.store = store
        self.presence = presence
        self.relay = relay
        self.hasher = hasher
        self.clock = clock
        self.onRelogin = onRelogin
        self.serverName = presence.serverName
        self.warnings = RepeatedWarnings(self.log, clock)  # per-message warnings: one line, then a count
        self.tasks = BackgroundTasks(self.warnings)
        self.registry = SessionRegistry(self.serverName, presence)
        self.confirmations = Confirmations(clock, self.serverName, relay)
        self.confirmations.warnings = self.warnings
        self.delivery = Delivery(self.registry, store, relay, self.tasks, self.confirmations)
        self.delivery.onCongested = self.congested
        self.registry.onKick = self.delivery.storeUnacked
        self.loginFlow = LoginFlow(
            self.registry, self.delivery, store, presence, relay, hasher, clock, self.tasks, onRelogin, tokens
        )
        #: the --friend-requests policy (auto or approve)
        self.friendRequests = FriendRequests(friendRequests, self.registry, self.delivery, store, clock, self.tasks)
        self.loginFlow.friendRequests = self.friendRequests
        self.delivery.onFriendAdded = self.loginFlow.forgetFriends
        self.groups = GroupHandlers(store, self.registry, self.delivery, self.friendRequests, self.now, self.mid)
        self.ready = ReadyGate()
        self.registerLimiter = TokenBucketLimiter(clock, burst=100, rate=1.0)  # per address
        self.waitingFor: dict[str, str] = {}  # start-up stage -> what it waits for (no passwords)
        self.shutdown = GracefulStop(self)
        self._time = _Clock(clock)
        #: the registry's uid -> logged-in session, and sid -> connection
        self.sessions = self.registry.sessions
        self.connections = self.registry.connections

    # --- lifecycle ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        _twisted.check()
        d = defer.Deferred.fromCoroutine(self._start())
        d.addErrback(self._startFailed)

    def _startFailed(self, failure) -> None:
        self.ready.fail(RequestError(m.E_UNAVAILABLE, "server is starting up or could not start"))
        if self.onStartFailure is not None:
            return self.onStartFailure(failure)
        self.log.error("chat server {name} could not start: {e}", name=self.serverName, e=describeFailure(failure))

    #: Called with the failure when start-up fails (twistd: stop the reactor).
    onStartFailure = None

    @property
    def isReady(self) -> bool:
        """True once storage, presence and relay are up."""
        return self.ready.isReady

    def whenReady(self) -> defer.Deferred:
        """A new Deferred that fires once the service is ready."""
        return self.ready.whenReady()

    async def _start(self) -> None:
        wait = lambda stage, d: self.ready.stage(self.clock, self.waitingFor.get(stage, stage), d)  # noqa: E731
        await wait("store", self.store.start())
        await wait("presence", self.presence.start(self.registry.loginCount))
        await wait("relay", self.relay.start(self.delivery))
        self.log.info("chat server {name} ready", name=self.serverName)
        self.ready.open()

    def stopService(self) -> defer.Deferred:
        if not self.running:
            return defer.succeed(None)
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop()).addBoth(self._stopLogs)

    def _stopLogs(self, result):
        self.warnings.stop()
        self.loginFlow.sessionLog.stop()
        return result

    async def _stop(self) -> None:
        # Answer what was read, say goodbye, then log out (shutdown.py).
        await self.shutdown.run()
        self.confirmations.flush()
        for name, stop in (("relay", self.relay.stop), ("presence", self.presence.stop), ("store", self.store.close)):
            try:
                await stop()
            except Exception:
                self.log.failure("stopping {name}", name=name)
        self.log.info("chat server {name} stopped", name=self.serverName)

    # --- what sessions call ------------------------------------------------

    def newSessionId(self) -> str:
        return self.registry.newSessionId()

    def connected(self, session) -> None:
        self.registry.connected(session)

    def disconnected(self, session) -> None:
        self.registry.disconnected(session)
        self.delivery.storeHeld(session)
        if session.uid is not None:
            self.tasks.track(defer.Deferred.fromCoroutine(self.logout(session, revoke=False)))

    def logout(self, session, notify: bool = True, revoke: bool = True):
        """Log C{session}'s user out (a coroutine); C{revoke}: an explicit
        logout (LOGINOUT_MSG, text quit), which revokes the session's token."""
        return self.loginFlow.logout(session, notify, revoke)

    def congested(self, session) -> None:
        """C{session} does not read: log it out (what is sent to it is then stored offline), close it."""
        self.warnings.warn("slow reader", "[{uid}] does not read what it is sent; logging it out", uid=session.uid)
        if session.uid is not None:
            self.tasks.track(defer.Deferred.fromCoroutine(self.logout(session, revoke=False)))
        session.kick("too slow reading; undelivered messages wait for your next login")

    def now(self) -> str:
        return self._time.now()

    def handle(self, session, request: m.Request):
        """
        Carry out C{request} for C{session}.

        @return: a reply L{dict}, L{None}, a Deferred of either, or a
            L{Pipelined} (a chat: L{chatproto.pipeline}).
        @raise RequestError: for an error reply.
        """
        if not self.ready.isReady and request.spec.name != "ping":
            self.ready.refuse()
        if request.spec.needsLogin and session.uid is None:
            raise RequestError(m.E_NOT_LOGGED_IN)
        result = getattr(self, "do_" + request.spec.name)(session, request)
        # (A reply, the common case, before the costlier coroutine test.)
        if result is None or isinstance(result, dict):
            return result
        if inspect.iscoroutine(result):
            return self.shutdown.track(defer.Deferred.fromCoroutine(result))
        if type(result) is Pipelined:
            self.shutdown.track(result.done)
            return result
        return self.shutdown.track(result)

    # --- handlers ----------------------------------------------------------

    def do_ping(self, session, request) -> dict:
        return {"msgid": m.PONG_MSG}

    async def do_register(self, session, request) -> dict:
        name = m.checkName(request.args["name"])
        password = m.checkPassword(request.args["password"])
        _limit(self.registerLimiter, session.peerHost, "too many registrations from your address")
        passwordHash = await self.hasher.hash(password)
        try:
            uid = await storeCall(self.store.createUser(name, passwordHash))
        except NameTaken:
            raise RequestError(m.E_INVALID, f"the name {name!r} is taken") from None
        self.registry.names[uid] = name
        self.log.info("registered [{uid}]{name}", uid=uid, name=name)
        return {"msgid": m.REG_MSG_ACK, "errno": m.OK, "id": uid, "name": name}

    def do_login(self, session, request):
        return self.loginFlow.login(session, request)

    async def do_logout(self, session, request) -> dict:
        await self.logout(session)
        return {"msgid": m.LOGINOUT_MSG_ACK, "errno": m.OK}

    def do_passwd(self, session, request):
        return self.loginFlow.credentials.changePassword(session, request.args["old"], request.args["new"])

    def do_chat(self, session, request):
        toid = request.args["toid"]
        text = request.args["msg"]
        if not text:
            raise RequestError(m.E_BAD_FIELD, "msg must not be empty")
        out = {
            "msgid": m.ONE_CHAT_MSG,
            "id": session.uid,
            "name": session.name,
            "toid": toid,
            "msg": text,
            "time": self.now(),
            "mid": self.mid(session, request),
        }
        target = self.registry.sessions.get(toid)
        if target is not None and not target.acking and target.send(out, m.encodeChat(out)):
            # The fast path: no I/O but the write.
            return self.friendRequests.chatAck(session, toid, ackOf(toid, DELIVERED))
        # Elsewhere, offline or acking: the connection's next request starts
        # once this one is routed (chatproto.pipeline).
        result = self.delivery.chat(toid, out, target is None)
        if self.friendRequests.approve:
            result.done.addCallback(lambda ack: self.friendRequests.chatAck(session, toid, ack))
        return result

    @staticmethod
    def mid(session, request) -> str:
        """The mid of a chat: from the sender and its cid, or fresh."""
        cid = checkCid(request.args.get("cid"))
        return newMid() if cid is None else midFor(session.uid, cid)

    def do_pushack(self, session, request) -> None:
        self.delivery.acked(session, checkMids(request.args["mids"]))

    # friends: the --friend-requests policy is chatproto.friendrequests'
    def do_addfriend(self, session, request):
        self.loginFlow.forgetFriends(session)
        return self.friendRequests.addFriend(session, request.args["friendid"])

    def do_friendreply(self, session, request):
        self.loginFlow.forgetFriends(session)
        return self.friendRequests.reply(session, request.args["id"], request.args["accept"])

    # groups: chatproto.groups
    def do_creategroup(self, session, request):
        return self.groups.create(session, request)

    def do_addgroup(self, session, request):
        return self.groups.join(session, request)

    def do_groupchat(self, session, request):
        return self.groups.chat(session, request)

    def do_groups(self, session, request):
        return self.groups.list(session, request)

    async def do_friends(self, session, request) -> dict:
        friends = await storeCall(self.store.getFriends(session.uid))
        states = await self.registry.states([f for f, _ in friends])
        return {
            "msgid": m.FRIEND_LIST_MSG_ACK,
            "errno": m.OK,
            "friends": [{"id": f, "name": n, "state": states[f]} for f, n in friends],
            "requests": await self.friendRequests.pending(session.uid),
        }
