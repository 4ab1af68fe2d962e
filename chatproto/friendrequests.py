"""
Friendship: C{ADD_FRIEND_MSG} (7) and C{FRIEND_REPLY_MSG} (30), under the
policy C{--friend-requests}:

 - C{auto}: adding someone makes both friends at once (the tutorial's
   behaviour): anyone can add anyone and then watch their online state.
 - C{approve}: adding someone sends them a request (C{FRIEND_REQUEST_NOTICE},
   29, live wherever they are, else in C{"requests"} of their next login
   reply); they accept or refuse with C{FRIEND_REPLY_MSG}.  Only accepted
   friends see each other's online state; a refused requester is told
   nothing.  Requests expire after L{REQUEST_TTL}; one user may have at most
   L{MAX_PENDING} requests out.

The SQL is in L{chatproto.sqlfriends}.
"""

from __future__ import annotations

import time
from weakref import WeakKeyDictionary

from twisted.internet import defer
from twisted.logger import Logger

from chatproto import messages as m
from chatproto.interfaces import NoSuchUser, TooManyRequests
from chatproto.messages import RequestError
from chatproto.sqlfriends import ACCEPTED, FRIENDS, PENDING, REQUESTED
from chatproto.tasks import storeCall

AUTO = "auto"
APPROVE = "approve"
MODES = (AUTO, APPROVE)

#: Seconds a request waits for its answer (30 days).
REQUEST_TTL = 30 * 86400
#: Unexpired requests one user may have out (answered or not).
MAX_PENDING = 100
#: Requests listed in a login reply or friend list (oldest first).
MAX_LISTED = 100

#: The state shown for a user who is not an accepted friend (approve mode).
HIDDEN = "hidden"


def timeText(seconds: float) -> str:
    """A request's time as the server shows times."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def requestDict(request) -> dict:
    """A L{chatproto.interfaces.FriendRequest} as sent to clients."""
    return {"id": request.id, "name": request.name, "time": timeText(request.created)}


class FriendRequests:
    """
    @param mode: L{AUTO} or L{APPROVE}.
    @param clock: gives request times (C{seconds()}).
    """

    log = Logger()

    def __init__(self, mode, registry, delivery, store, clock, tasks, ttl=REQUEST_TTL, maxPending=MAX_PENDING):
        if mode not in MODES:
            raise ValueError(f"friend-requests must be auto or approve, not {mode!r}")
        self.mode = mode
        self.registry = registry
        self.delivery = delivery
        self.store = store
        self.clock = clock
        self.tasks = tasks
        self.ttl = ttl
        self.maxPending = maxPending
        #: session -> (uid, friend ids) read for L{chatAck}; a session's
        #: entry goes with it.
        self._friendSets: WeakKeyDictionary = WeakKeyDictionary()

    @property
    def approve(self) -> bool:
        return self.mode == APPROVE

    def since(self) -> float:
        """Requests created before this have expired."""
        return self.clock.seconds() - self.ttl

    # --- what the service and the login flow call --------------------------

    async def pending(self, uid: int) -> list[dict]:
        """The requests waiting for C{uid}'s answer (always empty in auto
        mode)."""
        if not self.approve:
            return []
        requests = await storeCall(self.store.getFriendRequests(uid, self.since(), MAX_LISTED))
        return [requestDict(r) for r in requests]

    async def visibleStates(self, uid: int, states: dict, friendIds=None) -> dict:
        """C{states} as C{uid} may see them: in approve mode, users other
        than C{uid} and its friends are L{HIDDEN}."""
        if not self.approve:
            return states
        if friendIds is None:
            friendIds = [f for f, _ in await storeCall(self.store.getFriends(uid))]
        allowed = set(friendIds) | {uid}
        return {u: (s if u in allowed else HIDDEN) for u, s in states.items()}

    def chatAck(self, session, toid: int, ack: dict):
        """
        The C{ONE_CHAT_MSG_ACK} C{session} may see: in approve mode,
        C{"delivered"} or C{"stored"} (which tell whether C{toid} is online)
        only for a friend; anyone else is told C{"sent"}.  Friend ids are
        read once per session and again whenever a recipient is not among
        them (a friendship accepted on another server), so chatting with
        friends costs no query.
        """
        if not self.approve:
            return ack
        known = self._friendSets.get(session)
        if known is not None and known[0] == session.uid and toid in known[1]:
            return ack
        return defer.Deferred.fromCoroutine(self._checkedAck(session, toid, ack))

    async def _checkedAck(self, session, toid: int, ack: dict) -> dict:
        uid = session.uid
        try:
            friends = {f for f, _ in await self.store.getFriends(uid)} if uid is not None else set()
        except Exception as e:
            # The message was accepted: say so, without the state.
            self.log.warn("could not read the friends of {uid} ({error})", uid=uid, error=e)
            friends = set()
        else:
            self._friendSets[session] = (uid, friends)
        if toid in friends:
            return ack
        return {"msgid": m.ONE_CHAT_MSG_ACK, "errno": m.OK, "toid": toid, "state": "sent"}

    async def addFriend(self, session, friendId: int) -> dict:
        """C{ADD_FRIEND_MSG}: the reply C{ADD_FRIEND_MSG_ACK}."""
        uid = session.uid
        if friendId == uid:
            raise RequestError(m.E_SELF, "you cannot befriend yourself")
        if not self.approve:
            return await self._addAtOnce(session, friendId)
        now = self.clock.seconds()
        try:
            outcome = await storeCall(self.store.requestFriend(uid, friendId, now, now - self.ttl, self.maxPending))
        except NoSuchUser:
            raise RequestError(m.E_NO_SUCH_USER, f"no user with id {friendId}") from None
        except TooManyRequests:
            raise RequestError(
                m.E_TOO_MANY_REQUESTS,
                f"you have {self.maxPending} friend requests waiting for an answer; wait until they are answered"
                f" or expire ({self.ttl // 86400} days)",
            ) from None
        names = await storeCall(self.store.getNames([friendId]))
        friend = {"id": friendId, "name": names.get(friendId, "")}
        reply = {"msgid": m.ADD_FRIEND_MSG_ACK, "errno": m.OK, "friend": friend, "new": outcome == ACCEPTED}
        if outcome in (REQUESTED, PENDING):
            if outcome == REQUESTED:
                notice = {"msgid": m.FRIEND_REQUEST_NOTICE, "id": uid, "name": session.name, "time": timeText(now)}
                # Not stored: the target finds it in its next login reply.
                self.delivery.deliverLater([friendId], notice)
                self.log.info("[{uid}] asked [{friend}] to be friends", uid=uid, friend=friendId)
            reply["state"] = "requested"
            return reply
        # Friends (now or already): the state may be shown.
        states = await self.registry.states([friendId])
        friend["state"] = states[friendId]
        if outcome == ACCEPTED:
            self._tellAdded(friendId, uid, session.name)
            reply["state"] = "accepted"
        else:
            assert outcome == FRIENDS, outcome
            reply["state"] = "friends"
        return reply

    async def reply(self, session, requesterId: int, accept: bool) -> dict:
        """C{FRIEND_REPLY_MSG}: the reply C{FRIEND_REPLY_MSG_ACK}."""
        uid = session.uid
        if requesterId == uid:
            raise RequestError(m.E_SELF, "you cannot befriend yourself")
        answered = await storeCall(self.store.answerFriendRequest(uid, requesterId, accept, self.since()))
        if not answered:
            raise RequestError(m.E_NO_SUCH_REQUEST, f"no pending friend request from {requesterId}")
        reply = {"msgid": m.FRIEND_REPLY_MSG_ACK, "errno": m.OK, "id": requesterId, "accept": accept}
        if accept:
            names = await storeCall(self.store.getNames([requesterId]))
            states = await self.registry.states([requesterId])
            reply["friend"] = {"id": requesterId, "name": names.get(requesterId, ""), "state": states[requesterId]}
            self._tellAdded(requesterId, uid, session.name)
        self.log.info(
            "[{uid}] {answer} [{requester}]'s friend request",
            uid=uid,
            answer="accepted" if accept else "refused",
            requester=requesterId,
        )
        return reply

    # --- helpers -----------------------------------------------------------

    def _tellAdded(self, toid: int, uid: int, name: str) -> None:
        """C{FRIEND_ADDED_NOTICE} to C{toid}, live or (approve mode: it
        answers that user's request) at its next login."""
        notice = {"msgid": m.FRIEND_ADDED_NOTICE, "id": uid, "name": name}
        self.tasks.track(defer.Deferred.fromCoroutine(self.delivery.deliver([toid], notice, store=True)))

    async def _addAtOnce(self, session, friendId: int) -> dict:
        """Auto mode: friends at once, as the tutorial does."""
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
