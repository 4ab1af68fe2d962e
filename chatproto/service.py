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
import time

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from chatproto import _twisted
from chatproto import messages as m
from chatproto.delivery import Delivery
from chatproto.interfaces import NameTaken, NoSuchGroup, NoSuchUser
from chatproto.login import LoginFlow, groupDict
from chatproto.messages import RequestError
from chatproto.registry import SessionRegistry
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


def _deliveredAck(toid: int) -> m.Reply:
    """The ack of a chat the fast path delivered, pre-encoded."""
    return m.Reply(
        b'{"msgid":12,"errno":0,"toid":%d,"state":"delivered"}' % toid,
        msgid=m.ONE_CHAT_MSG_ACK,
        errno=m.OK,
        toid=toid,
        state="delivered",
    )


class ChatService(service.Service):
    """
    @param onRelogin: C{"kick"} (a new login closes the old session) or
        C{"reject"} (a new login is refused while the old one lives).
    @ivar registry: the L{SessionRegistry}.
    @ivar loginFlow: the L{LoginFlow}.
    @ivar delivery: the L{Delivery} (also the relay's receiver).
    """

    log = Logger()

    def __init__(self, store, presence, relay, hasher, clock, onRelogin: str = "kick", tokens=None) -> None:
        self.store = store
        self.presence = presence
        self.relay = relay
        self.hasher = hasher
        self.clock = clock
        self.onRelogin = onRelogin
        self.serverName = presence.serverName
        self.tasks = BackgroundTasks()
        self.registry = SessionRegistry(self.serverName, presence)
        self.delivery = Delivery(self.registry, store, relay, self.tasks)
        self.loginFlow = LoginFlow(
            self.registry, self.delivery, store, presence, relay, hasher, clock, self.tasks, onRelogin, tokens
        )
        self.ready = ReadyGate()
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
        self.log.failure("chat server {name} could not start", failure, name=self.serverName)
        self.ready.fail(RequestError(m.E_UNAVAILABLE, "server is starting up or could not start"))
        if self.onStartFailure is not None:
            self.onStartFailure(failure)

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
        await self.store.start()
        await self.presence.start(self.registry.loginCount)
        await self.relay.start(self.delivery)
        self.log.info("chat server {name} ready", name=self.serverName)
        self.ready.open()

    def stopService(self) -> defer.Deferred:
        if not self.running:
            return defer.succeed(None)
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self.loginFlow.logoutAll("server shutting down")
        if self.tasks.pending:
            await self.tasks.wait()
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
        """C{session} does not read what it is sent: log it out (so what is
        sent to its user from now on is stored offline) and close it."""
        if session.uid is not None:
            self.tasks.track(defer.Deferred.fromCoroutine(self.logout(session, revoke=False)))
        session.kick("too slow reading; undelivered messages wait for your next login")

    def now(self) -> str:
        return self._time.now()

    def handle(self, session, request: m.Request):
        """
        Carry out C{request} for C{session}.

        @return: a reply L{dict}, L{None}, or a Deferred of either.
        @raise RequestError: for an error reply.
        """
        if not self.ready.isReady:
            return self.ready.whenReady().addCallback(lambda _: self.handle(session, request))
        if request.spec.needsLogin and session.uid is None:
            raise RequestError(m.E_NOT_LOGGED_IN)
        result = getattr(self, "do_" + request.spec.name)(session, request)
        if inspect.iscoroutine(result):
            return defer.Deferred.fromCoroutine(result)
        return result

    # --- handlers ----------------------------------------------------------

    def do_ping(self, session, request) -> dict:
        return {"msgid": m.PONG_MSG}

    async def do_register(self, session, request) -> dict:
        name = m.checkName(request.args["name"])
        password = m.checkPassword(request.args["password"])
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
        }
        target = self.registry.sessions.get(toid)
        if target is not None and target.send(out, m.encodeChat(out)):
            # The fast path: no I/O but the write.
            return _deliveredAck(toid)
        return defer.Deferred.fromCoroutine(self.delivery.deliverChat(toid, out))

    async def do_addfriend(self, session, request) -> dict:
        friendId = request.args["friendid"]
        if friendId == session.uid:
            raise RequestError(m.E_SELF, "you cannot befriend yourself")
        try:
            new = await storeCall(self.store.addFriend(session.uid, friendId))
        except NoSuchUser:
            raise RequestError(m.E_NO_SUCH_USER, f"no user with id {friendId}") from None
        names = await storeCall(self.store.getNames([friendId]))
        states = await self.registry.states([friendId])
        if new:
            notice = {"msgid": m.FRIEND_ADDED_NOTICE, "id": session.uid, "name": session.name}
            self.delivery.deliverLater([friendId], notice)
        friend = {"id": friendId, "name": names[friendId], "state": states[friendId]}
        return {"msgid": m.ADD_FRIEND_MSG_ACK, "errno": m.OK, "friend": friend, "new": bool(new)}

    async def do_creategroup(self, session, request) -> dict:
        name = m.checkName(request.args["groupname"], m.MAX_GROUPNAME, "group name")
        desc = request.args["groupdesc"].strip()
        if len(desc) > m.MAX_GROUPDESC:
            raise RequestError(m.E_INVALID, f"group description is longer than {m.MAX_GROUPDESC} characters")
        try:
            gid = await storeCall(self.store.createGroup(name, desc, session.uid))
        except NameTaken:
            raise RequestError(m.E_NAME_TAKEN, f"a group named {name!r} exists") from None
        return {"msgid": m.CREATE_GROUP_MSG_ACK, "errno": m.OK, "groupid": gid, "groupname": name, "groupdesc": desc}

    async def do_addgroup(self, session, request) -> dict:
        gid = request.args["groupid"]
        try:
            new = await storeCall(self.store.joinGroup(gid, session.uid))
            group = await storeCall(self.store.getGroup(gid))
        except NoSuchGroup:
            raise RequestError(m.E_NO_SUCH_GROUP, f"no group with id {gid}") from None
        return {"msgid": m.ADD_GROUP_MSG_ACK, "errno": m.OK, "groupid": gid, "groupname": group.name, "new": bool(new)}

    async def do_groupchat(self, session, request) -> dict:
        gid = request.args["groupid"]
        text = request.args["msg"]
        if not text:
            raise RequestError(m.E_BAD_FIELD, "msg must not be empty")
        try:
            members = await storeCall(self.store.getGroupMembers(gid))
        except NoSuchGroup:
            raise RequestError(m.E_NO_SUCH_GROUP, f"no group with id {gid}") from None
        if not any(u.id == session.uid for u in members):
            raise RequestError(m.E_NOT_A_MEMBER)
        out = {
            "msgid": m.GROUP_CHAT_MSG,
            "id": session.uid,
            "name": session.name,
            "groupid": gid,
            "msg": text,
            "time": self.now(),
        }
        others = [u.id for u in members if u.id != session.uid]
        stored = await self.delivery.deliver(others, out, store=True)
        delivered, stored = len(others) - len(stored), len(stored)
        return {"msgid": m.GROUP_CHAT_MSG_ACK, "errno": m.OK, "groupid": gid, "delivered": delivered, "stored": stored}

    async def do_friends(self, session, request) -> dict:
        friends = await storeCall(self.store.getFriends(session.uid))
        states = await self.registry.states([f for f, _ in friends])
        return {
            "msgid": m.FRIEND_LIST_MSG_ACK,
            "errno": m.OK,
            "friends": [{"id": f, "name": n, "state": states[f]} for f, n in friends],
        }

    async def do_groups(self, session, request) -> dict:
        groups = await storeCall(self.store.getUserGroups(session.uid))
        states = await self.registry.states({u.id for g in groups for u in g.members})
        return {
            "msgid": m.GROUP_LIST_MSG_ACK,
            "errno": m.OK,
            "groups": [groupDict(g, states) for g in groups],
        }
