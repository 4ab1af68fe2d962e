"""
Tokens in a cluster: two chat servers built by chatproto.tap (as in
tests/test_cluster_e2e.py) on one MariaDB and one Redis: a token issued by
one server is accepted by the other, and revocations are seen by both.
"""

from __future__ import annotations

from chatproto import messages as m
from chatproto.tokens import tokenHash
from tests.test_cluster_e2e import ClusterTestCase


class ClusterTokenTests(ClusterTestCase):
    async def resumeAt(self, server: int, uid: int, token: str) -> dict:
        client = await self.connect(server)
        return await client.request({"msgid": m.LOGIN_MSG, "id": uid, "token": token})

    async def test_resumeOnOtherServer(self):
        """A token from chat1 logs in on chat2, where the rotated one is
        issued; the store in Redis holds only the hash."""
        a = await self.register("alice")
        alice, login = await self.login(a, "alice", 0)
        alice.transport.loseConnection()
        await alice.closed
        again = await self.resumeAt(1, a, login["token"])
        self.assertEqual((again["errno"], again["name"]), (0, "alice"))
        self.assertEqual(self.location(a), "chat2")
        fields = self.redis("HKEYS", f"{self.prefix}tokens:{a}")
        self.assertNotIn(login["token"], fields)
        self.assertNotIn(again["token"], fields)
        self.assertIn(tokenHash(again["token"]), fields)

    async def test_logoutOnOneServerRevokesForAll(self):
        a = await self.register("alice")
        alice, login = await self.login(a, "alice", 1)
        self.assertEqual((await alice.request({"msgid": m.LOGINOUT_MSG}))["errno"], 0)
        self.assertEqual((await self.resumeAt(0, a, login["token"]))["errno"], m.E_INVALID)

    async def test_passwordChangeRevokesEverywhere(self):
        a = await self.register("alice")
        first, login1 = await self.login(a, "alice", 0)
        first.transport.loseConnection()
        await first.closed
        second, _ = await self.login(a, "alice", 1)
        ack = await second.request({"msgid": m.PASSWD_MSG, "old": "pw-alice", "new": "pw-2"})
        self.assertEqual((ack["msgid"], ack["errno"]), (m.PASSWD_MSG_ACK, 0))
        self.assertEqual((await self.resumeAt(0, a, login1["token"]))["errno"], m.E_INVALID)
        second.transport.loseConnection()
        await second.closed
        self.assertEqual((await self.resumeAt(0, a, ack["token"]))["errno"], 0)
