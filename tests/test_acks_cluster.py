"""
End-to-end acknowledgements across two chat servers (real Redis and
MariaDB, real TCP clients): the sender's "delivered" waits for the acking
recipient's PUSH_ACK on the other server, the same cid gives the same mid
on both servers, what an acking session did not ack is handed over at its
next login on the other server and deleted only once acked, and a
recipient server that does not confirm (or is gone) makes the sender store
the message.
"""

from __future__ import annotations

import json

from chatproto import messages as m
from chatproto.acks import midFor
from tests.cluster_helpers import until
from tests.test_cluster_e2e import ClusterTestCase


class AckedAcrossServersTests(ClusterTestCase):
    async def loginAcking(self, uid, name, server):
        client = await self.connect(server)
        reply = await client.request({"msgid": 1, "id": uid, "password": "pw-" + name, "ack": True})
        self.assertEqual(reply["errno"], 0, reply)
        return client, reply

    async def test_deliveredWhenAckedOnTheOtherServer(self):
        a, b = await self.register("alice"), await self.register("bob", 1)
        alice, _ = await self.login(a, "alice", 0)
        bob, _ = await self.loginAcking(b, "bob", 1)
        alice.send({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "hi", "cid": "c1"})
        push = await bob.nextOf(m.ONE_CHAT_MSG)
        self.assertEqual(push["mid"], midFor(a, "c1"))
        # chat1 still waits: bob has not acked.
        self.assertIn((b, push["mid"]), self.services[0].confirmations.pending)
        bob.send({"msgid": m.PUSH_ACK, "mids": [push["mid"]]})
        ack = await alice.nextOf(m.ONE_CHAT_MSG_ACK)
        self.assertEqual(ack["state"], "delivered")
        self.assertEqual(await self.services[0].store.peekOffline(b), [])

    async def test_sameCidSameMidOnBothServers(self):
        """alice resends with the same cid after moving to the other
        server: bob (offline) gets one message."""
        a, b = await self.register("alice"), await self.register("bob")
        alice, _ = await self.login(a, "alice", 0)
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "once", "cid": 42})
        self.assertEqual(ack["state"], "stored")
        alice.transport.loseConnection()
        await alice.closed
        alice, _ = await self.login(a, "alice", 1)
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "once", "cid": 42})
        self.assertEqual(ack["state"], "stored")
        _, login = await self.login(b, "bob", 0)
        self.assertEqual([json.loads(p)["mid"] for p in login["offlinemsg"]], [midFor(a, 42)])

    async def test_unackedHandedOverOnTheOtherServer(self):
        a, b = await self.register("alice"), await self.register("bob", 1)
        alice, _ = await self.login(a, "alice", 0)
        bob, _ = await self.loginAcking(b, "bob", 1)
        alice.send({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "hi"})
        push = await bob.nextOf(m.ONE_CHAT_MSG)
        bob.transport.loseConnection()
        await bob.closed
        # chat2 stored it and told chat1.
        self.assertEqual((await alice.nextOf(m.ONE_CHAT_MSG_ACK))["state"], "stored")
        bob, login = await self.loginAcking(b, "bob", 0)
        self.assertEqual([json.loads(p)["mid"] for p in login["offlinemsg"]], [push["mid"]])
        # Handed over, not yet acked: still stored.
        self.assertEqual(len(await self.services[0].store.peekOffline(b)), 1)
        bob.send({"msgid": m.PUSH_ACK, "mids": [push["mid"]]})
        self.assertEqual((await bob.request({"msgid": m.PING_MSG}))["msgid"], m.PONG_MSG)
        await until(lambda: self.services[0].store.peekOffline(b).addCallback(lambda rows: rows == []), 5)

    async def test_noConfirmationStores(self):
        """chat2 takes the message but never confirms (as if killed right
        after): chat1 stores it when its wait ends and acks "stored"."""
        a, b = await self.register("alice"), await self.register("bob", 1)
        alice, _ = await self.login(a, "alice", 0)
        bob, _ = await self.login(b, "bob", 1)
        self.services[0].confirmations.timeout = 0.5
        self.services[1].confirmations.notify = lambda *args: None
        # chat1 also nudges chat2 to hand the stored copy to bob at once;
        # ignored here, so that the copy stays to be seen (it raced the peek).
        self.services[1].delivery.redelivery.handOver = lambda session, uid: None
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "hi", "cid": "t"})
        self.assertEqual(ack["state"], "stored")
        self.assertEqual((await bob.nextOf(m.ONE_CHAT_MSG))["mid"], midFor(a, "t"))
        stored = await self.services[0].store.peekOffline(b)
        self.assertEqual([json.loads(p)["mid"] for p in stored], [midFor(a, "t")])

    async def test_recipientServerGoneStores(self):
        """bob's server is no longer in the registry: stored at once."""
        a, b = await self.register("alice"), await self.register("bob", 1)
        alice, _ = await self.login(a, "alice", 0)
        await self.login(b, "bob", 1)
        self.redis("HDEL", f"{self.prefix}live", "chat2")
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "hi"})
        self.assertEqual(ack["state"], "stored")
        self.assertEqual(len(await self.services[0].store.peekOffline(b)), 1)

    async def test_kickedSessionsUnackedReachTheNewLogin(self):
        """bob (acking) on chat2 has a chat he did not ack; he logs in on
        chat1, which kicks the chat2 session: chat2 stores the chat, and
        bob's new session gets it (in its login reply, or pushed right
        after through the nudge), not only at a later login."""
        a, b = await self.register("alice"), await self.register("bob", 1)
        alice, _ = await self.login(a, "alice", 0)
        bob, _ = await self.loginAcking(b, "bob", 1)
        alice.send({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "hi", "cid": "k"})
        push = await bob.nextOf(m.ONE_CHAT_MSG)
        bob2, login = await self.loginAcking(b, "bob", 0)
        mids = [json.loads(p)["mid"] for p in login["offlinemsg"]]
        if not mids:
            mids = [(await bob2.nextOf(m.ONE_CHAT_MSG))["mid"]]
        self.assertEqual(mids, [push["mid"]])
        self.assertEqual((await alice.nextOf(m.ONE_CHAT_MSG_ACK))["state"], "stored")
        bob2.send({"msgid": m.PUSH_ACK, "mids": mids})
        await until(lambda: self.services[0].store.peekOffline(b).addCallback(lambda rows: rows == []), 5)
