"""
The common case of a chat that leaves this server: one known recipient
with no session here.  It is what L{chatproto.delivery.Delivery.deliver}
does for one such recipient, written as plain callbacks: no coroutine and
no Deferred per confirmation, which costs a third of the sending server's
CPU per message on this path.

 1. wait for the recipient's server's confirmation
    (L{chatproto.acks.Confirmations.expectCall}), then hand the chat to the
    relay;
 2. the relay's answer routes it (L{chatproto.pipeline}): taken by a
    server, or nobody has the user: stored offline first;
 3. the confirmation answers the sender: C{delivered}, C{stored} by the
    recipient's server, or (missed, or none within the timeout) stored
    here and handed to the user's live session if there is one (a nudge).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from chatproto import messages as m
from chatproto.acks import DELIVERED, MISSED, STORED
from chatproto.pipeline import Pipelined
from chatproto.tasks import storeCall

log = Logger()

#: Pre-encoded acks per recipient and state (made once; replies are never
#: changed: a reply with a seq is a copy).
_ACKS: dict[tuple[int, str], m.Reply] = {}
_MAX_ACKS = 8192


def ackOf(toid: int, state: str) -> m.Reply:
    """The ack of a one-to-one chat to C{toid}: C{delivered} or C{stored}."""
    ack = _ACKS.get((toid, state))
    if ack is None:
        if len(_ACKS) >= _MAX_ACKS:
            _ACKS.clear()
        ack = _ACKS[(toid, state)] = m.Reply(
            b'{"msgid":12,"errno":0,"toid":%d,"state":"%s"}' % (toid, state.encode("ascii")),
            msgid=m.ONE_CHAT_MSG_ACK,
            errno=m.OK,
            toid=toid,
            state=state,
        )
    return ack


class RemoteChat:
    """
    One chat to C{toid}, who has no session here.  L{start} returns the
    L{Pipelined} the protocol waits on.
    """

    __slots__ = ("delivery", "toid", "out", "mid", "line", "routed", "done", "offline")

    def __init__(self, delivery, toid: int, out: dict) -> None:
        self.delivery = delivery
        self.toid = toid
        self.out = out
        self.mid = out["mid"]
        self.line = m.encodeChat(out)
        self.routed = defer.Deferred()
        self.done = defer.Deferred()
        #: nobody had the user: stored here before routing
        self.offline = False

    def start(self) -> Pipelined:
        delivery = self.delivery
        # Before publishing: a confirmation may come back first.
        delivery.confirmations.expectCall(self.toid, self.mid, self.confirmed)
        try:
            d = delivery.relay.deliver([self.toid], self.out, True, self.line)
        except Exception as e:  # noqa: BLE001 (a relay that raises is down)
            d = defer.fail(e)
        d.addCallbacks(self.handedOver, self.relayDown)
        return Pipelined(self.routed, self.done)

    def handedOver(self, missed) -> None:
        if missed:
            self.storeNow()
        else:
            self.routed.callback(None)

    def relayDown(self, failure) -> None:
        log.warn("relay unavailable ({error}); storing for 1 user", error=failure.value)
        self.storeNow()

    def storeNow(self) -> None:
        """Nobody has the user: offline now, before the connection's next
        chat is routed (no nudge needed)."""
        self.offline = True
        self.delivery.confirmations.resolve(self.toid, self.mid, MISSED)
        d = self._store()
        d.addBoth(self._route)
        d.addCallback(self._stored)
        d.chainDeferred(self.done)

    def _route(self, result):
        """Stored (or failed to): the connection's next chat may go."""
        self.routed.callback(None)
        return result

    def confirmed(self, state: str) -> None:
        if self.offline:
            return
        if state in (DELIVERED, STORED):
            self.done.callback(ackOf(self.toid, state))
            return
        # Missed there, or no confirmation: stored here; the user may be
        # logged in elsewhere by now.
        d = self._store()
        d.addCallback(self._storedAfterAll)
        d.chainDeferred(self.done)

    def _storedAfterAll(self, _) -> m.Reply:
        self.delivery.nudge([self.toid])
        return ackOf(self.toid, STORED)

    def _stored(self, _) -> m.Reply:
        return ackOf(self.toid, STORED)

    def _store(self) -> defer.Deferred:
        rows = [(self.toid, self.line.decode("utf-8"))]
        return defer.Deferred.fromCoroutine(storeCall(self.delivery.store.storeOffline(rows)))
