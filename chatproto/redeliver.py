"""
Offline messages handed over to a session that is already logged in.

A chat stored as a fallback (its recipient's server did not confirm it, or
reported the user gone, or the recipient's session ended before acking)
may belong to a user who is by then logged in elsewhere: a newer login
that replaced a kicked session, or a user who reconnected to another
server after theirs was killed.  The server that stored it sends a
I{nudge} (an internal relay message, never shown to clients) to the user's
current server, which hands the user's offline messages over to the live
session at once, as the login does, instead of at the next login.
"""

from __future__ import annotations

import json

from twisted.logger import Logger

from chatproto.acks import Unacked, midOf

#: The internal relay message: "hand this user's offline messages over now".
NUDGE = {"nudge": 1}


def isNudge(message: dict) -> bool:
    return message.get("nudge") == 1 and "msgid" not in message


class Redelivery:
    """
    @param store: the L{chatproto.interfaces.IChatStore}.
    @param tasks: the L{chatproto.tasks.BackgroundTasks}.
    """

    log = Logger()

    def __init__(self, store, tasks) -> None:
        self.store = store
        self.tasks = tasks
        #: session id -> another nudge came while handing over
        self.running: dict[str, bool] = {}

    def handOver(self, session, uid: int) -> None:
        """Hand C{uid}'s offline messages to its logged-in C{session}: for
        an acking session kept until acked, else deleted once written."""
        if session.uid != uid or not session.connected:
            return
        if session.sid in self.running:
            self.running[session.sid] = True
            return
        self.running[session.sid] = False
        acking = session.acking

        def handoff(payloads) -> bool:
            if session.uid != uid or not session.connected:
                return False
            for payload in payloads:
                mid = midOf(payload)
                if acking and mid is not None:
                    entry = session.unacked.get(mid)
                    if entry is not None:
                        # Pushed already, not acked yet: deleted once it is.
                        entry.offline = True
                        continue
                    session.unacked[mid] = Unacked(uid, payload, [], offline=True)
                session.send(json.loads(payload), payload.encode("utf-8"), force=True)
            return True

        d = self.store.takeOffline(uid, handoff, keepAcked=acking)
        self.tasks.track(d.addBoth(lambda result: (self.end(session, uid), result)[1]))

    def begin(self, session) -> None:
        """A login hands the offline messages over: a nudge meanwhile waits
        for it to end (never pushed before the login reply)."""
        self.running[session.sid] = False

    def end(self, session, uid: int) -> None:
        """A hand-over ended: run the nudge that came meanwhile."""
        if self.running.pop(session.sid, False):
            self.handOver(session, uid)
