"""
The presence half of the Redis cluster (see L{chatproto.rediscluster} for
the keys, the connections and the guarantees): claim, release and locate
users, each one Lua script, and list the live servers.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from chatproto.interfaces import ClaimResult, IPresence, ServerInfo
from chatproto.rediscluster import RedisCluster, parseLocation
from chatproto.redisscripts import CLAIM, LOCATE, RELEASE, SERVERS

__all__ = ["RedisCluster", "RedisPresence"]

log = Logger()


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
        status, owner = yield cluster.eval(CLAIM, args)
        if int(status) == -1:
            # This server's entry expired (Redis restarted or we were cut
            # off): register again, then claim.
            yield cluster.register()
            status, owner = yield cluster.eval(CLAIM, args)
            if int(status) == -1:
                raise PresenceUnavailable("this server is not registered in Redis")
        return ClaimResult(int(status) == 1, parseLocation(owner))

    def release(self, uid: int, session: str) -> defer.Deferred:
        d = self.cluster.eval(RELEASE, [self.cluster.name, int(uid), session])
        return d.addCallback(lambda removed: int(removed) == 1)

    def locate(self, uids) -> defer.Deferred:
        uids = [int(uid) for uid in uids]
        if not uids:
            return defer.succeed({})
        d = self.cluster.eval(LOCATE, uids)
        return d.addCallback(lambda values: {uid: parseLocation(v) for uid, v in zip(uids, values) if v})

    def servers(self) -> defer.Deferred:
        def parse(entries):
            infos = []
            for fields in entries:
                h = dict(zip(fields[::2], fields[1::2]))
                try:
                    infos.append(
                        ServerInfo(
                            h["name"],
                            h.get("host", ""),
                            int(h.get("port") or 0),
                            int(h.get("weight") or 0),
                            int(h.get("logins") or 0),
                            {"updated": int(h.get("updated") or 0)},
                        )
                    )
                except (KeyError, ValueError):
                    log.warn("malformed registry entry {entry!r}", entry=h)
            return sorted(infos, key=lambda s: s.name)

        return self.cluster.eval(SERVERS, []).addCallback(parse)
