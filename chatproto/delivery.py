"""
Delivery: a message to users wherever they are.  Local sessions get it
directly, the others through the L{IRelay}; what nobody takes is stored
offline when asked.  Also the receiving end of the relay.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from chatproto import messages as m
from chatproto.interfaces import IRelayReceiver
from chatproto.messages import RequestError, encode
from chatproto.output import batch
from chatproto.tasks import storeCall

#: Messages kept offline when their recipient cannot take them now.
STORED_MSGIDS = frozenset((m.ONE_CHAT_MSG, m.GROUP_CHAT_MSG))


@implementer(IRelayReceiver)
class Delivery:
    """
    @param registry: the L{chatproto.registry.SessionRegistry}.
    @param tasks: the L{chatproto.tasks.BackgroundTasks} of the service.
    """

    log = Logger()
    writeBatch = batch

    def __init__(self, registry, store, relay, tasks) -> None:
        self.registry = registry
        self.store = store
        self.relay = relay
        self.tasks = tasks

    async def deliver(self, uids, message: dict, store: bool) -> list[int]:
        """
        Deliver C{message} to C{uids}: local sessions directly, the rest
        through the relay; what nobody takes is stored offline when
        C{store}.

        @return: the uids whose copy was stored offline here.
        """
        line = encode(message)
        remote = []
        sessions = self.registry.sessions
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
            await storeCall(self.store.storeOffline([(uid, line.decode("utf-8")) for uid in missed]))
        return list(missed) if store else []

    async def deliverChat(self, toid: int, out: dict) -> dict:
        """A one-to-one chat the fast path (a local session that took it)
        did not deliver: check the user exists, relay or store it; the
        sender's ack."""
        names = self.registry.names
        if toid not in names:
            found = await storeCall(self.store.getNames([toid]))
            if toid not in found:
                raise RequestError(m.E_NO_SUCH_USER, f"no user with id {toid}")
            names.update(found)
        stored = await self.deliver([toid], out, store=True)
        state = "stored" if stored else "delivered"
        return {"msgid": m.ONE_CHAT_MSG_ACK, "errno": m.OK, "toid": toid, "state": state}

    def deliverLater(self, uids, message: dict) -> None:
        """Deliver a notice (not stored) in the background."""
        self.tasks.track(defer.Deferred.fromCoroutine(self.deliver(uids, message, store=False)))

    def storeHeld(self, session) -> None:
        """Chat messages delivered to a session while it was logging in, that
        it never got (it went away or its login failed), are stored offline."""
        uid, held = session.dropHeld()
        rows = [(uid, (line or encode(msg)).decode("utf-8")) for msg, line in held if msg.get("msgid") in STORED_MSGIDS]
        if rows:
            self.tasks.track(self.store.storeOffline(rows))

    # --- IRelayReceiver -----------------------------------------------------

    def deliverLocal(self, uids, message: dict, store: bool) -> list[int]:
        """A message relayed from another server."""
        line = encode(message)
        missed = []
        sessions = self.registry.sessions
        for uid in uids:
            target = sessions.get(uid)
            if target is None or not target.send(message, line):
                missed.append(uid)
        if missed and store:
            # The user left between routing and arrival: keep it for them.
            payload = line.decode("utf-8")
            self.tasks.track(self.store.storeOffline([(uid, payload) for uid in missed]))
        return missed

    def localSessions(self) -> list[tuple[int, str]]:
        return self.registry.localSessions()

    def kickLocal(self, uid: int, session: str, reason: str) -> None:
        self.registry.kickLocal(uid, session, reason)
