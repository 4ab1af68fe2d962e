"""
Two chat servers in this process, built by chatproto.tap as `twistd chat`
builds them, sharing one MariaDB database and one Redis (with a random key
prefix), with real TCP clients: users on different servers behave as if on
one server.
"""

from __future__ import annotations

import json

from twisted.internet import reactor
from twisted.trial import unittest

from chatproto import messages as m
from chatproto.acks import midFor
from chatproto.tap import Options, makeService
from tests.chat_helpers import TCPClientsMixin, listeningPorts
from tests.cluster_helpers import (
    REDIS_URL,
    clusterChatArgs,
    freePort,
    mysqlURL,
    until,
    useFreshCluster,
)


class ClusterTestCase(TCPClientsMixin, unittest.TestCase):
    """C{servers} chat servers (chat1, chat2, ...) on tcp:0."""

    servers = 2
    extraArgs: list = []

    async def setUp(self):
        useFreshCluster(self)
        self.tops, self.ports, self.services = [], [], []
        for i in range(1, self.servers + 1):
            await self.startServer(f"chat{i}")

    def options(self, name):
        # A fixed free port rather than tcp:0, so the registry advertises
        # the real one.
        options = Options()
        options.parseOptions(
            clusterChatArgs(freePort(), name, mysqlURL(self.database), REDIS_URL, self.prefix) + self.extraArgs
        )
        return options

    async def startServer(self, name):
        top = makeService(self.options(name), reactor)
        top.startService()
        self.addCleanup(top.stopService)
        [port] = await listeningPorts(top)
        chat = next(s for s in top if hasattr(s, "whenReady"))
        await chat.whenReady()
        self.tops.append(top)
        self.ports.append(port.getHost().port)
        self.services.append(chat)
        return top

    def connect(self, server: int):
        return self.connectTo(self.ports[server])

    def register(self, name, server=0):
        return self.registerAt(self.ports[server], name)

    def login(self, uid, name, server):
        return self.loginAt(self.ports[server], uid, name)

    def location(self, uid):
        value = self.redis("GET", f"{self.prefix}user:{uid}")
        return value.split("\t")[0] if value else None


class CrossServerChatTests(ClusterTestCase):
    async def test_oneToOne(self):
        """alice on chat1 and bob on chat2 chat both ways; the sender is
        told the message was delivered."""
        a, b = await self.register("alice"), await self.register("bob", 1)
        alice, _ = await self.login(a, "alice", 0)
        bob, _ = await self.login(b, "bob", 1)
        self.assertEqual((self.location(a), self.location(b)), ("chat1", "chat2"))
        ack = await alice.request({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": "007"})
        self.assertEqual((ack["msgid"], ack["state"]), (m.ONE_CHAT_MSG_ACK, "delivered"))
        got = await bob.nextOf(m.ONE_CHAT_MSG)
        self.assertEqual((got["id"], got["name"], got["toid"], got["msg"]), (a, "alice", b, "007"))
        for i in range(30):
            bob.send({"msgid": m.ONE_CHAT_MSG, "toid": a, "msg": f"m{i}"})
        received = [(await alice.nextOf(m.ONE_CHAT_MSG))["msg"] for _ in range(30)]
        self.assertEqual(received, [f"m{i}" for i in range(30)])

    async def test_pipelinedChatsInOrder(self):
        """bob sends 30 chats and a ping back to back (chatproto.pipeline):
        alice gets the chats in order, bob gets 30 acks in order, then the
        pong."""
        a, b = await self.register("alice"), await self.register("bob", 1)
        alice, _ = await self.login(a, "alice", 0)
        bob, _ = await self.login(b, "bob", 1)
        for i in range(30):
            bob.send({"msgid": m.ONE_CHAT_MSG, "toid": a, "msg": f"m{i}", "cid": i})
        bob.send({"msgid": m.PING_MSG})
        replies = [await bob.next() for _ in range(31)]
        self.assertEqual([r["msgid"] for r in replies], [m.ONE_CHAT_MSG_ACK] * 30 + [m.PONG_MSG])
        self.assertEqual({(r["toid"], r["state"]) for r in replies[:30]}, {(a, "delivered")})
        received = [await alice.nextOf(m.ONE_CHAT_MSG) for _ in range(30)]
        self.assertEqual([r["msg"] for r in received], [f"m{i}" for i in range(30)])
        self.assertEqual([r["mid"] for r in received], [midFor(b, i) for i in range(30)])

    async def test_offlineAcrossServers(self):
        """Messages to a user who is offline are stored and handed over at
        login on the other server, in order."""
        a, b = await self.register("alice"), await self.register("bob")
        alice, _ = await self.login(a, "alice", 0)
        for i in range(10):
            alice.send({"msgid": m.ONE_CHAT_MSG, "toid": b, "msg": f"m{i}"})
        for _ in range(10):
            self.assertEqual((await alice.nextOf(m.ONE_CHAT_MSG_ACK))["state"], "stored")
        bob, login = await self.login(b, "bob", 1)
        self.assertEqual([json.loads(x)["msg"] for x in login["offlinemsg"]], [f"m{i}" for i in range(10)])
        # Taken: not handed over twice.
        bob.transport.loseConnection()
        await bob.closed
        _, again = await self.login(b, "bob", 0)
        self.assertEqual(again["offlinemsg"], [])

    async def test_groupAcrossServers(self):
        """A group with members on both servers and one offline: everyone
        online gets it, the offline member at login."""
        names = ["alice", "bob", "carol", "dave"]
        uids = [await self.register(n) for n in names]
        alice, _ = await self.login(uids[0], "alice", 0)
        gid = (await alice.request({"msgid": m.CREATE_GROUP_MSG, "groupname": "g", "groupdesc": "d"}))["groupid"]
        bob, _ = await self.login(uids[1], "bob", 1)
        carol, _ = await self.login(uids[2], "carol", 0)
        dave, _ = await self.login(uids[3], "dave", 1)
        for client in (bob, carol, dave):
            self.assertEqual((await client.request({"msgid": m.ADD_GROUP_MSG, "groupid": gid}))["errno"], 0)
        dave.transport.loseConnection()
        await dave.closed
        await until(lambda: self.location(uids[3]) is None, 5, what="dave offline")
        ack = await alice.request({"msgid": m.GROUP_CHAT_MSG, "groupid": gid, "msg": "hello all"})
        self.assertEqual((ack["delivered"], ack["stored"]), (2, 1))
        for client in (bob, carol):
            got = await client.nextOf(m.GROUP_CHAT_MSG)
            self.assertEqual((got["groupid"], got["id"], got["msg"]), (gid, uids[0], "hello all"))
        _, login = await self.login(uids[3], "dave", 0)
        self.assertEqual([json.loads(x)["msg"] for x in login["offlinemsg"]], ["hello all"])
        # The group list shows states across servers.
        groups = await bob.request({"msgid": m.GROUP_LIST_MSG})
        while groups["msgid"] != m.GROUP_LIST_MSG_ACK:
            groups = await bob.next()
        states = {u["name"]: u["state"] for u in groups["groups"][0]["users"]}
        self.assertEqual(states, {"alice": "online", "bob": "online", "carol": "online", "dave": "online"})

    async def test_friendNoticesAcrossServers(self):
        """Friend requests and online/offline notices cross servers."""
        a, b = await self.register("alice"), await self.register("bob")
        alice, _ = await self.login(a, "alice", 0)
        bob, _ = await self.login(b, "bob", 1)
        ack = await alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": b})
        self.assertEqual((ack["friend"]["state"], ack["new"]), ("online", True))
        added = await bob.nextOf(m.FRIEND_ADDED_NOTICE)
        self.assertEqual((added["id"], added["name"]), (a, "alice"))
        bob.transport.loseConnection()
        await bob.closed
        notice = await alice.nextOf(m.FRIEND_STATE_NOTICE)
        self.assertEqual((notice["id"], notice["state"]), (b, "offline"))
        bob, login = await self.login(b, "bob", 1)
        notice = await alice.nextOf(m.FRIEND_STATE_NOTICE)
        self.assertEqual((notice["id"], notice["state"]), (b, "online"))
        self.assertEqual([json.loads(f)["state"] for f in login["friends"]], ["online"])

    async def test_registry(self):
        """Both servers are in the registry with their addresses and exact
        login counts."""
        a = await self.register("alice")
        await self.login(a, "alice", 1)
        infos = {s.name: s for s in await self.services[0].presence.servers()}
        self.assertEqual(sorted(infos), ["chat1", "chat2"])
        self.assertEqual([infos["chat1"].port, infos["chat2"].port], self.ports)

        async def logins():
            infos = {s.name: s for s in await self.services[0].presence.servers()}
            return [infos["chat1"].logins, infos["chat2"].logins] == [0, 1]

        # Exact at once, but a refresh racing with the login may set it
        # from the session count a moment early; the next one corrects it.
        await until(logins, 5, what="logins [0, 1]")


class KickAcrossServersTests(ClusterTestCase):
    extraArgs = ["--on-relogin", "kick"]

    async def test_reloginElsewhereKicks(self):
        """Logging in on chat2 closes the session on chat1 with a kick
        notice; messages then go to chat2."""
        a, b = await self.register("alice"), await self.register("bob")
        old, _ = await self.login(a, "alice", 0)
        new, _ = await self.login(a, "alice", 1)
        notice = await old.nextOf(m.KICK_NOTICE)
        self.assertEqual(notice["msgid"], m.KICK_NOTICE)
        await old.closed
        self.assertEqual(self.location(a), "chat2")
        bob, _ = await self.login(b, "bob", 0)
        ack = await bob.request({"msgid": m.ONE_CHAT_MSG, "toid": a, "msg": "where are you"})
        self.assertEqual(ack["state"], "delivered")
        self.assertEqual((await new.nextOf(m.ONE_CHAT_MSG))["msg"], "where are you")
        await until(lambda: self.redis("HGET", f"{self.prefix}server:chat1", "logins") == "1", 5)
        await until(lambda: self.redis("HGET", f"{self.prefix}server:chat2", "logins") == "1", 5)


class RejectAcrossServersTests(ClusterTestCase):
    extraArgs = ["--on-relogin", "reject"]

    async def test_concurrentDoubleLogin(self):
        """The same account logging in on both servers at once: exactly one
        wins, the other is told the account is online elsewhere."""
        uids = [await self.register(f"user{i}") for i in range(5)]
        for uid in uids:
            clients = [await self.connect(0), await self.connect(1)]
            for client in clients:
                client.send({"msgid": m.LOGIN_MSG, "id": uid, "password": f"pw-user{uid - uids[0]}"})
            replies = [await client.next() for client in clients]
            errnos = sorted(r["errno"] for r in replies)
            self.assertEqual(errnos, [m.OK, m.E_ONLINE], replies)
            winner = 0 if replies[0]["errno"] == m.OK else 1
            self.assertEqual(self.location(uid), f"chat{winner + 1}")

    async def test_rejectedWhileOnlineElsewhere(self):
        a = await self.register("alice")
        await self.login(a, "alice", 0)
        client = await self.connect(1)
        reply = await client.request({"msgid": m.LOGIN_MSG, "id": a, "password": "pw-alice"})
        self.assertEqual(reply["errno"], m.E_ONLINE)


class ServerStopTests(ClusterTestCase):
    async def test_cleanStopKeepsOtherServersUsers(self):
        """Stopping chat1 cleanly logs out its users only, deregisters it,
        and chat2's users stay online and reachable."""
        a, b, c = await self.register("alice"), await self.register("bob"), await self.register("carol")
        alice, _ = await self.login(a, "alice", 0)
        bob, _ = await self.login(b, "bob", 1)
        carol, _ = await self.login(c, "carol", 1)
        await self.tops[0].stopService()
        await alice.closed
        self.assertEqual(self.redis("EXISTS", f"{self.prefix}server:chat1"), 0)
        self.assertEqual(self.redis("SMEMBERS", f"{self.prefix}servers"), ["chat2"])
        self.assertEqual((self.location(a), self.location(b), self.location(c)), (None, "chat2", "chat2"))
        ack = await bob.request({"msgid": m.ONE_CHAT_MSG, "toid": c, "msg": "still here"})
        self.assertEqual(ack["state"], "delivered")
        ack = await bob.request({"msgid": m.ONE_CHAT_MSG, "toid": a, "msg": "gone"})
        self.assertEqual(ack["state"], "stored")


class ExampleConfigTests(unittest.TestCase):
    def test_clusterConfigsParse(self):
        """etc/cluster-chat*.ini describe two servers of one cluster: same
        database, Redis and prefix; different names and ports."""
        import os

        from tests.cluster_helpers import REPO

        parsed = []
        for name in ("cluster-chat1.ini", "cluster-chat2.ini"):
            options = Options()
            options.parseOptions(["--config", os.path.join(REPO, "etc", name)])
            parsed.append(options)
        one, two = parsed
        for key in ("db-url", "redis-url", "redis-prefix", "on-relogin"):
            self.assertEqual(one[key], two[key])
        self.assertEqual(one["db-url"].kind, "mysql")
        self.assertIsNotNone(one["redis-url"])
        self.assertNotEqual(one["name"], two["name"])
        self.assertNotEqual(one["port"], two["port"])
        self.assertNotEqual(one["advertise-port"], two["advertise-port"])
