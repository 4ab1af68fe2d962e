"""
The presence half of the Redis cluster (see L{chatproto.rediscluster} for
the keys, the connections and the guarantees): claim, release and locate
users, each one Lua script, and list the live servers.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from chatproto.common.registry import parseServers
from chatproto.interfaces import ClaimResult, IPresence, PresenceUnavailable, ServerInfo
from chatproto.rediscluster import RedisCluster, parseLocation
from chatproto.redisscripts import CLAIM, LOCATE, RELEASE

__all__ = ["RedisCluster", "RedisPresence"]



@implementer(IPresence)
class RedisPresence:
    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self.serverName = cluster.name

    def start(self, loginCount) -> defer.Deferred:
        return self.cluster.startRegistry(loginCount)

    def stop(self) -> defer.Deferred:
        return self.cluster.stopRegistry()

    @defer.inlineCallbacks
    def claim(self, uid: int, session: str, replace: bool):
        cluster = self.cluster
        args = [cluster.name, int(uid), session, "1" if replace else "0"]
        previous = ""
        for attempt in range(5):
            status, owner = yield cluster.eval(CLAIM, [*args, previous])
            status = int(status)
            if status == -1:
                if attempt:
                    raise PresenceUnavailable("this server is not registered in Redis")
                # This server's entry expired (Redis restarted or failed
                # over, or we were cut off): register again, then claim.
                yield cluster.register()
            elif status == 2:
                # Taken by another server than we named: name it (its
                # logins count moves in the same script).
                previous = parseLocation(owner).server
            elif status == 3:
                # won from a server nobody listens for: no kick to send
                return ClaimResult(True, parseLocation(owner), listening=False)
            else:
                return ClaimResult(status == 1, parseLocation(owner))
        raise PresenceUnavailable(f"the claim of {uid} kept changing hands")

    def release(self, uid: int, session: str) -> defer.Deferred:
        d = self.cluster.eval(RELEASE, [self.cluster.name, int(uid), session])
        return d.addCallback(lambda removed: int(removed) == 1)

    def locate(self, uids) -> defer.Deferred:
        uids = [int(uid) for uid in uids]
        if not uids:
            return defer.succeed({})
        d = self.cluster.eval(LOCATE, uids)
        return d.addCallback(lambda values: {uid: parseLocation(v) for uid, v in zip(uids, values) if v})

    def announceStop(self) -> defer.Deferred:
        """This server is shutting down: its users count as offline
        everywhere from now on (see L{RedisCluster.announceStop})."""
        return self.cluster.announceStop()

    @defer.inlineCallbacks
    def servers(self):
        """The live servers: C{SMEMBERS}, then one C{HGETALL} per name (a
        name whose hash is gone is a server that went away).  Plain
        commands, not a script: a script would touch keys it cannot
        declare."""
        cluster = self.cluster
        names = yield cluster.command("SMEMBERS", f"{cluster.prefix}servers")
        names = sorted(names or ())
        entries = yield defer.gatherResults(
            [cluster.command("HGETALL", f"{cluster.prefix}server:{name}") for name in names],
            consumeErrors=True,
        ).addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)
        # The one registry reader (the balancer's too): chatproto.common.registry.
        return [
            ServerInfo(e.name, e.host, e.port, e.weight, e.logins or 0, {"updated": e.updated})
            for e in parseServers(zip(names, entries))
        ]
