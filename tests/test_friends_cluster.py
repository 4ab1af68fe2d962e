"""
Friend requests (--friend-requests approve) across two chat servers on one
Redis and one MariaDB: the requester on chat1, the target on chat2.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from chatproto import messages as m
from chatproto.friendrequests import REQUEST_TTL
from tests.cluster_helpers import until
from tests.test_cluster_e2e import ClusterTestCase


def requestLine(uid: int, name: str) -> str:
    return f"friend request from [{uid}]{name} (accept with: accept:{uid}, refuse with: refuse:{uid})"


class FriendRequestsAcrossServersTests(ClusterTestCase):
    extraArgs = ["--friend-requests", "approve"]

    async def setUp(self):
        await super().setUp()
        self.a = await self.register("alice")
        self.b = await self.register("bob", 1)

    async def offline(self, client, uid):
        client.transport.loseConnection()
        await client.closed
        await until(lambda: self.location(uid) is None, 5, what=f"{uid} offline")

    async def quiet(self, client):
        """Nothing was pushed to C{client}: a PING's answer comes next."""
        self.assertEqual(await client.request({"msgid": m.PING_MSG}), {"msgid": m.PONG_MSG})

    async def test_liveRequestAndAccept(self):
        alice, _ = await self.login(self.a, "alice", 0)
        bob, _ = await self.login(self.b, "bob", 1)
        ack = await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b})
        self.assertEqual((ack["state"], ack["friend"]), ("requested", {"id": self.b, "name": "bob"}))
        notice = await bob.nextOf(m.FRIEND_REQUEST_NOTICE)
        self.assertEqual((notice["id"], notice["name"]), (self.a, "alice"))
        reply = await bob.request({"msgid": m.FRIEND_REPLY_MSG, "id": self.a, "accept": True})
        self.assertEqual((reply["msgid"], reply["accept"], reply["friend"]["state"]), (m.FRIEND_REPLY_MSG_ACK, True, "online"))
        added = await alice.nextOf(m.FRIEND_ADDED_NOTICE)
        self.assertEqual((added["id"], added["name"]), (self.b, "bob"))
        # Friends now: bob's state reaches alice across servers.
        await self.offline(bob, self.b)
        state = await alice.nextOf(m.FRIEND_STATE_NOTICE)
        self.assertEqual((state["id"], state["state"]), (self.b, "offline"))

    async def test_targetOfflineThenRequesterOffline(self):
        """bob is offline when asked (he finds the request at login on
        chat2); alice is offline when he accepts (she finds 25 at login on
        chat2, the other server)."""
        alice, _ = await self.login(self.a, "alice", 0)
        ack = await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b})
        self.assertEqual(ack["state"], "requested")
        await self.offline(alice, self.a)
        bob, login = await self.login(self.b, "bob", 1)
        self.assertEqual([(r["id"], r["name"]) for r in login["requests"]], [(self.a, "alice")])
        reply = await bob.request({"msgid": m.FRIEND_REPLY_MSG, "id": self.a, "accept": True})
        self.assertEqual(reply["friend"]["state"], "offline")
        _, login = await self.login(self.a, "alice", 1)
        self.assertEqual(
            [json.loads(p) for p in login["offlinemsg"]], [{"msgid": m.FRIEND_ADDED_NOTICE, "id": self.b, "name": "bob"}]
        )
        self.assertEqual([json.loads(f)["state"] for f in login["friends"]], ["online"])
        self.assertEqual(login["requests"], [])

    async def test_refuseAcrossServers(self):
        alice, _ = await self.login(self.a, "alice", 0)
        bob, _ = await self.login(self.b, "bob", 1)
        await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b})
        await bob.nextOf(m.FRIEND_REQUEST_NOTICE)
        reply = await bob.request({"msgid": m.FRIEND_REPLY_MSG, "id": self.a, "accept": False})
        self.assertEqual(reply, {"msgid": m.FRIEND_REPLY_MSG_ACK, "errno": 0, "id": self.a, "accept": False})
        again = await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b})
        self.assertEqual((again["state"], again["friend"]), ("requested", {"id": self.b, "name": "bob"}))
        await self.quiet(bob)
        await self.offline(bob, self.b)
        # No state of bob ever reaches alice.
        await self.quiet(alice)
        friends = await alice.request({"msgid": m.FRIEND_LIST_MSG})
        self.assertEqual(friends["friends"], [])

    async def test_duplicateAndCrossed(self):
        alice, _ = await self.login(self.a, "alice", 0)
        bob, _ = await self.login(self.b, "bob", 1)
        first = await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b})
        second = await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b})
        self.assertEqual(first, second)
        await bob.nextOf(m.FRIEND_REQUEST_NOTICE)
        await self.quiet(bob)  # one notice, not two
        crossed = await bob.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.a})
        self.assertEqual((crossed["state"], crossed["friend"]["state"]), ("accepted", "online"))
        added = await alice.nextOf(m.FRIEND_ADDED_NOTICE)
        self.assertEqual(added["id"], self.b)

    async def test_crossedAtTheSameMoment(self):
        """Both ask at once, on different servers: they end as friends
        (the pair is locked in the database), never as two requests."""
        alice, _ = await self.login(self.a, "alice", 0)
        bob, _ = await self.login(self.b, "bob", 1)
        alice.send({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b})
        bob.send({"msgid": m.ADD_FRIEND_MSG, "friendid": self.a})
        states = sorted([(await alice.nextOf(m.ADD_FRIEND_MSG_ACK))["state"], (await bob.nextOf(m.ADD_FRIEND_MSG_ACK))["state"]])
        self.assertEqual(states, ["accepted", "requested"])
        friends = await alice.request({"msgid": m.FRIEND_LIST_MSG})
        while friends["msgid"] != m.FRIEND_LIST_MSG_ACK:
            friends = await alice.next()
        self.assertEqual([f["id"] for f in friends["friends"]], [self.b])

    async def test_expiryWithClock(self):
        clock = Clock()
        clock.advance(1_000_000)
        for chat in self.services:
            chat.friendRequests.clock = clock
        alice, _ = await self.login(self.a, "alice", 0)
        await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b})
        clock.advance(REQUEST_TTL + 1)
        bob, login = await self.login(self.b, "bob", 1)
        self.assertEqual(login["requests"], [])
        reply = await bob.request({"msgid": m.FRIEND_REPLY_MSG, "id": self.a, "accept": True})
        self.assertEqual(reply["errno"], m.E_NO_SUCH_REQUEST)
        # Asking again is a new request, told to bob on the other server.
        self.assertEqual((await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b}))["state"], "requested")
        self.assertEqual((await bob.nextOf(m.FRIEND_REQUEST_NOTICE))["id"], self.a)

    async def test_capAcrossServers(self):
        """The cap is per requester in the shared database, whichever
        server the requests go through."""
        for chat in self.services:
            chat.friendRequests.maxPending = 2
        c = await self.register("carol", 1)
        d = await self.register("dave", 0)
        alice, _ = await self.login(self.a, "alice", 0)
        self.assertEqual((await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b}))["state"], "requested")
        self.assertEqual((await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": c}))["state"], "requested")
        await self.offline(alice, self.a)
        alice, _ = await self.login(self.a, "alice", 1)
        reply = await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": d})
        self.assertEqual(reply["errno"], m.E_TOO_MANY_REQUESTS)
        _, login = await self.login(d, "dave", 0)
        self.assertEqual(login["requests"], [])

    async def test_chatAckHidesStrangersState(self):
        """A stranger's chat ack says "sent" whether bob (on the other
        server) is online or not; once friends, "delivered"."""
        alice, _ = await self.login(self.a, "alice", 0)
        self.assertEqual((await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": self.b, "msg": "1"}))["state"], "sent")
        bob, _ = await self.login(self.b, "bob", 1)
        self.assertEqual((await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": self.b, "msg": "2"}))["state"], "sent")
        self.assertEqual((await bob.nextOf(m.ONE_CHAT_MSG))["msg"], "2")
        await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b})
        await bob.nextOf(m.FRIEND_REQUEST_NOTICE)
        await bob.request({"msgid": m.FRIEND_REPLY_MSG, "id": self.a, "accept": True})
        await alice.nextOf(m.FRIEND_ADDED_NOTICE)
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": self.b, "msg": "3"})
        self.assertEqual(ack["state"], "delivered")

    async def test_textDialect(self):
        alice = await self.connect(0)
        alice.send(f"login:{self.a}:pw-alice")
        self.assertRegex(await alice.nextLine(), rf"^login ok: you are \[{self.a}\]alice \(resume with resume:{self.a}:[A-Za-z0-9_-]{{43}}\)$")
        alice.send(f"addfriend:{self.b}")
        self.assertEqual(await alice.nextLine(), f"request sent to [{self.b}]")
        bob = await self.connect(1)
        bob.send(f"login:{self.b}:pw-bob")
        self.assertRegex(await bob.nextLine(), rf"^login ok: you are \[{self.b}\]bob \(resume with resume:{self.b}:[A-Za-z0-9_-]{{43}}\)$")
        self.assertEqual(await bob.nextLine(), requestLine(self.a, "alice"))
        bob.send("requests")
        self.assertEqual([await bob.nextLine(), await bob.nextLine()], ["no friends yet", requestLine(self.a, "alice")])
        bob.send(f"accept:{self.a}")
        self.assertEqual(await bob.nextLine(), f"friend added: [{self.a}]alice online")
        self.assertEqual(await alice.nextLine(), f"[{self.b}]bob added you as a friend")
        # A live request from bob's side to a third user on chat1, refused.
        c = await self.register("carol", 0)
        carol = await self.connect(0)
        carol.send(f"login:{c}:pw-carol")
        self.assertRegex(await carol.nextLine(), rf"^login ok: you are \[{c}\]carol \(resume with resume:{c}:[A-Za-z0-9_-]{{43}}\)$")
        bob.send(f"addfriend:{c}")
        self.assertEqual(await bob.nextLine(), f"request sent to [{c}]")
        self.assertEqual(await carol.nextLine(), requestLine(self.b, "bob"))
        carol.send(f"refuse:{self.b}")
        self.assertEqual(await carol.nextLine(), f"refused [{self.b}]'s friend request")
        bob.send("PING")
        self.assertEqual(await bob.nextLine(), "PONG")
