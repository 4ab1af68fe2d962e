"""
In-process presence and relay: the single-node default, no setup.

One chat server is the whole cluster, so presence is a dict and the relay
has nobody else to deliver to.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from chatproto.interfaces import ClaimResult, IPresence, IRelay, Location, ServerInfo


@implementer(IPresence)
class LocalPresence:
    def __init__(self, serverName: str, host: str = "", port: int = 0, weight: int = 1) -> None:
        self.serverName = serverName
        self._info = (host, port, weight)
        self._owners: dict[int, Location] = {}
        self._loginCount = lambda: len(self._owners)

    def start(self, loginCount) -> defer.Deferred:
        self._loginCount = loginCount
        return defer.succeed(None)

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)

    def claim(self, uid: int, session: str, replace: bool) -> defer.Deferred:
        previous = self._owners.get(uid)
        if previous is not None and not replace and previous.session != session:
            return defer.succeed(ClaimResult(False, previous))
        self._owners[uid] = Location(self.serverName, session)
        if previous is not None and previous.session == session:
            previous = None
        return defer.succeed(ClaimResult(True, previous))

    def release(self, uid: int, session: str) -> defer.Deferred:
        owner = self._owners.get(uid)
        if owner is not None and owner.session == session:
            del self._owners[uid]
            return defer.succeed(True)
        return defer.succeed(False)

    def locate(self, uids) -> defer.Deferred:
        owners = self._owners
        return defer.succeed({uid: owners[uid] for uid in uids if uid in owners})

    def servers(self) -> defer.Deferred:
        host, port, weight = self._info
        return defer.succeed([ServerInfo(self.serverName, host, port, weight, self._loginCount())])


@implementer(IRelay)
class LocalRelay:
    """There are no other servers: nothing is taken elsewhere."""

    def start(self, receiver) -> defer.Deferred:
        self.receiver = receiver
        return defer.succeed(None)

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)

    def deliver(self, uids, message, store, line=None) -> defer.Deferred:
        return defer.succeed(list(uids))

    def confirm(self, server, entries) -> defer.Deferred:
        # Every message comes from this server: confirmed in process.
        return defer.succeed(None)

    def kick(self, location, uid, reason) -> defer.Deferred:
        # Locations are all on this server; the service kicks those itself.
        return defer.succeed(False)
