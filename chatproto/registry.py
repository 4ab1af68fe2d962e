"""
The sessions of this server: every connection, the logged-in user of each,
and who is online (here, or elsewhere through L{IPresence}).
"""

from __future__ import annotations

import secrets

from twisted.logger import Logger

from chatproto.interfaces import PresenceUnavailable

ONLINE = "online"
OFFLINE = "offline"


class SessionRegistry:
    """
    @ivar sessions: uid -> the logged-in L{IChatSession} of that user here.
    @ivar connections: session id -> every connected session, logged in or
        not.
    @ivar names: uid -> name of users known to exist (names never change).
    """

    log = Logger()

    def __init__(self, serverName: str, presence) -> None:
        self.serverName = serverName
        self.presence = presence
        self.sessions: dict[int, object] = {}
        self.connections: dict[str, object] = {}
        self.names: dict[int, str] = {}

    def newSessionId(self) -> str:
        return secrets.token_hex(8)

    def connected(self, session) -> None:
        self.connections[session.sid] = session

    def disconnected(self, session) -> None:
        self.connections.pop(session.sid, None)

    def bind(self, session, uid: int, name: str) -> None:
        """C{session} is now C{uid}'s login on this server."""
        session.uid = uid
        session.name = name
        self.sessions[uid] = session
        self.names[uid] = name

    def unbind(self, session) -> int | None:
        """Forget C{session}'s login here (presence is not touched); return
        the uid it was logged in as."""
        uid = session.uid
        if uid is not None:
            session.uid = None
            if self.sessions.get(uid) is session:
                del self.sessions[uid]
        return uid

    #: called with a logged-in session about to be kicked
    onKick = None

    def kickLocal(self, uid: int, session: str, reason: str) -> None:
        """Close the local session C{session} of C{uid}, logged in or still
        logging in (another session took over the account)."""
        target = self.connections.get(session)
        if target is None:
            return
        if target.uid == uid:
            self.unbind(target)
            target.kick(reason)
            # What it did not ack is stored (before a new login here hands
            # over; a login elsewhere gets it through a nudge).
            if self.onKick is not None:
                self.onKick(target)
        elif target.loggingIn == uid:
            target.kick(reason)

    def localSessions(self) -> list[tuple[int, str]]:
        return [(uid, session.sid) for uid, session in self.sessions.items()]

    def loginCount(self) -> int:
        return len(self.sessions)

    async def states(self, uids) -> dict[int, str]:
        """C{{uid: ONLINE or OFFLINE}}; offline when presence is down."""
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
