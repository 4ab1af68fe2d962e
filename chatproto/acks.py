"""
End-to-end acknowledgements: message ids, what an acking session has not
confirmed yet, and the confirmations that tell a sending server when the
recipient's server has taken responsibility for a message.

 - C{mid}: every pushed chat carries one.  A sender's C{cid} gives a mid
   derived from (sender, cid) alone (L{midFor}), so any server computes the
   same one without storage and a resent message is recognised; without a
   cid the mid is fresh (L{newMid}).
 - An acking session (C{"ack": true} at login) keeps every chat pushed to it
   in C{session.unacked} (mid -> L{Unacked}) until the client confirms it
   with C{PUSH_ACK}; whatever is left when the session ends is stored
   offline (L{chatproto.delivery.Delivery.storeUnacked}).
 - L{Confirmations}: the sending server waits (L{Confirmations.expect}) for
   a state per (recipient, mid): C{delivered} (the acking client acked, or a
   legacy session had it written), C{stored} (the recipient's server stored
   it offline), C{missed} (nobody there took it: the sender stores it) or
   C{timeout} (nothing came within L{Confirmations.timeout} seconds: the
   sender stores it).  The recipient's server reports with
   L{Confirmations.notify}: in process when the sender is this server, else
   batched per reactor turn over the relay to the sender's channel.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re

from twisted.internet import defer
from twisted.logger import Logger

from chatproto import messages as m

#: what the sending server may learn about one (recipient, mid)
DELIVERED, STORED, MISSED, TIMEOUT = "delivered", "stored", "missed", "timeout"

#: Longest C{cid} (characters of a string; an integer is any 64-bit one).
MAX_CID = 64
#: Most mids in one PUSH_ACK, and the longest mid accepted in it.
MAX_ACK_MIDS = 1000
MAX_MID = 64

_MID = re.compile(r'"mid":"([A-Za-z0-9_-]{1,64})"')


def midFor(uid: int, cid) -> str:
    """The mid of sender C{uid}'s message with client id C{cid} (a
    string or an integer; C{5} and C{"5"} are different ids)."""
    kind = "i" if isinstance(cid, int) else "s"
    digest = hashlib.sha256(f"{uid}\0{kind}{cid}".encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode("ascii").rstrip("=")


#: Fresh mids made per read of the system's random source.
MID_BATCH = 128


def _freshMids():
    # 33 random bytes are 44 base64url characters (no padding): two mids of
    # 22 characters (132 random bits each).  One os.urandom call per batch
    # instead of one per message (secrets.token_urlsafe reads os.urandom).
    while True:
        text = base64.urlsafe_b64encode(os.urandom(33 * MID_BATCH // 2)).decode("ascii")
        for start in range(0, len(text), 22):
            yield text[start : start + 22]


_mids = _freshMids()


def newMid() -> str:
    """A fresh, unique mid (22 characters, 132 random bits from
    C{os.urandom}), for a message without cid."""
    return next(_mids)


def midOf(payload: str) -> str | None:
    """The mid of a stored or pushed JSON text, if it has one.  (Inside a
    JSON string every quote is escaped, so C{"mid":"} only matches a key.)"""
    found = _MID.search(payload)
    return found.group(1) if found else None


def checkCid(cid):
    """C{cid} as sent (a string of 1-64 characters or a 64-bit integer),
    or L{None}; raises errno 13 otherwise."""
    if cid is None:
        return None
    if type(cid) is int:
        if not m.MIN_ID <= cid <= m.MAX_ID:
            raise m.RequestError(m.E_BAD_FIELD, "field 'cid' is out of range (signed 64-bit)")
        return cid
    if type(cid) is str and 0 < len(cid) <= MAX_CID:
        try:
            cid.encode("utf-8")
        except UnicodeEncodeError:
            raise m.RequestError(m.E_BAD_FIELD, "field 'cid' is not valid Unicode") from None
        return cid
    raise m.RequestError(m.E_BAD_FIELD, f"field 'cid' must be a string of 1-{MAX_CID} characters or an integer")


def checkMids(mids) -> list[str]:
    """The mids of a PUSH_ACK: a list of at most L{MAX_ACK_MIDS} strings."""
    if type(mids) is not list:
        raise m.RequestError(m.E_BAD_FIELD, "field 'mids' must be a list of strings")
    if len(mids) > MAX_ACK_MIDS:
        raise m.RequestError(m.E_BAD_FIELD, f"at most {MAX_ACK_MIDS} mids per PUSH_ACK")
    if not all(type(mid) is str and len(mid) <= MAX_MID for mid in mids):
        raise m.RequestError(m.E_BAD_FIELD, f"field 'mids' must be a list of strings of at most {MAX_MID} characters")
    return mids


class Unacked:
    """A message pushed to an acking session and not confirmed yet.

    @ivar uid: its recipient.
    @ivar payload: its JSON text.
    @ivar origins: the servers waiting for its confirmation.
    @ivar offline: it was handed over from the offline store (still there
        until acked).
    """

    __slots__ = ("uid", "payload", "origins", "offline")

    def __init__(self, uid: int, payload: str, origins, offline: bool = False) -> None:
        self.uid = uid
        self.payload = payload
        self.origins = origins
        self.offline = offline


class Confirmations:
    """
    Both ends of the sending server's wait for the recipient's server.

    @param serverName: this server (its own confirmations stay in process).
    @param relay: the L{chatproto.interfaces.IRelay} (C{confirm}).
    """

    log = Logger()
    #: seconds a sending server waits before it stores the message itself
    timeout = 5.0

    def __init__(self, clock, serverName: str, relay) -> None:
        self.clock = clock
        self.serverName = serverName
        self.relay = relay
        #: (uid, mid) -> [callable, ...] waiting for its state
        self.pending: dict[tuple[int, str], list] = {}
        self._timers: dict[tuple[int, str], object] = {}
        #: server -> [[uid, mid, state], ...] to send at the end of this turn
        self._outgoing: dict[str, list] = {}
        self._flushCall = None

    # --- the sending server -------------------------------------------------

    def expect(self, uid: int, mid: str) -> defer.Deferred:
        """A Deferred firing with the state of (C{uid}, C{mid}): the first
        reported, or L{TIMEOUT}."""
        d = defer.Deferred()
        self.expectCall(uid, mid, d.callback)
        return d

    def expectCall(self, uid: int, mid: str, call) -> None:
        """L{expect} with a plain callback: C{call(state)}, once."""
        key = (uid, mid)
        waiting = self.pending.get(key)
        if waiting is None:
            self.pending[key] = [call]
            self._timers[key] = self.clock.callLater(self.timeout, self.resolve, uid, mid, TIMEOUT)
        else:
            waiting.append(call)

    def resolve(self, uid: int, mid: str, state: str) -> None:
        """(C{uid}, C{mid}) is C{state}; nothing when nobody waits (a late
        confirmation after the fallback store)."""
        key = (uid, mid)
        timer = self._timers.pop(key, None)
        if timer is not None and timer.active():
            timer.cancel()
        for call in self.pending.pop(key, ()):
            call(state)

    def stopWaiting(self) -> None:
        """The server stops: everything pending times out now, and what is
        expected from now on at once."""
        self.timeout = 0
        for uid, mid in list(self.pending):
            self.resolve(uid, mid, TIMEOUT)

    def received(self, entries) -> None:
        """Confirmations from other servers: C{[[uid, mid, state], ...]}."""
        for uid, mid, state in entries:
            if state in (DELIVERED, STORED, MISSED):
                self.resolve(int(uid), str(mid), state)

    # --- the recipient's server ---------------------------------------------

    def notify(self, origin: str | None, uid: int, mid: str, state: str) -> None:
        """Tell C{origin} (the sending server) the state of (C{uid}, C{mid})."""
        if origin is None:
            return
        if origin == self.serverName:
            self.resolve(uid, mid, state)
            return
        self._outgoing.setdefault(origin, []).append([uid, mid, state])
        if self._flushCall is None:
            self._flushCall = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        outgoing, self._outgoing = self._outgoing, {}
        for server, entries in outgoing.items():
            d = defer.maybeDeferred(self.relay.confirm, server, entries)
            # Lost: the sender times out and stores the message itself.
            d.addErrback(self._lost, server)

    #: a L{chatproto.logrepeat.RepeatedWarnings} (one line, then a count)
    warnings = None

    def _lost(self, failure, server: str) -> None:
        text = "confirmations to {server} lost ({error}); it stores those messages itself"
        if self.warnings is not None:
            self.warnings.warn("confirmations lost", text, server=server, error=failure.value)
        else:
            self.log.warn(text, server=server, error=failure.value)

