"""
The chat service: what each request does.

It holds this server's sessions and talks only to the seams: an
L{IChatStore}, an L{IPresence} and an L{IRelay}.  Sessions (protocol
instances, see L{chatproto.protocol}) call L{ChatService.handle}; the service
calls back C{session.send(message)} to deliver.

A handler returns a reply (a L{dict}), L{None}, or a Deferred of either, and
raises L{RequestError} for an error reply.
"""

from __future__ import annotations

import inspect
import secrets
import time

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto import messages as m
from chatproto.interfaces import (
    ClaimResult,
    IRelayReceiver,
    Location,
    NameTaken,
    NoSuchGroup,
    NoSuchUser,
    PresenceUnavailable,
    StoreUnavailable,
)
from chatproto.messages import RequestError, encode
from chatproto.throttle import LoginThrottle

#: Messages kept offline when their recipient cannot take them now.
STORED_MSGIDS = frozenset((m.ONE_CHAT_MSG, m.GROUP_CHAT_MSG))

ONLINE = "online"
OFFLINE = "offline"


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


@implementer(IRelayReceiver)
class ChatService(service.Service):
    """
    @param onRelogin: C{"kick"} (a new login closes the old session) or
        C{"reject"} (a new login is refused while the old one lives).
    """

    log = Logger()

    def __init__(self, store, presence, relay, hasher, clock, onRelogin: str = "kick") -> None:
        if onRelogin not in ("kick", "reject"):
            raise ValueError(f"onRelogin must be kick or reject, not {onRelogin!r}")
        self.store = store
        self.presence = presence
        self.relay = relay
        self.hasher = hasher
        self.clock = clock
        self.onRelogin = onRelogin
        self.serverName = presence.serverName
        #: uid -> the logged-in session of that user on this server
        self.sessions: dict[int, object] = {}
        #: session id -> every connected session, logged in or not
        self.connections: dict[str, object] = {}
        # Per account, and per client address.  Behind a balancer that does
        # not send the PROXY header every client shares the balancer's
        # address, so that limit is far looser.
        self.throttleAccount = LoginThrottle(clock, allowed=5)
        self.throttleAddress = LoginThrottle(clock, allowed=50)
        #: True once storage, presence and relay are up.
        self.isReady = False
        self._readyWaiters: list[defer.Deferred] = []
        self._time = _Clock(clock)
        #: uid -> name of users known to exist (names never change)
        self._names: dict[int, str] = {}
        self._pending: set[defer.Deferred] = set()

    # --- lifecycle ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        d = defer.Deferred.fromCoroutine(self._start())
        d.addErrback(self._startFailed)

    def _startFailed(self, failure) -> None:
        self.log.failure("chat server {name} could not start", failure, name=self.serverName)
        waiters, self._readyWaiters = self._readyWaiters, []
        for waiter in waiters:
            waiter.errback(RequestError(m.E_UNAVAILABLE, "server is starting up or could not start"))
        if self.onStartFailure is not None:
            self.onStartFailure(failure)

    #: Called with the failure when start-up fails (twistd: stop the reactor).
    onStartFailure = None

    def whenReady(self) -> defer.Deferred:
        """A new Deferred that fires once the service is ready."""
        if self.isReady:
            return defer.succeed(None)
        d = defer.Deferred()
        self._readyWaiters.append(d)
        return d

    async def _start(self) -> None:
        await self.store.start()
        await self.presence.start(lambda: len(self.sessions))
        await self.relay.start(self)
        self.isReady = True
        self.log.info("chat server {name} ready", name=self.serverName)
        waiters, self._readyWaiters = self._readyWaiters, []
        for waiter in waiters:
            waiter.callback(None)

    def stopService(self) -> defer.Deferred:
        if not self.running:
            return defer.succeed(None)
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # Log every local user out (telling their friends), then drop the
        # connections; only this server's users are marked offline.
        for session in list(self.connections.values()):
            if session.uid is not None:
                try:
                    await self.logout(session)
                except Exception:
                    self.log.failure("logging out {uid} at shutdown", uid=session.uid)
            session.kick("server shutting down")
        if self._pending:
            await defer.DeferredList(list(self._pending))
        for name, stop in (("relay", self.relay.stop), ("presence", self.presence.stop), ("store", self.store.close)):
            try:
                await stop()
            except Exception:
                self.log.failure("stopping {name}", name=name)
        self.log.info("chat server {name} stopped", name=self.serverName)

    # --- sessions ----------------------------------------------------------

    def newSessionId(self) -> str:
        return secrets.token_hex(8)

    def connected(self, session) -> None:
        self.connections[session.sid] = session

    def disconnected(self, session) -> None:
        self.connections.pop(session.sid, None)
        self._storeHeld(session)
        if session.uid is not None:
            self._track(defer.Deferred.fromCoroutine(self.logout(session)))

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        """Keep C{d} until it fires so shutdown can wait for it; log errors."""
        self._pending.add(d)

        def done(result):
            self._pending.discard(d)
            if isinstance(result, Failure):
                self.log.failure("background task failed", result)
            return None

        return d.addBoth(done)

    def now(self) -> str:
        return self._time.now()

    # --- dispatch ----------------------------------------------------------

    def handle(self, session, request: m.Request):
        """
        Carry out C{request} for C{session}.

        @return: a reply L{dict}, L{None}, or a Deferred of either.
        @raise RequestError: for an error reply.
        """
        if not self.isReady:
            return self.whenReady().addCallback(lambda _: self.handle(session, request))
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
            uid = await self._storeCall(self.store.createUser(name, passwordHash))
        except NameTaken:
            raise RequestError(m.E_INVALID, f"the name {name!r} is taken") from None
        self._names[uid] = name
        self.log.info("registered [{uid}]{name}", uid=uid, name=name)
        return {"msgid": m.REG_MSG_ACK, "errno": m.OK, "id": uid, "name": name}

    async def do_login(self, session, request):
        uid = request.args["id"]
        if session.uid is not None:
            raise RequestError(m.E_ALREADY_LOGGED_IN)
        wait = max(self.throttleAccount.retryAfter(uid), self.throttleAddress.retryAfter(session.peerHost))
        if wait > 0:
            raise RequestError(m.E_THROTTLED, f"too many failed logins; retry in {int(wait) + 1} s")
        user = await self._storeCall(self.store.getUser(uid))
        valid = await self.hasher.verify(request.args["password"], user.passwordHash if user else None)
        if not valid:
            self.throttleAccount.failed(uid)
            self.throttleAddress.failed(session.peerHost)
            self.log.info("failed login for {uid} from {peer}", uid=uid, peer=session.peerHost)
            raise RequestError(m.E_INVALID, "id or password is invalid")
        self.throttleAccount.succeeded(uid)
        if not session.connected:
            return None

        session.loggingIn = uid
        try:
            claim = await self._claim(uid, session)
        finally:
            session.loggingIn = None
        if not claim.won:
            raise RequestError(m.E_ONLINE, "this account is online elsewhere")
        if claim.previous is not None and claim.previous.session != session.sid:
            self._kick(claim.previous, uid, "logged in elsewhere")
        if not session.connected:
            # Gone (or kicked by a newer login) while claiming.
            await self._release(uid, session)
            return None
        existing = self.sessions.get(uid)
        if existing is not None and existing is not session:
            # Only when presence could not tell (degraded mode).
            self.logoutQuietly(existing)
            existing.kick("logged in elsewhere")

        session.uid = uid
        session.name = user.name
        self.sessions[uid] = session
        self._names[uid] = user.name
        session.hold(uid)
        try:
            ack, friendIds = await self._loginAck(uid, user.name)

            def handoff(payloads) -> bool:
                if session.uid != uid or not session.connected:
                    return False
                ack["offlinemsg"] = payloads
                session.reply(request, ack)
                session.unhold()
                return True

            count = await self._storeCall(self.store.takeOffline(uid, handoff))
        except BaseException:
            await self.logout(session, notify=False)
            self._storeHeld(session)
            raise
        self.log.info(
            "[{uid}]{name} logged in from {peer}, {count} offline messages",
            uid=uid,
            name=user.name,
            peer=session.peerHost,
            count=count,
        )
        self._notifyFriends(uid, user.name, ONLINE, friendIds)
        return None

    async def _loginAck(self, uid: int, name: str) -> tuple[dict, list[int]]:
        friends = await self._storeCall(self.store.getFriends(uid))
        groups = await self._storeCall(self.store.getUserGroups(uid))
        ids = {f for f, _ in friends} | {u.id for g in groups for u in g.members}
        states = await self._states(ids)
        ack = {
            "msgid": m.LOGIN_MSG_ACK,
            "errno": m.OK,
            "id": uid,
            "name": name,
            # The tutorial client reads these as lists of JSON strings.
            "friends": [encode({"id": f, "name": n, "state": states[f]}).decode() for f, n in friends],
            "groups": [encode(self._groupDict(g, states, asStrings=True)).decode() for g in groups],
        }
        return ack, [f for f, _ in friends]

    @staticmethod
    def _groupDict(group, states: dict, asStrings: bool = False) -> dict:
        users = [{"id": u.id, "name": u.name, "state": states[u.id], "role": u.role} for u in group.members]
        if asStrings:
            users = [encode(u).decode() for u in users]
        return {"id": group.id, "groupname": group.name, "groupdesc": group.desc, "users": users}

    async def do_logout(self, session, request) -> dict:
        await self.logout(session)
        return {"msgid": m.LOGINOUT_MSG_ACK, "errno": m.OK}

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
        target = self.sessions.get(toid)
        if target is not None and target.send(out, m.encodeChat(out)):
            # The fast path: no I/O but the write.
            return m.Reply(
                b'{"msgid":12,"errno":0,"toid":%d,"state":"delivered"}' % toid,
                msgid=m.ONE_CHAT_MSG_ACK,
                errno=m.OK,
                toid=toid,
                state="delivered",
            )
        return defer.Deferred.fromCoroutine(self._chatElsewhere(toid, out))

    async def _chatElsewhere(self, toid: int, out: dict) -> dict:
        if toid not in self._names:
            names = await self._storeCall(self.store.getNames([toid]))
            if toid not in names:
                raise RequestError(m.E_NO_SUCH_USER, f"no user with id {toid}")
            self._names.update(names)
        stored = await self._deliver([toid], out, store=True)
        state = "stored" if stored else "delivered"
        return {"msgid": m.ONE_CHAT_MSG_ACK, "errno": m.OK, "toid": toid, "state": state}

    async def do_addfriend(self, session, request) -> dict:
        friendId = request.args["friendid"]
        if friendId == session.uid:
            raise RequestError(m.E_SELF, "you cannot befriend yourself")
        try:
            new = await self._storeCall(self.store.addFriend(session.uid, friendId))
        except NoSuchUser:
            raise RequestError(m.E_NO_SUCH_USER, f"no user with id {friendId}") from None
        names = await self._storeCall(self.store.getNames([friendId]))
        states = await self._states([friendId])
        if new:
            notice = {"msgid": m.FRIEND_ADDED_NOTICE, "id": session.uid, "name": session.name}
            self._track(defer.Deferred.fromCoroutine(self._deliver([friendId], notice, store=False)))
        friend = {"id": friendId, "name": names[friendId], "state": states[friendId]}
        return {"msgid": m.ADD_FRIEND_MSG_ACK, "errno": m.OK, "friend": friend, "new": bool(new)}

    async def do_creategroup(self, session, request) -> dict:
        name = m.checkName(request.args["groupname"], m.MAX_GROUPNAME, "group name")
        desc = request.args["groupdesc"].strip()
        if len(desc) > m.MAX_GROUPDESC:
            raise RequestError(m.E_INVALID, f"group description is longer than {m.MAX_GROUPDESC} characters")
        try:
            gid = await self._storeCall(self.store.createGroup(name, desc, session.uid))
        except NameTaken:
            raise RequestError(m.E_NAME_TAKEN, f"a group named {name!r} exists") from None
        return {"msgid": m.CREATE_GROUP_MSG_ACK, "errno": m.OK, "groupid": gid, "groupname": name, "groupdesc": desc}

    async def do_addgroup(self, session, request) -> dict:
        gid = request.args["groupid"]
        try:
            new = await self._storeCall(self.store.joinGroup(gid, session.uid))
            group = await self._storeCall(self.store.getGroup(gid))
        except NoSuchGroup:
            raise RequestError(m.E_NO_SUCH_GROUP, f"no group with id {gid}") from None
        return {"msgid": m.ADD_GROUP_MSG_ACK, "errno": m.OK, "groupid": gid, "groupname": group.name, "new": bool(new)}

    async def do_groupchat(self, session, request) -> dict:
        gid = request.args["groupid"]
        text = request.args["msg"]
        if not text:
            raise RequestError(m.E_BAD_FIELD, "msg must not be empty")
        try:
            members = await self._storeCall(self.store.getGroupMembers(gid))
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
        stored = await self._deliver(others, out, store=True)
        return {
            "msgid": m.GROUP_CHAT_MSG_ACK,
            "errno": m.OK,
            "groupid": gid,
            "delivered": len(others) - len(stored),
            "stored": len(stored),
        }

    async def do_friends(self, session, request) -> dict:
        friends = await self._storeCall(self.store.getFriends(session.uid))
        states = await self._states([f for f, _ in friends])
        return {
            "msgid": m.FRIEND_LIST_MSG_ACK,
            "errno": m.OK,
            "friends": [{"id": f, "name": n, "state": states[f]} for f, n in friends],
        }

    async def do_groups(self, session, request) -> dict:
        groups = await self._storeCall(self.store.getUserGroups(session.uid))
        states = await self._states({u.id for g in groups for u in g.members})
        return {
            "msgid": m.GROUP_LIST_MSG_ACK,
            "errno": m.OK,
            "groups": [self._groupDict(g, states) for g in groups],
        }

    # --- delivery ----------------------------------------------------------

    async def _deliver(self, uids, message: dict, store: bool) -> list[int]:
        """
        Deliver C{message} to C{uids}: local sessions directly, the rest
        through the relay; what nobody takes is stored offline when
        C{store}.

        @return: the uids whose copy was stored offline here.
        """
        line = encode(message)
        remote = []
        sessions = self.sessions
        for uid in uids:
            target = sessions.get(uid)
            if target is None or not target.send(message, line):
                remote.append(uid)
        if not remote:
            return []
        try:
            missed = await self.relay.deliver(remote, message, store, line)
        except Exception as e:
            # The relay is down: whoever is elsewhere gets it offline.
            self.log.warn("relay unavailable ({error}); storing for {n} users", error=e, n=len(remote))
            missed = remote
        if missed and store:
            await self._storeCall(self.store.storeOffline([(uid, line.decode("utf-8")) for uid in missed]))
        return list(missed) if store else []

    def deliverLocal(self, uids, message: dict, store: bool) -> list[int]:
        """L{IRelayReceiver}: a message relayed from another server."""
        line = encode(message)
        missed = []
        for uid in uids:
            target = self.sessions.get(uid)
            if target is None or not target.send(message, line):
                missed.append(uid)
        if missed and store:
            # The user left between routing and arrival: keep it for them.
            payload = line.decode("utf-8")
            self._track(self.store.storeOffline([(uid, payload) for uid in missed]))
        return missed

    def localSessions(self) -> list[tuple[int, str]]:
        """L{IRelayReceiver}: who is logged in here."""
        return [(uid, session.sid) for uid, session in self.sessions.items()]

    def congested(self, session) -> None:
        """C{session} does not read what it is sent: log it out (so what is
        sent to its user from now on is stored offline) and close it."""
        if session.uid is not None:
            self._track(defer.Deferred.fromCoroutine(self.logout(session)))
        session.kick("too slow reading; undelivered messages wait for your next login")

    def kickLocal(self, uid: int, session: str, reason: str) -> None:
        """L{IRelayReceiver}: another server took over C{uid}."""
        target = self.connections.get(session)
        if target is None:
            return
        if target.uid == uid:
            self.logoutQuietly(target)
            target.kick(reason)
        elif target.loggingIn == uid:
            target.kick(reason)

    def _kick(self, location: Location, uid: int, reason: str) -> None:
        if location.server == self.serverName:
            self.kickLocal(uid, location.session, reason)
        else:
            self._track(self.relay.kick(location, uid, reason))

    def _storeHeld(self, session) -> None:
        """Chat messages delivered to a session while it was logging in, that
        it never got (it went away or its login failed), are stored offline."""
        uid, held = session.dropHeld()
        rows = [(uid, (line or encode(msg)).decode("utf-8")) for msg, line in held if msg.get("msgid") in STORED_MSGIDS]
        if rows:
            self._track(self.store.storeOffline(rows))

    def _notifyFriends(self, uid: int, name: str, state: str, friendIds=None) -> None:
        async def notify():
            ids = friendIds
            if ids is None:
                ids = [f for f, _ in await self.store.getFriends(uid)]
            if ids:
                notice = {"msgid": m.FRIEND_STATE_NOTICE, "id": uid, "name": name, "state": state}
                await self._deliver(ids, notice, store=False)

        self._track(defer.Deferred.fromCoroutine(notify()))

    # --- presence ----------------------------------------------------------

    async def _claim(self, uid: int, session) -> ClaimResult:
        replace = self.onRelogin == "kick"
        try:
            return await self.presence.claim(uid, session.sid, replace)
        except PresenceUnavailable as e:
            # Degraded: only this server's sessions can be checked.
            self.log.warn("presence unavailable ({error}); login of {uid} checked locally", error=e, uid=uid)
            existing = self.sessions.get(uid)
            if existing is not None and not replace:
                return ClaimResult(False, Location(self.serverName, existing.sid))
            return ClaimResult(True, None)

    async def _release(self, uid: int, session) -> bool:
        try:
            return await self.presence.release(uid, session.sid)
        except PresenceUnavailable as e:
            self.log.warn("presence unavailable ({error}); release of {uid} is local", error=e, uid=uid)
            return True

    async def logout(self, session, notify: bool = True) -> None:
        uid = session.uid
        if uid is None:
            return
        session.uid = None
        if self.sessions.get(uid) is session:
            del self.sessions[uid]
        released = await self._release(uid, session)
        self.log.info("[{uid}] logged out", uid=uid)
        # A session replaced by a newer login leaves its user online.
        if released and notify and uid not in self.sessions:
            self._notifyFriends(uid, session.name, OFFLINE)

    def logoutQuietly(self, session) -> None:
        """Forget C{session}'s login here without touching presence (a newer
        session owns it already)."""
        uid = session.uid
        if uid is not None:
            session.uid = None
            if self.sessions.get(uid) is session:
                del self.sessions[uid]

    async def _states(self, uids) -> dict[int, str]:
        states = {}
        elsewhere = []
        for uid in uids:
            if uid in self.sessions:
                states[uid] = ONLINE
            else:
                states[uid] = OFFLINE
                elsewhere.append(uid)
        if elsewhere:
            try:
                located = await self.presence.locate(elsewhere)
            except PresenceUnavailable:
                located = {}
            for uid in located:
                states[uid] = ONLINE
        return states

    async def _storeCall(self, d):
        """Await a store call, turning database outages into an error
        reply."""
        try:
            return await d
        except (RequestError, NameTaken, NoSuchUser, NoSuchGroup):
            raise
        except StoreUnavailable as e:
            raise RequestError(m.E_UNAVAILABLE, f"storage unavailable: {e}") from None
