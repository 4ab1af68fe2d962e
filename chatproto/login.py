"""
The login flow and its undoing: throttle, verify the password, claim the
account in presence (kicking or refusing the previous session), hand the
offline messages over with the login reply, tell the friends; and logout.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.logger import Logger

from chatproto import messages as m
from chatproto.acks import Unacked, midOf
from chatproto.credentials import Credentials
from chatproto.interfaces import ClaimResult, Location, PresenceUnavailable
from chatproto.logrepeat import SessionLog
from chatproto.messages import RequestError, encode
from chatproto.registry import OFFLINE, ONLINE
from chatproto.sqloffline import pageOffline, pageWithin
from chatproto.tasks import storeCall


def groupDict(group, states: dict, asStrings: bool = False) -> dict:
    """A group as sent to clients (C{asStrings}: members as JSON strings,
    as the tutorial client reads them in the login reply)."""
    users = [{"id": u.id, "name": u.name, "state": states[u.id], "role": u.role} for u in group.members]
    if asStrings:
        users = [encode(u).decode() for u in users]
    return {"id": group.id, "groupname": group.name, "groupdesc": group.desc, "users": users}


class LoginFlow:
    """
    @param onRelogin: C{"kick"} (a new login closes the old session) or
        C{"reject"} (a new login is refused while the old one lives).
    @param tokens: the L{chatproto.tokens.ITokenStore} (None: no tokens).
    @ivar credentials: the L{Credentials} (throttles, password, tokens).
    """

    log = Logger()
    #: the service's L{chatproto.friendrequests.FriendRequests}
    friendRequests = None

    def __init__(
        self, registry, delivery, store, presence, relay, hasher, clock, tasks, onRelogin: str = "kick", tokens=None
    ):
        if onRelogin not in ("kick", "reject"):
            raise ValueError(f"onRelogin must be kick or reject, not {onRelogin!r}")
        self.registry = registry
        self.delivery = delivery
        self.store = store
        self.presence = presence
        self.relay = relay
        self.hasher = hasher
        self.tasks = tasks
        self.onRelogin = onRelogin
        self.credentials = Credentials(store, hasher, clock, tokens, registry.names)
        self.slots = defer.DeferredSemaphore(self.maxLoginsInFlight)
        #: session id -> friend ids read at login, for the logout's notice
        self.friendIds: dict[str, list[int]] = {}
        self.sessionLog = SessionLog(self.log, clock)

    #: Logins carried out at once; more wait their turn.  A reconnect storm
    #: (thousands of token logins in a second) then keeps the Redis and
    #: database queues short: replies come back within the Redis reply
    #: timeout, and each login finishes sooner.
    maxLoginsInFlight = 128

    async def login(self, session, request) -> None:
        """Carry out a login request (password or token), at most
        L{maxLoginsInFlight} at once; the reply (with the offline messages)
        is sent from inside the hand-over, so nothing is returned."""
        await self.slots.acquire()
        try:
            return await self._login(session, request)
        finally:
            self.slots.release()

    async def _login(self, session, request) -> None:
        uid = request.args["id"]
        if type(request.args.get("ack", False)) is not bool:
            raise RequestError(m.E_BAD_FIELD, "field 'ack' must be true or false")
        if session.uid is not None:
            raise RequestError(m.E_ALREADY_LOGGED_IN)
        if "token" in request.args:
            name, token = await self.credentials.verifyToken(session, uid, request.args["token"])
            how = "token"
        else:
            name = (await self.credentials.verify(session, uid, request.args["password"])).name
            token = None
            how = "password"
        if not session.connected:
            return None
        if not await self.take(session, uid):
            return None
        self.registry.bind(session, uid, name)
        # From here a nudge (offline messages to hand over now) waits until
        # the login's own hand-over has ended: nothing is pushed before
        # the login reply.
        redelivery = self.delivery.redelivery
        redelivery.begin(session)
        try:
            session.acking = bool(request.args.get("ack"))
            session.hold(uid)
            try:
                if token is None:
                    token = await self.credentials.issueToken(uid, name)
                if token is not None:
                    self.credentials.sessionTokens[session.sid] = token
                count, friendIds = await self.handOver(session, request, uid, name, token)
                if session.uid == uid:
                    self.friendIds[session.sid] = friendIds
            except BaseException:
                await self.logout(session, notify=False)
                self.delivery.storeHeld(session)
                raise
        finally:
            redelivery.end(session, uid)
        line = "[{uid}]{name} logged in ({how}) from {peer}, {count} offline messages"
        self.sessionLog.info("login", line, uid=uid, name=name, how=how, peer=session.peerHost, count=count)
        self.notifyFriends(uid, name, ONLINE, friendIds)
        return None

    async def take(self, session, uid: int) -> bool:
        """Claim C{uid} for C{session}, closing the session it replaces;
        false when C{session} went away meanwhile."""
        session.loggingIn = uid
        try:
            claim = await self.claim(uid, session)
        finally:
            session.loggingIn = None
        if not claim.won:
            raise RequestError(m.E_ONLINE, "this account is online elsewhere")
        if claim.previous is not None and claim.previous.session != session.sid and claim.listening:
            self.kick(claim.previous, uid, "logged in elsewhere")
        if not session.connected:
            # Gone (or kicked by a newer login) while claiming.
            await self.release(uid, session)
            return False
        existing = self.registry.sessions.get(uid)
        if existing is not None and existing is not session:
            # Only when presence could not tell (degraded mode).
            self.registry.unbind(existing)
            existing.kick("logged in elsewhere")
        return True

    async def handOver(self, session, request, uid: int, name: str, token: str | None = None) -> tuple[int, list[int]]:
        """Send the login reply with the offline messages (deleted once
        written) and then what was held meanwhile."""
        ack, friendIds, anyOffline = await self.loginAck(uid, name)
        if token is not None:
            ack["token"] = token

        acking = session.acking

        def handoff(payloads) -> bool:
            if session.uid != uid or not session.connected:
                return False
            # A bounded login reply; the rest follow it as pushes.
            ack["offlinemsg"], rest = pageOffline(payloads)
            if session.nulTerminated:
                base = len(encode(dict(ack, offlinemsg=[], **({} if request.seq is None else {"seq": request.seq}))))
                ack["offlinemsg"], more = pageWithin(ack["offlinemsg"], base + 1)
                rest = more + rest
            if acking:
                # Deleted from the store once acked (Delivery.acked).
                for payload in payloads:
                    mid = midOf(payload)
                    if mid is not None and mid not in session.unacked:
                        session.unacked[mid] = Unacked(uid, payload, [], offline=True)
            session.reply(request, ack)
            for payload in rest:
                session.send(json.loads(payload), payload.encode("utf-8"), force=True)
            session.unhold()
            return True

        if not anyOffline:
            # None stored when the login read its friends (one that comes
            # later waits for the next hand-over: a nudge or login).
            handoff([])
            return 0, friendIds
        count = await storeCall(self.store.takeOffline(uid, handoff, keepAcked=acking))
        return count, friendIds

    async def loginAck(self, uid: int, name: str) -> tuple[dict, list[int], bool]:
        """The successful LOGIN_MSG_ACK (without offline messages and
        token), the friends' ids, and whether any offline message waits:
        the one place that builds it."""
        friends, groups, anyOffline = await storeCall(self.store.getLoginData(uid))
        ids = {f for f, _ in friends} | {u.id for g in groups for u in g.members}
        states = await self.registry.states(ids)
        states = await self.friendRequests.visibleStates(uid, states, [f for f, _ in friends])
        ack = {
            "msgid": m.LOGIN_MSG_ACK,
            "errno": m.OK,
            "id": uid,
            "name": name,
            # The tutorial client reads these as lists of JSON strings.
            "friends": [encode({"id": f, "name": n, "state": states[f]}).decode() for f, n in friends],
            "groups": [encode(groupDict(g, states, asStrings=True)).decode() for g in groups],
            # Friend requests waiting for this user's answer (always empty in auto mode).
            "requests": await self.friendRequests.pending(uid),
        }
        return ack, [f for f, _ in friends], anyOffline

    def forgetFriends(self, session) -> None:
        """C{session}'s friends may have changed: its logout reads them."""
        self.friendIds.pop(session.sid, None)

    def notifyFriends(self, uid: int, name: str, state: str, friendIds=None) -> None:
        async def notify():
            ids = friendIds
            if ids is None:
                ids = [f for f, _ in await self.store.getFriends(uid)]
            if ids:
                notice = {"msgid": m.FRIEND_STATE_NOTICE, "id": uid, "name": name, "state": state}
                await self.delivery.deliver(ids, notice, store=False)

        self.tasks.track(defer.Deferred.fromCoroutine(notify()))

    # --- presence ----------------------------------------------------------

    async def claim(self, uid: int, session) -> ClaimResult:
        replace = self.onRelogin == "kick"
        try:
            return await self.presence.claim(uid, session.sid, replace)
        except PresenceUnavailable as e:
            # Degraded: only this server's sessions can be checked.
            self.log.warn("presence unavailable ({error}); login of {uid} checked locally", error=e, uid=uid)
            existing = self.registry.sessions.get(uid)
            if existing is not None and not replace:
                return ClaimResult(False, Location(self.registry.serverName, existing.sid))
            return ClaimResult(True, None)

    async def release(self, uid: int, session) -> bool:
        try:
            return await self.presence.release(uid, session.sid)
        except PresenceUnavailable as e:
            self.log.warn("presence unavailable ({error}); release of {uid} is local", error=e, uid=uid)
            return True

    def kick(self, location: Location, uid: int, reason: str) -> None:
        if location.server == self.registry.serverName:
            self.registry.kickLocal(uid, location.session, reason)
        else:
            self.tasks.track(self.relay.kick(location, uid, reason))

    async def logout(self, session, notify: bool = True, revoke: bool = False) -> None:
        """Log C{session} out; C{revoke}: an explicit logout, which also
        revokes the session's token if the session is still open (a
        dropped, kicked or shut-down connection keeps it)."""
        token = self.credentials.sessionTokens.pop(session.sid, None)
        friendIds = self.friendIds.pop(session.sid, None)
        uid = self.registry.unbind(session)
        # What it did not ack waits for its next login.
        self.delivery.storeUnacked(session)
        if uid is None:
            return
        # Not when the session was closed first (kicked, server stopping).
        if revoke and token is not None and session.connected:
            self.tasks.track(self.credentials.revokeToken(uid, token))
        released = await self.release(uid, session)
        self.sessionLog.info("logout", "[{uid}] logged out", uid=uid)
        # A session replaced by a newer login leaves its user online.
        if released and notify and uid not in self.registry.sessions:
            self.notifyFriends(uid, session.name, OFFLINE, friendIds)

    async def logoutAll(self, reason: str) -> None:
        """Log every local user out (telling their friends), then close
        every connection; only this server's users are marked offline."""
        for session in list(self.registry.connections.values()):
            if session.uid is not None:
                try:
                    await self.logout(session)
                except Exception:
                    self.log.failure("logging out {uid} at shutdown", uid=session.uid)
            session.kick(reason)
