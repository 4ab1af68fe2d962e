"""
Delivery: a message to users wherever they are.  Local sessions get it
directly, the others through the L{IRelay}; what nobody takes is stored
offline when asked.  Also the receiving end of the relay.

A chat with a C{mid} is done only when the recipient's server has taken
responsibility for it (L{chatproto.acks}): written to a legacy session,
acked by an acking one, or stored offline.  Until then the sending server
waits for a confirmation and stores it itself when none comes.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from chatproto import messages as m
from chatproto.acks import DELIVERED, MISSED, STORED, TIMEOUT, Unacked
from chatproto.interfaces import IRelayReceiver
from chatproto.messages import RequestError, encode
from chatproto.output import batch
from chatproto.pipeline import Pipelined
from chatproto.redeliver import NUDGE, Redelivery, isNudge
from chatproto.remotechat import RemoteChat
from chatproto.tasks import storeCall

#: Messages kept offline when their recipient cannot take them now.
STORED_MSGIDS = frozenset((m.ONE_CHAT_MSG, m.GROUP_CHAT_MSG))


@implementer(IRelayReceiver)
class Delivery:
    """
    @param registry: the L{chatproto.registry.SessionRegistry}.
    @param tasks: the L{chatproto.tasks.BackgroundTasks} of the service.
    @param confirmations: the L{chatproto.acks.Confirmations}.
    @ivar onCongested: called with an acking session that has more than
        L{maxUnacked} messages unacked (the service logs it out).
    """

    log = Logger()
    writeBatch = batch
    #: messages an acking session may leave unacked; one more logs it out
    maxUnacked = 1000
    onCongested = None
    #: called with a session told of a new friend (its friend ids changed)
    onFriendAdded = None

    def __init__(self, registry, store, relay, tasks, confirmations) -> None:
        self.registry = registry
        self.store = store
        self.relay = relay
        self.tasks = tasks
        self.confirmations = confirmations
        self.redelivery = Redelivery(store, tasks)

    def push(self, session, uid: int, message: dict, line: bytes, origin: str | None = None) -> bool:
        """Send C{message} to C{session}; an acking session keeps a chat
        until it acks it (C{origin}: the server waiting for that).  A
        nudge hands the user's offline messages over instead."""
        if isNudge(message):
            self.redelivery.handOver(session, uid)
            return True
        if not session.send(message, line):
            return False
        if message.get("msgid") == m.FRIEND_ADDED_NOTICE and self.onFriendAdded is not None:
            self.onFriendAdded(session)
        mid = message.get("mid")
        if session.acking and mid is not None and message.get("msgid") in STORED_MSGIDS:
            entry = session.unacked.get(mid)
            if entry is None:
                session.unacked[mid] = Unacked(uid, line.decode("utf-8"), [origin] if origin else [])
                if len(session.unacked) > self.maxUnacked and self.onCongested is not None:
                    self.onCongested(session)
            elif origin is not None:
                entry.origins.append(origin)
        return True

    async def deliver(self, uids, message: dict, store: bool, routed=None) -> list[int]:
        """
        Deliver C{message} to C{uids}: local sessions directly, the rest
        through the relay; what nobody takes is stored offline when
        C{store}.  A stored message with a mid is done when each
        recipient's server confirmed it (or stored it, or did not answer
        within the confirmation timeout: then it is stored here).

        @param routed: a Deferred fired once every copy has its place in
            line: pushed to a local session, handed to a recipient's
            server, or stored offline (L{chatproto.pipeline}); what comes
            after is waiting for confirmations.
        @return: the uids whose copy was stored offline (here or by the
            recipient's server).
        """
        line = encode(message)
        mid = message.get("mid") if store else None
        confirmations = self.confirmations
        here = self.registry.serverName if mid is not None else None
        remote, waits = [], {}
        sessions = self.registry.sessions
        for uid in uids:
            target = sessions.get(uid)
            # Waiting before the push: a session logged out by it (too many
            # unacked) reports at once.
            waiting = confirmations.expect(uid, mid) if here and target is not None and target.acking else None
            if target is not None and self.push(target, uid, message, line, here):
                if waiting is not None:
                    waits[uid] = waiting
                continue
            if waiting is not None:
                confirmations.resolve(uid, mid, MISSED)
            remote.append(uid)
        missed, storedNow, offline = [], [], set()
        if remote:
            if mid is not None:
                # Before publishing: a confirmation may come back first.
                waits.update((uid, confirmations.expect(uid, mid)) for uid in remote)
            try:
                missed = await self.relay.deliver(remote, message, store, line)
            except Exception as e:
                # The relay is down: whoever is elsewhere gets it offline.
                self.log.warn("relay unavailable ({error}); storing for {n} users", error=e, n=len(remote))
                missed = remote
            if mid is not None and missed:
                # Nobody has them: offline (no nudge needed).
                for uid in missed:
                    confirmations.resolve(uid, mid, MISSED)
                if routed is not None:
                    # Now, before the connection's next chat is routed.
                    for uid in missed:
                        waits.pop(uid, None)
                    storedNow = missed
                    await storeCall(self.store.storeOffline([(uid, line.decode("utf-8")) for uid in storedNow]))
                else:
                    # With the others below, in one call.
                    offline = set(missed)
                missed = []
        if routed is not None:
            routed.callback(None)
        storedThere = []
        for uid, waiting in waits.items():
            state = await waiting
            if state in (MISSED, TIMEOUT):
                missed.append(uid)
            elif state == STORED:
                storedThere.append(uid)
        if not store:
            return []
        if missed:
            await storeCall(self.store.storeOffline([(uid, line.decode("utf-8")) for uid in missed]))
            # Not confirmed: the user may be logged in elsewhere by now.
            self.nudge([uid for uid in missed if uid not in offline])
        return storedNow + missed + storedThere

    def nudge(self, uids) -> None:
        """Messages were stored for C{uids}, who may be logged in (on any
        server): hand them over now (L{chatproto.redeliver})."""
        if uids:
            self.tasks.track(defer.Deferred.fromCoroutine(self.deliver(uids, NUDGE, store=False)))

    def chat(self, toid: int, out: dict, elsewhere: bool) -> Pipelined:
        """A one-to-one chat the fast path did not deliver (no local legacy
        session took it), as a L{Pipelined}.  C{elsewhere}: C{toid} has no
        session here; a known user is then L{RemoteChat}'s."""
        if elsewhere and toid in self.registry.names:
            return RemoteChat(self, toid, out).start()
        routed = defer.Deferred()
        return Pipelined(routed, defer.Deferred.fromCoroutine(self.deliverChat(toid, out, routed)))

    async def deliverChat(self, toid: int, out: dict, routed=None) -> dict:
        """A one-to-one chat the fast path (a local legacy session that took
        it) did not deliver: check the user exists, relay or store it; the
        sender's ack.  C{routed} fires once it is routed (L{deliver}), or
        failed."""
        try:
            names = self.registry.names
            if toid not in names:
                found = await storeCall(self.store.getNames([toid]))
                if toid not in found:
                    raise RequestError(m.E_NO_SUCH_USER, f"no user with id {toid}")
                names.update(found)
            stored = await self.deliver([toid], out, True, routed)
        finally:
            if routed is not None and not routed.called:
                routed.callback(None)
        state = "stored" if stored else "delivered"
        return {"msgid": m.ONE_CHAT_MSG_ACK, "errno": m.OK, "toid": toid, "state": state}

    def deliverLater(self, uids, message: dict) -> None:
        """Deliver a notice (not stored) in the background."""
        self.tasks.track(defer.Deferred.fromCoroutine(self.deliver(uids, message, store=False)))

    def storeHeld(self, session) -> None:
        """Chat messages delivered to a session while it was logging in, that
        it never got (it went away or its login failed), are stored offline;
        so is what an acking session did not ack."""
        uid, held = session.dropHeld()
        rows = [(uid, (line or encode(msg)).decode("utf-8")) for msg, line in held if msg.get("msgid") in STORED_MSGIDS]
        if rows:
            self.tasks.track(self.store.storeOffline(rows))
        self.storeUnacked(session)

    def storeUnacked(self, session) -> None:
        """The session ends (however): what it did not ack is stored
        offline (those handed over from the store are still there), then
        the servers waiting for them are told C{stored} (C{missed} if
        storing failed: they store it themselves)."""
        entries, session.unacked = session.unacked, {}
        if not entries:
            return
        rows = [(e.uid, e.payload) for e in entries.values() if not e.offline]
        waiting = [(origin, e.uid, mid) for mid, e in entries.items() for origin in e.origins]

        def report(state):
            for origin, uid, mid in waiting:
                self.confirmations.notify(origin, uid, mid, state)

        def stored(_):
            report(STORED)
            # The user may have logged in again elsewhere (a kick).
            self.nudge(sorted({uid for uid, _ in rows}))

        if not rows:
            report(STORED)
            return
        d = self.store.storeOffline(rows)
        d.addCallbacks(stored, lambda f: (report(MISSED), f)[1])
        self.tasks.track(d)

    def acked(self, session, mids) -> None:
        """A PUSH_ACK: these are done (unknown mids are ignored)."""
        unacked = session.unacked
        handedOver = []
        for mid in mids:
            entry = unacked.pop(mid, None)
            if entry is None:
                continue
            for origin in entry.origins:
                self.confirmations.notify(origin, entry.uid, mid, DELIVERED)
            if entry.offline:
                handedOver.append(mid)
        if handedOver and session.uid is not None:
            self.tasks.track(self.store.deleteOffline(session.uid, handedOver))

    # --- IRelayReceiver -----------------------------------------------------

    def deliverLocal(self, uids, message: dict, store: bool, origin: str | None = None) -> list[int]:
        """A message relayed from C{origin}: a stored chat with a mid is
        confirmed to it (written to a legacy session; for an acking one,
        once acked), or reported missed (it stores it); without an origin
        what nobody here takes is stored here."""
        line = encode(message)
        mid = message.get("mid") if store else None
        origin = origin if mid is not None else None
        notify = self.confirmations.notify
        missed = []
        sessions = self.registry.sessions
        for uid in uids:
            target = sessions.get(uid)
            if target is None or not self.push(target, uid, message, line, origin):
                missed.append(uid)
            elif origin is not None and not target.acking:
                notify(origin, uid, mid, DELIVERED)
        if missed and store:
            if origin is not None:
                for uid in missed:
                    notify(origin, uid, mid, MISSED)
            else:
                # The user left between routing and arrival: keep it for them.
                payload = line.decode("utf-8")
                self.tasks.track(self.store.storeOffline([(uid, payload) for uid in missed]))
        return missed

    def confirmed(self, entries) -> None:
        """Confirmations from other servers for messages sent from here."""
        self.confirmations.received(entries)

    def localSessions(self) -> list[tuple[int, str]]:
        return self.registry.localSessions()

    def kickLocal(self, uid: int, session: str, reason: str) -> None:
        self.registry.kickLocal(uid, session, reason)
