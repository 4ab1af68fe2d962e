"""
Friend requests (--friend-requests approve) on one node: every step in the
JSON and the text dialect, expiry with a Clock, the cap, and where online
state must not leak.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.trial import unittest

from chatproto import messages as m
from chatproto.friendrequests import (
    APPROVE,
    HIDDEN,
    MAX_LISTED,
    MAX_PENDING,
    REQUEST_TTL,
    FriendRequests,
    timeText,
)
from chatproto.interfaces import NoSuchUser
from tests.chat_helpers import Harness


def approveHarness() -> Harness:
    h = Harness()
    h.service.friendRequests.mode = APPROVE
    return h


class ModeTests(unittest.TestCase):
    def test_unknownModeRefused(self):
        with self.assertRaises(ValueError):
            FriendRequests("sometimes", None, None, None, None, None)

    def test_autoLoginHasEmptyRequestsAndNoReplies(self):
        """Auto mode: adding is immediate, the login reply's "requests" is
        present and empty, FRIEND_REPLY finds no request."""
        h = Harness()
        a, b = h.register("alice"), h.register("bob")
        alice = h.login(a)
        ack = alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": b})
        self.assertEqual((ack["new"], ack["friend"]["state"]), (True, "offline"))
        self.assertNotIn("state", ack)
        bob = h.connect()
        login = bob.request({"msgid": m.LOGIN_MSG, "id": b, "password": "secret"})
        self.assertEqual(login["requests"], [])
        reply = bob.request({"msgid": m.FRIEND_REPLY_MSG, "id": a, "accept": True})
        self.assertEqual(reply["errno"], m.E_NO_SUCH_REQUEST)


class ApproveTests(unittest.TestCase):
    def setUp(self):
        self.h = approveHarness()
        self.a = self.h.register("alice")
        self.b = self.h.register("bob")
        self.alice = self.h.login(self.a)

    def advance(self, seconds):
        """Move the clock (connections time out meanwhile: log alice in
        again)."""
        self.h.clock.advance(seconds)
        self.alice = self.h.login(self.a)

    def request(self, client, toid) -> dict:
        return client.request({"msgid": m.ADD_FRIEND_MSG, "friendid": toid})

    def answer(self, client, requester, accept) -> dict:
        return client.request({"msgid": m.FRIEND_REPLY_MSG, "id": requester, "accept": accept})

    def loginReply(self, uid):
        client = self.h.connect()
        replies = client.request({"msgid": m.LOGIN_MSG, "id": uid, "password": "secret"})
        return client, replies

    def test_requestToOnlineTargetThenAccept(self):
        bob = self.h.login(self.b)
        ack = self.request(self.alice, self.b)
        # No state of bob: he has not accepted.
        self.assertEqual(
            ack,
            {"msgid": m.ADD_FRIEND_MSG_ACK, "errno": 0, "friend": {"id": self.b, "name": "bob"}, "new": False,
             "state": "requested"},
        )  # fmt: skip
        [notice] = bob.replies()
        self.assertEqual(
            (notice["msgid"], notice["id"], notice["name"], sorted(notice)),
            (m.FRIEND_REQUEST_NOTICE, self.a, "alice", ["id", "msgid", "name", "time"]),
        )
        self.assertEqual(self.alice.request({"msgid": m.FRIEND_LIST_MSG})["friends"], [])
        listed = bob.request({"msgid": m.FRIEND_LIST_MSG})
        self.assertEqual((listed["friends"], [r["id"] for r in listed["requests"]]), ([], [self.a]))
        reply = self.answer(bob, self.a, True)
        self.assertEqual(
            reply,
            {"msgid": m.FRIEND_REPLY_MSG_ACK, "errno": 0, "id": self.a, "accept": True,
             "friend": {"id": self.a, "name": "alice", "state": "online"}},
        )  # fmt: skip
        self.assertEqual(self.alice.replies(), [{"msgid": m.FRIEND_ADDED_NOTICE, "id": self.b, "name": "bob"}])
        friends = self.alice.request({"msgid": m.FRIEND_LIST_MSG})
        self.assertEqual(friends["friends"], [{"id": self.b, "name": "bob", "state": "online"}])
        self.assertEqual(bob.request({"msgid": m.FRIEND_LIST_MSG})["requests"], [])
        # Now alice sees bob's state changes.
        bob.disconnect()
        [state] = self.alice.replies()
        self.assertEqual((state["msgid"], state["id"], state["state"]), (m.FRIEND_STATE_NOTICE, self.b, "offline"))
        # And the request is answered: no second answer.
        bob = self.h.login(self.b)
        self.assertEqual(self.answer(bob, self.a, True)["errno"], m.E_NO_SUCH_REQUEST)

    def test_targetOfflineGetsRequestAtLogin(self):
        self.advance(1000)
        self.assertEqual(self.request(self.alice, self.b)["state"], "requested")
        bob, login = self.loginReply(self.b)
        [request] = login["requests"]
        self.assertEqual((request["id"], request["name"]), (self.a, "alice"))
        self.assertEqual(request["time"], timeText(1000))
        # Not stored as an offline message as well.
        self.assertEqual(login["offlinemsg"], [])
        self.assertEqual(self.answer(bob, self.a, True)["accept"], True)

    def test_requesterOfflineGetsAddedAtNextLogin(self):
        self.request(self.alice, self.b)
        self.alice.disconnect()
        bob = self.h.login(self.b)
        self.assertTrue(self.answer(bob, self.a, True)["accept"])
        self.assertEqual(bob.replies(), [])
        _, login = self.loginReply(self.a)
        added = [json.loads(p) for p in login["offlinemsg"]]
        self.assertEqual(added, [{"msgid": m.FRIEND_ADDED_NOTICE, "id": self.b, "name": "bob"}])
        self.assertEqual([json.loads(f)["id"] for f in login["friends"]], [self.b])

    def test_refuseTellsRequesterNothing(self):
        bob = self.h.login(self.b)
        self.request(self.alice, self.b)
        bob.replies()
        self.assertEqual(
            self.answer(bob, self.a, False),
            {"msgid": m.FRIEND_REPLY_MSG_ACK, "errno": 0, "id": self.a, "accept": False},
        )
        # Nothing reaches alice; her side still says "requested", with no
        # state of bob, and asking again does not bother bob.
        self.assertEqual(self.alice.replies(), [])
        again = self.request(self.alice, self.b)
        self.assertEqual((again["state"], again["friend"]), ("requested", {"id": self.b, "name": "bob"}))
        self.assertEqual(bob.replies(), [])
        self.assertEqual(bob.request({"msgid": m.FRIEND_LIST_MSG})["requests"], [])
        self.assertEqual(self.answer(bob, self.a, True)["errno"], m.E_NO_SUCH_REQUEST)
        # bob going offline is not told to alice.
        bob.disconnect()
        self.assertEqual(self.alice.replies(), [])
        self.assertEqual(self.alice.request({"msgid": m.FRIEND_LIST_MSG})["friends"], [])

    def test_duplicateRequestIsANoOp(self):
        bob = self.h.login(self.b)
        first = self.request(self.alice, self.b)
        self.assertEqual(len(bob.replies()), 1)
        second = self.request(self.alice, self.b)
        self.assertEqual(first, second)
        self.assertEqual(bob.replies(), [])
        self.assertEqual(len(bob.request({"msgid": m.FRIEND_LIST_MSG})["requests"]), 1)

    def test_crossedRequestsAcceptBoth(self):
        bob = self.h.login(self.b)
        self.request(self.alice, self.b)
        bob.replies()
        ack = self.request(bob, self.a)
        self.assertEqual(
            (ack["state"], ack["new"], ack["friend"]), ("accepted", True, {"id": self.a, "name": "alice", "state": "online"})
        )
        self.assertEqual(self.alice.replies(), [{"msgid": m.FRIEND_ADDED_NOTICE, "id": self.b, "name": "bob"}])
        self.assertEqual(bob.request({"msgid": m.FRIEND_LIST_MSG})["requests"], [])
        self.assertEqual([f["id"] for f in self.alice.request({"msgid": m.FRIEND_LIST_MSG})["friends"]], [self.b])

    def test_existingFriend(self):
        bob = self.h.login(self.b)
        self.request(self.alice, self.b)
        bob.replies()
        self.answer(bob, self.a, True)
        self.alice.replies()
        ack = self.request(self.alice, self.b)
        self.assertEqual((ack["errno"], ack["state"], ack["new"]), (0, "friends", False))
        self.assertEqual(ack["friend"], {"id": self.b, "name": "bob", "state": "online"})
        self.assertEqual(bob.replies(), [])

    def test_errors(self):
        self.assertEqual(self.request(self.alice, self.a)["errno"], m.E_SELF)
        self.assertEqual(self.request(self.alice, 404)["errno"], m.E_NO_SUCH_USER)
        self.assertEqual(self.answer(self.alice, 404, True)["errno"], m.E_NO_SUCH_REQUEST)
        self.assertEqual(self.answer(self.alice, self.a, True)["errno"], m.E_SELF)
        for bad in ({"id": self.b, "accept": 1}, {"id": self.b}, {"id": "x", "accept": True}):
            reply = self.alice.request(dict(bad, msgid=m.FRIEND_REPLY_MSG))
            self.assertEqual(reply["errno"], m.E_BAD_FIELD, bad)
        # The connection keeps working.
        self.assertEqual(self.alice.request({"msgid": m.PING_MSG}), {"msgid": m.PONG_MSG})
        # Logged out: refused.
        stranger = self.h.connect()
        self.assertEqual(
            stranger.request({"msgid": m.FRIEND_REPLY_MSG, "id": self.a, "accept": True})["errno"], m.E_NOT_LOGGED_IN
        )

    def test_requestsExpire(self):
        self.request(self.alice, self.b)
        self.advance(REQUEST_TTL)
        bob, login = self.loginReply(self.b)
        self.assertEqual(len(login["requests"]), 1)  # exactly the TTL: still valid
        self.h.clock.advance(1)
        self.alice = self.h.login(self.a)
        bob = self.h.login(self.b)
        self.assertEqual(bob.request({"msgid": m.FRIEND_LIST_MSG})["requests"], [])
        self.assertEqual(self.answer(bob, self.a, True)["errno"], m.E_NO_SUCH_REQUEST)
        # alice may ask again, and bob is told again.
        self.assertEqual(self.request(self.alice, self.b)["state"], "requested")
        [notice] = bob.replies()
        self.assertEqual(notice["msgid"], m.FRIEND_REQUEST_NOTICE)

    def test_refusedRequestExpiresToo(self):
        bob = self.h.login(self.b)
        self.request(self.alice, self.b)
        bob.replies()
        self.answer(bob, self.a, False)
        self.advance(REQUEST_TTL + 1)
        bob = self.h.login(self.b)
        self.assertEqual(self.request(self.alice, self.b)["state"], "requested")
        self.assertEqual(bob.replies()[0]["msgid"], m.FRIEND_REQUEST_NOTICE)

    def test_capOnPendingRequests(self):
        """A spammer may have MAX_PENDING requests out; the next one is
        refused with errno E_TOO_MANY_REQUESTS and reaches nobody."""
        targets = [self.h.register(f"u{i}") for i in range(MAX_PENDING + 1)]
        for uid in targets[:MAX_PENDING]:
            self.assertEqual(self.request(self.alice, uid)["state"], "requested")
        victim = self.h.login(targets[-1])
        reply = self.request(self.alice, targets[-1])
        self.assertEqual(reply["errno"], m.E_TOO_MANY_REQUESTS)
        self.assertEqual(victim.replies(), [])
        self.assertEqual(victim.request({"msgid": m.FRIEND_LIST_MSG})["requests"], [])
        # Once they expire, alice may ask again.
        self.advance(REQUEST_TTL + 1)
        self.assertEqual(self.request(self.alice, targets[-1])["state"], "requested")

    def test_requestsListedAreBounded(self):
        """Many users asking one target (each within its own cap) do not
        make its login reply grow past MAX_LISTED requests, oldest first;
        the rest show once those are answered."""
        requesters = [self.h.register(f"u{i}") for i in range(MAX_LISTED + 5)]
        for uid in requesters:
            self.h.clock.advance(1)
            self.successResultOf(self.h.store.requestFriend(uid, self.b, self.h.clock.seconds(), 0.0, 10))
        bob, login = self.loginReply(self.b)
        self.assertEqual([r["id"] for r in login["requests"]], requesters[:MAX_LISTED])
        self.answer(bob, requesters[0], False)
        listed = bob.request({"msgid": m.FRIEND_LIST_MSG})["requests"]
        self.assertEqual([r["id"] for r in listed], requesters[1 : MAX_LISTED + 1])

    def test_requestNoticeNotStoredOffline(self):
        self.request(self.alice, self.b)
        self.assertEqual(self.successResultOf(self.h.store.peekOffline(self.b)), [])


class PrivacyTests(unittest.TestCase):
    """Approve mode: online state only for accepted friends."""

    def setUp(self):
        self.h = approveHarness()
        self.a, self.b, self.c = (self.h.register(n) for n in ("alice", "bob", "carol"))
        self.alice = self.h.login(self.a)
        self.bob = self.h.login(self.b)
        gid = self.alice.request({"msgid": m.CREATE_GROUP_MSG, "groupname": "g", "groupdesc": ""})["groupid"]
        self.bob.request({"msgid": m.ADD_GROUP_MSG, "groupid": gid})

    def groupStates(self, client) -> dict:
        [group] = client.request({"msgid": m.GROUP_LIST_MSG})["groups"]
        return {u["name"]: u["state"] for u in group["users"]}

    def test_groupMembersStateHiddenUntilFriends(self):
        self.assertEqual(self.groupStates(self.alice), {"alice": "online", "bob": HIDDEN})
        self.assertEqual(self.groupStates(self.bob), {"alice": HIDDEN, "bob": "online"})
        login = self.h.connect().request({"msgid": m.LOGIN_MSG, "id": self.b, "password": "secret"})
        users = [json.loads(u) for u in json.loads(login["groups"][0])["users"]]
        self.assertEqual({u["name"]: u["state"] for u in users}, {"alice": HIDDEN, "bob": "online"})
        self.alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b})
        # A pending request shows nothing either.
        self.assertEqual(self.groupStates(self.alice)["bob"], HIDDEN)
        self.bob.replies()

    def test_groupMembersStateShownToFriends(self):
        self.alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b})
        self.bob.replies()
        self.bob.request({"msgid": m.FRIEND_REPLY_MSG, "id": self.a, "accept": True})
        self.assertEqual(self.alice.replies()[0]["msgid"], m.FRIEND_ADDED_NOTICE)
        self.assertEqual(self.groupStates(self.alice), {"alice": "online", "bob": "online"})

    def test_autoModeShowsGroupStates(self):
        self.h.service.friendRequests.mode = "auto"
        self.assertEqual(self.groupStates(self.alice), {"alice": "online", "bob": "online"})

    def test_noStateNoticeWithoutAcceptance(self):
        carol = self.h.login(self.c)
        carol.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.a})
        self.alice.replies()
        self.bob.disconnect()
        carol.request({"msgid": m.LOGINOUT_MSG})
        self.h.login(self.c)
        # alice (asked by carol, not yet answered) gets no state of carol;
        # nobody gets bob's.
        self.assertEqual(self.alice.replies(), [])
        self.assertEqual(carol.replies(), [])


class TextDialectTests(unittest.TestCase):
    def setUp(self):
        self.h = approveHarness()
        self.a, self.b = self.h.register("alice"), self.h.register("bob")
        self.alice = self.h.connect()
        self.alice.send(f"login:{self.a}:secret")
        self.alice.lines()

    def textLogin(self, uid) -> tuple:
        client = self.h.connect()
        client.send(f"login:{uid}:secret")
        return client, client.lines()

    def test_acceptFlow(self):
        bob, _ = self.textLogin(self.b)
        self.alice.send(f"addfriend:{self.b}")
        self.assertEqual(self.alice.lines(), [f"request sent to [{self.b}]"])
        self.assertEqual(
            bob.lines(), [f"friend request from [{self.a}]alice (accept with: accept:{self.a}, refuse with: refuse:{self.a})"]
        )
        bob.send("requests")
        self.assertEqual(
            bob.lines(),
            ["no friends yet",
             f"friend request from [{self.a}]alice (accept with: accept:{self.a}, refuse with: refuse:{self.a})"],
        )  # fmt: skip
        bob.send(f"accept:{self.a}")
        self.assertEqual(bob.lines(), [f"friend added: [{self.a}]alice online"])
        self.assertEqual(self.alice.lines(), [f"[{self.b}]bob added you as a friend"])
        self.alice.send(f"addfriend:{self.b}")
        self.assertEqual(self.alice.lines(), [f"already friends: [{self.b}]bob online"])
        bob.send("requests")
        self.assertEqual(bob.lines(), ["friends:", f"  [{self.a}]alice online"])

    def test_offlineTargetSeesRequestsAtLogin(self):
        self.alice.send(f"addfriend:{self.b}")
        self.alice.lines()
        _, lines = self.textLogin(self.b)
        self.assertEqual(
            lines,
            ["login ok: you are [2]bob",
             f"friend request from [{self.a}]alice (accept with: accept:{self.a}, refuse with: refuse:{self.a})"],
        )  # fmt: skip

    def test_refuseAndErrors(self):
        bob, _ = self.textLogin(self.b)
        self.alice.send(f"addfriend:{self.b}")
        self.alice.lines()
        bob.lines()
        bob.send(f"refuse:{self.a}")
        self.assertEqual(bob.lines(), [f"refused [{self.a}]'s friend request"])
        self.assertEqual(self.alice.lines(), [])
        bob.send(f"accept:{self.a}")
        self.assertEqual(bob.lines(), [f"error {m.E_NO_SUCH_REQUEST}: no pending friend request from {self.a}"])
        bob.send("accept:")
        self.assertEqual(bob.lines(), [f"error {m.E_BAD_FIELD}: usage: accept:ID"])
        bob.send("accept:alice")
        self.assertEqual(bob.lines(), [f"error {m.E_BAD_FIELD}: id must be a number; usage: accept:ID"])
        bob.send("refuse")
        self.assertEqual(bob.lines(), [f"error {m.E_BAD_FIELD}: usage: refuse:ID"])
        bob.send("requests:x")
        self.assertEqual(bob.lines(), [f"error {m.E_BAD_FIELD}: requests takes no arguments"])
        bob.send("PING")
        self.assertEqual(bob.lines(), ["PONG"])

    def test_capInText(self):
        self.h.service.friendRequests.maxPending = 1
        c = self.h.register("carol")
        self.alice.send(f"addfriend:{self.b}")
        self.alice.send(f"addfriend:{c}")
        lines = self.alice.lines()
        self.assertEqual(lines[0], f"request sent to [{self.b}]")
        self.assertTrue(lines[1].startswith(f"error {m.E_TOO_MANY_REQUESTS}: you have 1 friend requests"), lines)

    def test_hostileNameIsEscaped(self):
        """A name that got into the database with a line break or a bidi
        override (an older server, a hand edit) cannot forge a line."""
        evil = self.successResultOf(self.h.store.createUser("eve\nfriend added: [1]x\u202e", "x"))
        bob, _ = self.textLogin(self.b)
        # eve's request, as the service would make it for her session.
        self.successResultOf(self.h.store.requestFriend(evil, self.b, 0.0, -1.0, 10))
        bob.send("requests")
        self.assertEqual(
            bob.lines(),
            ["no friends yet",
             f"friend request from [{evil}]eve\\nfriend added: [1]x\\u202e"
             f" (accept with: accept:{evil}, refuse with: refuse:{evil})"],
        )  # fmt: skip


class StoreErrorTests(unittest.TestCase):
    def test_unknownUserFromStore(self):
        """NoSuchUser from the store is errno E_NO_SUCH_USER (a user deleted
        between checks)."""
        h = approveHarness()
        a = h.register("alice")
        alice = h.login(a)
        h.store.requestFriend = lambda *args: defer.fail(NoSuchUser(5))
        self.assertEqual(alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": 5})["errno"], m.E_NO_SUCH_USER)


class ChatAckPrivacyTests(unittest.TestCase):
    """Approve mode: a chat's ack tells delivered/stored (online or not)
    only for a friend; a stranger is told "sent"."""

    def setUp(self):
        self.h = approveHarness()
        self.a, self.b = self.h.register("alice"), self.h.register("bob")
        self.alice = self.h.login(self.a)

    def chat(self, text="hi") -> dict:
        return self.alice.request({"msgid": m.ONE_CHAT_MSG, "toid": self.b, "msg": text})

    def test_strangerOnlineOrOffline(self):
        self.assertEqual(self.chat()["state"], "sent")  # stored, in fact
        bob = self.h.login(self.b)
        self.assertEqual(self.chat("two"), {"msgid": m.ONE_CHAT_MSG_ACK, "errno": 0, "toid": self.b, "state": "sent"})
        self.assertEqual(bob.reply()["msg"], "two")
        # An unknown user is still an error.
        self.assertEqual(self.alice.request({"msgid": 6, "toid": 404, "msg": "x"})["errno"], m.E_NO_SUCH_USER)

    def test_friendSeesState(self):
        bob = self.h.login(self.b)
        self.assertEqual(self.chat()["state"], "sent")
        bob.replies()
        # bob asks, alice accepts: from now on alice sees bob's state.
        bob.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.a})
        self.alice.replies()
        self.alice.request({"msgid": m.FRIEND_REPLY_MSG, "id": self.b, "accept": True})
        self.assertEqual(self.chat()["state"], "delivered")
        bob.disconnect()
        self.alice.replies()
        self.assertEqual(self.chat()["state"], "stored")

    def test_friendshipAcceptedElsewhereIsSeen(self):
        """The sender's cached friend ids are read again when the recipient
        is not among them (bob accepted meanwhile, on any server)."""
        self.assertEqual(self.chat()["state"], "sent")
        self.alice.request({"msgid": m.ADD_FRIEND_MSG, "friendid": self.b})
        self.successResultOf(self.h.store.answerFriendRequest(self.b, self.a, True, 0.0))
        self.assertEqual(self.chat()["state"], "stored")

    def test_text(self):
        self.alice.send(f"chat:{self.b}:hello")
        self.assertEqual(self.alice.lines(), [f"sent to [{self.b}]"])

    def test_autoModeUnchanged(self):
        self.h.service.friendRequests.mode = "auto"
        self.assertEqual(self.chat()["state"], "stored")
