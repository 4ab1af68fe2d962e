"""
One session per account and the graceful stop across two chat servers in
this process (real MariaDB and Redis, TCP clients), with
C{--on-relogin reject}: a user of a server that is stopping, or whose
server's subscriber is gone (as for a killed process), logs in on the other
server at once; when the subscriber comes back, its server closes the stale
session (the kick it missed).
"""

from __future__ import annotations

from chatproto import messages as m
from tests.cluster_helpers import until
from tests.test_cluster_e2e import ClusterTestCase


class RejectModeRecoveryTests(ClusterTestCase):
    extraArgs = ["--on-relogin", "reject"]

    async def test_loginElsewhereWhileServerStops(self):
        """chat2 stops while bob is logged in there: bob gets the goodbye,
        and his login on chat1 succeeds at once (chat2 announced its stop
        first); a chat alice sent him in between is delivered or stored,
        never lost."""
        a, b = await self.register("alice"), await self.register("bob", 1)
        alice, _ = await self.login(a, "alice", 0)
        bob, _ = await self.login(b, "bob", 1)
        stopping = self.tops[1].stopService()
        notice = await bob.nextOf(m.KICK_NOTICE)
        self.assertEqual(notice["reason"], "server shutting down")
        await bob.closed
        bob2, reply = await self.login(b, "bob", 0)
        self.assertEqual(reply["errno"], m.OK)
        await stopping
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "on chat1 now"})
        self.assertEqual(ack["state"], "delivered")
        self.assertEqual((await bob2.nextOf(m.ONE_CHAT_MSG))["msg"], "on chat1 now")

    async def test_ownerNotListeningThenRepaired(self):
        """chat2's subscriber goes away (what Redis sees of a killed
        process): bob's login on chat1 is not refused; when chat2
        subscribes again, it finds bob taken and closes its stale session
        with a kick notice, so only one session of bob is left."""
        b = await self.register("bob", 1)
        old, _ = await self.login(b, "bob", 1)
        cluster2 = self.services[1].presence.cluster
        await cluster2.subscriber.stop()
        await until(
            lambda: self.redis("PUBSUB", "NUMSUB", f"{self.prefix}relay:chat2")[1] == 0, 5, what="chat2 unsubscribed"
        )
        new, reply = await self.login(b, "bob", 0)
        self.assertEqual(reply["errno"], m.OK)
        self.assertEqual(self.location(b), "chat1")
        # The kick chat1 published was lost; the stale session lives on.
        self.assertIn(b, self.services[1].sessions)
        cluster2.subscriber.start()
        notice = await old.nextOf(m.KICK_NOTICE)
        self.assertEqual(notice["reason"], "logged in elsewhere")
        await old.closed
        self.assertNotIn(b, self.services[1].sessions)
        self.assertEqual(self.location(b), "chat1")
        ping = await new.request({"msgid": m.PING_MSG})
        self.assertEqual(ping["msgid"], m.PONG_MSG)
