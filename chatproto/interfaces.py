"""
The seams of the chat server: storage, presence and relay.

Every method returns a Deferred, even in the in-memory/embedded
implementations, so that a networked implementation (MySQL, Redis) can
replace them without touching callers.  The embedded and the cluster
implementations pass the same contract tests (``tests/contract_*.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import Attribute, Interface


# --- value types -----------------------------------------------------------


@dataclass(frozen=True)
class User:
    id: int
    name: str
    passwordHash: str


@dataclass(frozen=True)
class GroupMember:
    id: int
    name: str
    role: str  # "creator" or "normal"


@dataclass(frozen=True)
class Group:
    id: int
    name: str
    desc: str
    members: tuple[GroupMember, ...] = ()


@dataclass(frozen=True)
class Location:
    """Where a logged-in session lives: the server's name and the session id."""
    server: str
    session: str


@dataclass(frozen=True)
class ClaimResult:
    """
    The outcome of L{IPresence.claim}.

    @ivar won: the caller's session now owns the account.
    @ivar previous: the live session that owned it before (to be kicked when
        C{won}), or the live owner that made the claim fail.
    @ivar listening: C{False}: nobody listens on C{previous}'s server's
        channel (killed, or reconnecting), so no kick is sent.
    """

    won: bool
    previous: Location | None = None
    listening: bool = True


@dataclass(frozen=True)
class ServerInfo:
    """A chat server as registered in the cluster registry."""
    name: str
    host: str
    port: int
    weight: int = 1
    logins: int = 0
    extra: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class FriendRequest:
    """A pending friend request as its target sees it: who asked, and when
    (seconds since the epoch, from the service's clock)."""
    id: int
    name: str
    created: float


# --- errors ----------------------------------------------------------------


class StoreError(Exception):
    """Base class of the storage errors a user may be told about."""


class NameTaken(StoreError):
    """A user or group with this name exists already."""


class NoSuchUser(StoreError):
    """No user with this id."""


class NoSuchGroup(StoreError):
    """No group with this id."""


class TooManyRequests(StoreError):
    """The user has as many pending friend requests as allowed."""


class StoreUnavailable(StoreError):
    """The database could not be reached (after retrying)."""


class PresenceUnavailable(Exception):
    """The presence/relay backend (Redis) could not be reached."""


# --- interfaces ------------------------------------------------------------


class IChatStore(Interface):
    """Accounts, friends, groups and offline messages."""

    def start():
        """
        Connect and create or migrate the schema (idempotent).

        @rtype: L{Deferred} firing with L{None}
        """

    def close():
        """
        Release connections.

        @rtype: L{Deferred} firing with L{None}
        """

    def createUser(name, passwordHash):
        """
        @rtype: L{Deferred} firing with the new user's L{int} id, or failing
            with L{NameTaken}.
        """

    def getUser(uid):
        """@rtype: L{Deferred} firing with a L{User} or L{None}."""

    def getNames(uids):
        """
        @rtype: L{Deferred} firing with a L{dict} C{{uid: name}} of the ids
            that exist.
        """

    def addFriend(uid, friendId):
        """
        Make C{uid} and C{friendId} friends of each other (mutual and
        idempotent).

        @rtype: L{Deferred} firing with L{True} if the friendship is new,
            L{False} if it existed; failing with L{NoSuchUser}.
        """

    def getFriends(uid):
        """@rtype: L{Deferred} firing with a L{list} of C{(id, name)} sorted by id."""

    def requestFriend(uid, friendId, now, since, cap):
        """
        C{uid} asks C{friendId} to be friends (C{--friend-requests
        approve}).  Requests created before C{since} have expired and count
        for nothing; C{now} is the new request's creation time.

        @rtype: L{Deferred} firing with C{"requested"} (a new request),
            C{"pending"} (one was pending, or refused and unexpired: nothing
            changed), C{"accepted"} (C{friendId} had asked C{uid}: they are
            friends now) or C{"friends"} (they were already); failing with
            L{NoSuchUser}, or L{TooManyRequests} when C{uid} has C{cap}
            unexpired requests out.
        """

    def answerFriendRequest(uid, requesterId, accept, since):
        """
        C{uid} accepts (both become friends) or refuses (the request stays,
        unseen by C{uid}, until it expires) C{requesterId}'s request.

        @rtype: L{Deferred} firing with L{True}, or L{False} when there is
            no unexpired, unanswered request from C{requesterId}.
        """

    def getFriendRequests(uid, since, limit=100):
        """
        @rtype: L{Deferred} firing with a L{list} of at most C{limit}
            L{FriendRequest}s waiting for C{uid}'s answer, oldest first.
        """

    def createGroup(name, desc, creatorId):
        """
        Create a group whose first member is its creator (role C{creator}).

        @rtype: L{Deferred} firing with the new group's L{int} id, or failing
            with L{NameTaken}.
        """

    def joinGroup(gid, uid):
        """
        Add C{uid} to group C{gid} with role C{normal} (idempotent).

        @rtype: L{Deferred} firing with L{True} if newly joined; failing with
            L{NoSuchGroup}.
        """

    def getGroup(gid):
        """
        @rtype: L{Deferred} firing with a L{Group} without members; failing
            with L{NoSuchGroup}.
        """

    def getGroupMembers(gid):
        """
        @rtype: L{Deferred} firing with a L{list} of L{GroupMember} sorted by
            id; failing with L{NoSuchGroup}.
        """

    def getUserGroups(uid):
        """
        @rtype: L{Deferred} firing with a L{list} of L{Group} (with members)
            that C{uid} belongs to, sorted by id.
        """

    def getLoginData(uid):
        """L{Deferred} firing with C{(getFriends(uid), getUserGroups(uid),
        any offline message for uid)}, read in one transaction."""

    def storeOffline(items):
        """
        Store messages for later delivery, in one transaction.

        @param items: iterable of C{(uid, payload)} where C{payload} is the
            JSON text of the message; one copy per (uid, mid) is kept.
        @rtype: L{Deferred} firing with L{None}
        """

    def takeOffline(uid, handoff, keepAcked=False):
        """
        Hand C{uid}'s offline messages, oldest first, to C{handoff} and delete
        exactly the messages handed over, only once C{handoff} says they were
        taken (C{keepAcked}: those with a mid wait for L{deleteOffline}).

        @param handoff: called in the reactor thread with a L{list} of
            payloads; returns (or fires a Deferred with) a true value when
            the messages were handed to the session.  When it returns false
            or raises, nothing is deleted.
        @rtype: L{Deferred} firing with the number of messages deleted.
        """

    def deleteOffline(uid, mids):
        """Delete C{uid}'s offline copies of C{mids} (acked). @rtype: L{Deferred}"""

    def peekOffline(uid):
        """
        @rtype: L{Deferred} firing with the L{list} of C{uid}'s stored
            payloads, oldest first, without deleting them.
        """


class IWriteBatch(Interface):
    """
    Gathers what is written to sessions between C{begin} and the matching
    C{end}, and sends it as one piece per session (see
    L{chatproto.output.WriteBatch}).
    """

    def begin():
        """Start (or nest) a batch."""

    def end():
        """End the innermost batch; the outermost sends what was gathered."""


class IRelayReceiver(Interface):
    """
    The local end of a relay: what owns the sessions of this server
    (L{chatproto.delivery.Delivery}).
    """

    writeBatch = Attribute(
        "An L{IWriteBatch}: the relay wraps the handling of one received "
        "payload, and the completion of one delivery batch, in it."
    )

    def deliverLocal(uids, message, store, origin=None):
        """
        Deliver C{message} (a L{dict}) to the local sessions of C{uids}.
        Users that are not (or no longer) here get it stored offline when
        C{store} is true, or, for a chat with a mid from C{origin} (the
        sending server), are reported to it (L{IRelay.confirm}).

        @return: L{list} of the uids that no local session took.
        """

    def confirmed(entries):
        """Confirmations C{[[uid, mid, state], ...]} for chats sent from here."""

    def localSessions():
        """
        @return: a L{list} of C{(uid, session id)} of the users logged in on
            this server, e.g. to re-register them after the presence backend
            lost its data.
        """

    def kickLocal(uid, session, reason):
        """
        Close the local session C{session} of C{uid} (if it still exists)
        after sending it a kick notice.
        """


class IPresence(Interface):
    """
    Who is online, and on which server.  Also the registry of live servers.
    """

    serverName = Attribute("This server's name in the cluster.")

    def start(loginCount):
        """
        Register this server.  C{loginCount} is a callable returning the
        number of sessions logged in here (used to keep the registry exact).

        @rtype: L{Deferred} firing with L{None}
        """

    def stop():
        """
        Deregister this server.

        @rtype: L{Deferred} firing with L{None}
        """

    def claim(uid, session, replace):
        """
        Atomically make C{session} on this server the owner of C{uid}.

        When another live session owns C{uid}: with C{replace} true the claim
        wins and returns that session as C{previous} (the caller kicks it);
        with C{replace} false the claim fails and returns the owner.  Two
        concurrent claims for one account never both win with C{replace}
        false.

        @rtype: L{Deferred} firing with a L{ClaimResult}.
        """

    def release(uid, session):
        """
        Remove C{uid}'s presence only if it still belongs to C{session}.

        @rtype: L{Deferred} firing with L{True} if it was removed.
        """

    def locate(uids):
        """
        @rtype: L{Deferred} firing with a L{dict} C{{uid: Location}} of the
            users that are online on a live server.
        """

    def servers():
        """
        @rtype: L{Deferred} firing with a L{list} of L{ServerInfo} of the
            live servers.
        """


class IRelay(Interface):
    """
    Delivery to users wherever they are logged in.
    """

    def start(receiver):
        """
        Start receiving messages for this server's sessions and hand them to
        C{receiver} (an L{IRelayReceiver}).

        @rtype: L{Deferred} firing with L{None}
        """

    def stop():
        """
        @rtype: L{Deferred} firing with L{None}
        """

    def deliver(uids, message, store, line=None):
        """
        Deliver C{message} to the sessions of C{uids} on other servers.
        C{line}, when given, is C{message} already encoded as JSON (bytes).  A
        server that takes a message for a user who has just left stores it
        offline itself when C{store} is true.  "Online?" and "deliver" are
        one step: there is no check-then-act window.

        @return: L{Deferred} firing with the L{list} of uids that no server
            took (the caller stores those offline when C{store} is true).
        """

    def confirm(server, entries):
        """Send C{server} confirmations C{[[uid, mid, state], ...]} (L{chatproto.acks}); a L{Deferred}."""

    def kick(location, uid, reason):
        """
        Ask the server of C{location} to close that session of C{uid}.

        @rtype: L{Deferred} firing with L{True} if a server received it.
        """


class IChatSession(Interface):
    """
    One connection to this server and, once logged in, a user: what the
    chat service (registry, login flow, delivery) reads and writes on a
    session.  L{chatproto.protocol.ChatProtocol} provides it; this is the
    role C{IChatClient} plays in C{twisted.words}.
    """

    sid = Attribute("This connection's session id (L{str}, unique in the cluster).")
    uid = Attribute("The logged-in user's id, or None; set by the service.")
    name = Attribute("The logged-in user's name, or None; set by the service.")
    loggingIn = Attribute("The uid this session is claiming while it logs in, or None.")
    connected = Attribute("Whether the connection is open (false once kicked).")
    peerHost = Attribute("The client's address (the real one behind a PROXY header).")
    acking = Attribute("It confirms pushed chats (PUSH_ACK); C{unacked}: mid -> L{chatproto.acks.Unacked}.")
    nulTerminated = Attribute("The client ends its lines with NUL (the tutorial client).")

    def send(message, line=None, force=False):
        """
        Write C{message} (a L{dict}; C{line} is its JSON encoding when
        known).  Held while the session logs in unless C{force}.

        @return: whether the session took it (false: gone, or too far
            behind in reading; the caller stores it offline).
        """

    def reply(request, message):
        """Send C{message} as the reply to C{request} (None: nothing)."""

    def kick(reason):
        """Tell the client why, then close the connection."""

    def hold(uid):
        """Hold pushed messages for C{uid} until L{unhold}."""

    def unhold():
        """Send what was held, in order, and stop holding."""

    def dropHeld():
        """Stop holding; return C{(uid held for, [(message, line), ...])}."""
