"""
Every message and every error of both dialects, on StringTransports with a
Clock: a real ChatService and SQLite store, no threads and no sleeps.
"""

import base64
import hashlib
import json

from twisted.internet import defer
from twisted.trial import unittest

from chatproto import messages as m
from tests.chat_helpers import Harness


class FramingTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness()
        self.c = self.h.connect()

    def test_splitRead(self):
        for part in (b'{"msg', b'id":2', b"1}", b"\n"):
            self.c.sendRaw(part)
        self.assertEqual(self.c.replies(), [{"msgid": m.PONG_MSG}])

    def test_mergedRead(self):
        self.c.sendRaw(b'{"msgid":21,"seq":1}\n{"msgid":21,"seq":2}\r\n{"msgid":21,"seq":3}\0PING\n')
        self.assertEqual(
            self.c.lines(),
            ['{"msgid":22,"seq":1}', '{"msgid":22,"seq":2}', '{"msgid":22,"seq":3}', "PONG"],
        )

    def test_nulTerminatedLikeTheTutorialClient(self):
        self.c.sendRaw(b'{"msgid":4,"name":"alice","password":"pw"}\0')
        self.assertEqual(self.c.reply(), {"msgid": 5, "errno": 0, "id": 1, "name": "alice"})

    def test_crlf(self):
        self.c.sendRaw(b"PING\r\n")
        self.assertEqual(self.c.lines(), ["PONG"])

    def test_halfCloseAnswersEverythingFirst(self):
        """
        A client that half-closes after pipelining requests gets every
        reply, the last unterminated line included, and only then is the
        connection closed.
        """
        self.h.hasher.hold = True
        self.c.sendRaw(b'PING\n{"msgid":4,"name":"alice","password":"pw"}\nPING')
        self.c.protocol.readConnectionLost()
        self.assertEqual(self.c.lines(), ["PONG"])
        self.assertFalse(self.c.closed)  # registration is still hashing
        self.h.hasher.release()
        self.assertEqual(
            self.c.lines(), ['{"msgid":5,"errno":0,"id":1,"name":"alice"}', "PONG"]
        )
        self.assertTrue(self.c.closed)

    def test_halfCloseWhenIdleCloses(self):
        self.c.protocol.readConnectionLost()
        self.assertEqual(self.c.lines(), [])
        self.assertTrue(self.c.closed)

    def test_overlongLineIsDiscardedAndConnectionSurvives(self):
        self.c.sendRaw(b'{"msgid":21,"x":"' + b"a" * 2000 + b'"}\n{"msgid":21}\n')
        first, second = self.c.replies()
        self.assertEqual((first["msgid"], first["errno"]), (m.ERROR_MSG, m.E_LINE_TOO_LONG))
        self.assertEqual(second, {"msgid": m.PONG_MSG})
        self.assertFalse(self.c.closed)

    def test_overlongLineAcrossReads(self):
        self.c.sendRaw(b"x" * 1500)
        [error] = self.c.replies()
        self.assertEqual(error["errno"], m.E_LINE_TOO_LONG)
        self.c.sendRaw(b"y" * 1500)
        self.c.sendRaw(b"zzz\nPING\n")
        self.assertEqual(self.c.lines(), ["PONG"])
        self.assertFalse(self.c.closed)

    def test_blankLinesIgnored(self):
        self.c.sendRaw(b"\n\r\n\0PING\n")
        self.assertEqual(self.c.lines(), ["PONG"])


class MalformedInputTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness()
        self.c = self.h.connect()

    def assertError(self, line, errno, reqmsgid=None):
        self.c.send(line)
        reply = self.c.reply()
        self.assertEqual((reply["msgid"], reply["errno"]), (m.ERROR_MSG, errno), reply)
        self.assertIsInstance(reply["errmsg"], str)
        self.assertEqual(reply.get("reqmsgid"), reqmsgid)
        # The connection keeps working.
        self.assertEqual(self.c.request({"msgid": m.PING_MSG}), {"msgid": m.PONG_MSG})
        self.assertFalse(self.c.closed)

    def test_malformedJSON(self):
        self.assertError('{"msgid": 1,', m.E_BAD_JSON)

    def test_invalidUTF8(self):
        self.c.sendRaw(b'{"msgid": 6, "msg": "\xff\xfe"}\n')
        self.assertEqual(self.c.reply()["errno"], m.E_BAD_JSON)

    def test_notAnObject(self):
        self.assertError("{}", m.E_BAD_MESSAGE)
        self.assertError('{"msgid": "1"}', m.E_BAD_MESSAGE)
        self.assertError('{"msgid": true}', m.E_BAD_MESSAGE)

    def test_unknownMsgid(self):
        self.assertError('{"msgid": 777}', m.E_UNKNOWN_MSGID, 777)

    def test_missingField(self):
        self.assertError('{"msgid": 1, "id": 1}', m.E_BAD_FIELD, 1)

    def test_wrongTypes(self):
        self.assertError('{"msgid": 1, "id": "1", "password": "x"}', m.E_BAD_FIELD, 1)
        self.assertError('{"msgid": 1, "id": true, "password": "x"}', m.E_BAD_FIELD, 1)
        self.assertError('{"msgid": 6, "toid": 2, "msg": 5}', m.E_BAD_FIELD, 6)

    def test_seqEchoedInErrors(self):
        self.c.send('{"msgid": 777, "seq": "abc"}')
        self.assertEqual(self.c.reply()["seq"], "abc")

    def test_needsLogin(self):
        for msgid in (3, 6, 7, 8, 9, 10, 17, 19):
            reply = self.c.request({"msgid": msgid, "toid": 1, "msg": "x", "friendid": 1, "groupid": 1, "groupname": "g"})
            self.assertEqual(reply["errno"], m.E_NOT_LOGGED_IN, reply)
            self.assertEqual(reply["msgid"], m.SPECS[msgid].ack)

    def test_unknownTextCommand(self):
        self.c.send("dance:now")
        self.assertEqual(self.c.lines(), ["error 16: unknown command 'dance'; type help"])

    def test_badTextArgument(self):
        self.c.send("login:abc:pw")
        [line] = self.c.lines()
        self.assertTrue(line.startswith("error 13: id must be a number"), line)
        self.c.send("login:1")
        self.assertEqual(self.c.lines(), ["error 13: usage: login:ID:PASSWORD"])

    def test_handlerCrashIsContained(self):
        uid = self.h.register("alice")
        client = self.h.login(uid)

        def broken(session, request):
            raise ZeroDivisionError()

        self.h.service.do_friends = broken
        reply = client.request({"msgid": m.FRIEND_LIST_MSG})
        self.assertEqual(reply["errno"], m.E_INTERNAL)
        self.assertEqual(client.request({"msgid": m.PING_MSG}), {"msgid": m.PONG_MSG})
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class AccountTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness()
        self.c = self.h.connect()

    def test_register(self):
        reply = self.c.request({"msgid": 4, "name": "alice", "password": "pw"})
        self.assertEqual(reply, {"msgid": 5, "errno": 0, "id": 1, "name": "alice"})
        stored = self.successResultOf(self.h.store.getUser(1)).passwordHash
        # The stored form is scrypt$N$r$p$salt$hash: a salted hash of the
        # password, which is not stored itself.
        scheme, n, r, p, salt, digest = stored.split("$")
        self.assertEqual((scheme, n, r, p), ("scrypt", str(self.h.hasher.n), "8", "1"))
        salt, digest = base64.b64decode(salt), base64.b64decode(digest)
        self.assertEqual((len(salt), len(digest)), (16, 32))
        expected = hashlib.scrypt(b"pw", salt=salt, n=int(n), r=8, p=1, dklen=32)
        self.assertEqual(digest, expected)

    def test_registerNameTaken(self):
        self.c.request({"msgid": 4, "name": "alice", "password": "pw"})
        reply = self.c.request({"msgid": 4, "name": "alice", "password": "other"})
        self.assertEqual((reply["msgid"], reply["errno"]), (5, 1))
        self.assertIn("taken", reply["errmsg"])

    def test_registerInvalidName(self):
        for name in ("", "   ", "a:b", "x" * 33, "tab\there"):
            reply = self.c.request({"msgid": 4, "name": name, "password": "pw"})
            self.assertEqual((reply["msgid"], reply["errno"]), (5, 1), name)

    def test_login(self):
        uid = self.h.register("alice")
        reply = self.c.request({"msgid": 1, "id": uid, "password": "secret"})
        self.assertEqual(
            reply,
            {
                "msgid": 2,
                "errno": 0,
                "id": uid,
                "name": "alice",
                "friends": [],
                "groups": [],
                "requests": [],
                "offlinemsg": [],
            },
        )
        self.assertIs(self.h.service.sessions[uid], self.c.protocol)

    def test_loginBadPassword(self):
        uid = self.h.register("alice")
        reply = self.c.request({"msgid": 1, "id": uid, "password": "wrong"})
        self.assertEqual((reply["msgid"], reply["errno"]), (2, m.E_INVALID))
        self.assertEqual(self.h.service.sessions, {})

    def test_loginUnknownId(self):
        reply = self.c.request({"msgid": 1, "id": 99, "password": "x"})
        self.assertEqual((reply["msgid"], reply["errno"]), (2, m.E_INVALID))

    def test_failedLoginsAreSlowedDown(self):
        uid = self.h.register("alice")
        for _ in range(5):
            self.assertEqual(self.c.request({"msgid": 1, "id": uid, "password": "bad"})["errno"], m.E_INVALID)
        reply = self.c.request({"msgid": 1, "id": uid, "password": "secret"})
        self.assertEqual(reply["errno"], m.E_THROTTLED)
        self.assertIn("retry in", reply["errmsg"])
        self.h.clock.advance(2)
        self.assertEqual(self.c.request({"msgid": 1, "id": uid, "password": "secret"})["errno"], 0)

    def test_addressLimitIsLooserThanAccountLimit(self):
        """Many users behind one address (a balancer without PROXY header)
        are not locked out by one user's typos."""
        uids = [self.h.register(f"user{i}") for i in range(12)]
        for uid in uids[:10]:
            for _ in range(4):
                self.c.request({"msgid": 1, "id": uid, "password": "bad"})
        self.assertEqual(self.c.request({"msgid": 1, "id": uids[11], "password": "secret"})["errno"], 0)

    def test_alreadyLoggedIn(self):
        uid = self.h.register("alice")
        self.c.request({"msgid": 1, "id": uid, "password": "secret"})
        reply = self.c.request({"msgid": 1, "id": uid, "password": "secret"})
        self.assertEqual((reply["msgid"], reply["errno"]), (2, m.E_ALREADY_LOGGED_IN))

    def test_logout(self):
        uid = self.h.register("alice")
        self.c.request({"msgid": 1, "id": uid, "password": "secret"})
        self.assertEqual(self.c.request({"msgid": 3, "id": uid}), {"msgid": 11, "errno": 0})
        self.assertEqual(self.h.service.sessions, {})
        self.assertEqual(self.successResultOf(self.h.presence.locate([uid])), {})
        self.assertEqual(self.c.request({"msgid": 6, "toid": uid, "msg": "x"})["errno"], m.E_NOT_LOGGED_IN)
        self.assertFalse(self.c.closed)

    def test_disconnectCleansUp(self):
        uid = self.h.register("alice")
        self.c.request({"msgid": 1, "id": uid, "password": "secret"})
        self.c.disconnect()
        self.assertEqual(self.h.service.sessions, {})
        self.assertEqual(self.h.service.connections, {})
        self.assertEqual(self.successResultOf(self.h.presence.locate([uid])), {})

    def test_pipelinedLoginThenChat(self):
        """Lines sent behind a slow login wait for it, in order."""
        a, b = self.h.register("alice"), self.h.register("bob")
        bob = self.h.login(b)
        self.h.hasher.hold = True
        self.c.sendRaw(
            json.dumps({"msgid": 1, "id": a, "password": "secret"}).encode()
            + b"\n"
            + json.dumps({"msgid": 6, "toid": b, "msg": "first"}).encode()
            + b"\n"
        )
        self.assertEqual(self.c.replies(), [])
        self.h.hasher.release()
        login, ack = self.c.replies()
        self.assertEqual((login["msgid"], login["errno"], ack["msgid"], ack["errno"]), (2, 0, 12, 0))
        [chat] = bob.replies()
        self.assertEqual(chat["msg"], "first")

    def test_idleTimeout(self):
        self.h.clock.advance(299)
        self.c.send("PING")
        self.h.clock.advance(299)
        self.assertFalse(self.c.closed)
        self.c.lines()
        self.h.clock.advance(2)
        self.assertTrue(self.c.closed)
        [notice] = self.c.lines()
        self.assertIn("idle", notice)


class ReloginTests(unittest.TestCase):
    def test_kick(self):
        h = Harness(onRelogin="kick")
        uid = h.register("alice")
        old = h.login(uid)
        new = h.login(uid)
        [notice] = old.replies()
        self.assertEqual(notice, {"msgid": m.KICK_NOTICE, "reason": "logged in elsewhere"})
        self.assertTrue(old.closed)
        old.disconnect()
        # The old session going away leaves the new one logged in.
        self.assertIs(h.service.sessions[uid], new.protocol)
        self.assertEqual(list(self.successResultOf(h.presence.locate([uid]))), [uid])

    def test_reject(self):
        h = Harness(onRelogin="reject")
        uid = h.register("alice")
        old = h.login(uid)
        second = h.connect()
        reply = second.request({"msgid": 1, "id": uid, "password": "secret"})
        self.assertEqual((reply["msgid"], reply["errno"]), (2, m.E_ONLINE))
        self.assertFalse(old.closed)
        self.assertIs(h.service.sessions[uid], old.protocol)
        old.disconnect()
        self.assertEqual(second.request({"msgid": 1, "id": uid, "password": "secret"})["errno"], 0)

    def test_kickOnlyWhereSomebodyListens(self):
        """A login that took the account over from another server sends
        that server a kick, unless presence says nobody listens for it
        (killed: the kick would reach nobody)."""
        from chatproto.interfaces import ClaimResult, Location

        h = Harness(onRelogin="kick")
        uid = h.register("alice")
        kicks = []
        h.service.loginFlow.relay.kick = lambda location, uid, reason: kicks.append((location, uid)) or defer.succeed(True)
        for listening in (True, False):
            claimed = ClaimResult(True, Location("other", f"s-{listening}"), listening=listening)
            h.presence.claim = lambda uid, session, replace: defer.succeed(claimed)
            client = h.login(uid)
            client.disconnect()
        self.assertEqual(kicks, [(Location("other", "s-True"), uid)])

    def test_lastClaimWins(self):
        """
        Two logins in flight at once: the one that claims the account last
        wins and the other is kicked; never two sessions.
        """
        h = Harness(onRelogin="kick")
        uid = h.register("alice")
        slow = h.connect()
        h.hasher.hold = True
        slow.send({"msgid": 1, "id": uid, "password": "secret"})
        h.hasher.hold = False
        fast = h.login(uid)
        h.hasher.release()
        self.assertEqual(slow.reply()["msgid"], m.LOGIN_MSG_ACK)
        self.assertEqual(fast.replies(), [{"msgid": m.KICK_NOTICE, "reason": "logged in elsewhere"}])
        self.assertTrue(fast.closed)
        self.assertIsNone(fast.protocol.uid)
        self.assertEqual(list(h.service.sessions.values()), [slow.protocol])


class ChatTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness()
        self.a = self.h.register("alice")
        self.b = self.h.register("bob")
        self.alice = self.h.login(self.a)

    def test_chatOnline(self):
        bob = self.h.login(self.b)
        bob.replies()
        self.alice.replies()
        # id, name and time from the client are not trusted.
        ack = self.alice.request(
            {"msgid": 6, "id": 999, "name": "mallory", "toid": self.b, "msg": "hi", "time": "1970-01-01", "seq": 7}
        )
        self.assertEqual(ack, {"msgid": 12, "errno": 0, "toid": self.b, "state": "delivered", "seq": 7})
        [msg] = bob.replies()
        self.assertEqual(
            (msg["msgid"], msg["id"], msg["name"], msg["toid"], msg["msg"]), (6, self.a, "alice", self.b, "hi")
        )
        self.assertRegex(msg["time"], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")

    def test_chatOfflineThenLogin(self):
        for text in ("one", "two"):
            ack = self.alice.request({"msgid": 6, "toid": self.b, "msg": text})
            self.assertEqual(ack["state"], "stored")
        bob = self.h.connect()
        login = bob.request({"msgid": 1, "id": self.b, "password": "secret"})
        offline = [json.loads(x) for x in login["offlinemsg"]]
        self.assertEqual([x["msg"] for x in offline], ["one", "two"])
        self.assertEqual({x["name"] for x in offline}, {"alice"})
        bob.request({"msgid": 3})
        again = bob.request({"msgid": 1, "id": self.b, "password": "secret"})
        self.assertEqual(again["offlinemsg"], [])

    def test_chatUnknownUser(self):
        ack = self.alice.request({"msgid": 6, "toid": 404, "msg": "hi"})
        self.assertEqual((ack["msgid"], ack["errno"]), (12, m.E_NO_SUCH_USER))

    def test_chatEmptyMessage(self):
        ack = self.alice.request({"msgid": 6, "toid": self.b, "msg": ""})
        self.assertEqual(ack["errno"], m.E_BAD_FIELD)

    def test_messagesDuringLoginComeAfterTheLoginReply(self):
        """A chat that reaches a session between its registration and its
        login reply is held and written after the reply."""
        paused = defer.Deferred()
        getLoginData = self.h.store.getLoginData
        self.h.store.getLoginData = lambda uid: paused.addCallback(lambda _: getLoginData(uid))
        bob = self.h.connect()
        bob.send({"msgid": 1, "id": self.b, "password": "secret"})
        self.assertEqual(bob.replies(), [])
        ack = self.alice.request({"msgid": 6, "toid": self.b, "msg": "early"})
        self.assertEqual(ack["state"], "delivered")
        self.assertEqual(bob.replies(), [])
        paused.callback(None)
        login, chat = bob.replies()
        self.assertEqual((login["msgid"], chat["msgid"], chat["msg"]), (m.LOGIN_MSG_ACK, m.ONE_CHAT_MSG, "early"))

    def test_heldMessagesStoredIfLoginNeverCompletes(self):
        paused = defer.Deferred()
        self.h.store.getLoginData = lambda uid: paused
        bob = self.h.connect()
        bob.send({"msgid": 1, "id": self.b, "password": "secret"})
        self.alice.request({"msgid": 6, "toid": self.b, "msg": "kept"})
        bob.disconnect()
        stored = [json.loads(p)["msg"] for p in self.successResultOf(self.h.store.peekOffline(self.b))]
        self.assertEqual(stored, ["kept"])


class FriendTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness()
        self.a = self.h.register("alice")
        self.b = self.h.register("bob")
        self.alice = self.h.login(self.a)

    def test_addFriend(self):
        bob = self.h.login(self.b)
        self.alice.replies()
        ack = self.alice.request({"msgid": 7, "id": self.a, "friendid": self.b})
        self.assertEqual(
            ack, {"msgid": 13, "errno": 0, "friend": {"id": self.b, "name": "bob", "state": "online"}, "new": True}
        )
        self.assertEqual(bob.replies(), [{"msgid": m.FRIEND_ADDED_NOTICE, "id": self.a, "name": "alice"}])
        again = self.alice.request({"msgid": 7, "friendid": self.b})
        self.assertFalse(again["new"])
        self.assertEqual(bob.replies(), [])
        # Mutual.
        self.assertEqual(
            bob.request({"msgid": 17}),
            {"msgid": 18, "errno": 0, "friends": [{"id": self.a, "name": "alice", "state": "online"}], "requests": []},
        )

    def test_addFriendErrors(self):
        self.assertEqual(self.alice.request({"msgid": 7, "friendid": self.a})["errno"], m.E_SELF)
        self.assertEqual(self.alice.request({"msgid": 7, "friendid": 404})["errno"], m.E_NO_SUCH_USER)

    def test_friendsInLoginReplyAndStateNotices(self):
        self.alice.request({"msgid": 7, "friendid": self.b})
        bob = self.h.connect()
        login = bob.request({"msgid": 1, "id": self.b, "password": "secret"})
        self.assertEqual([json.loads(f) for f in login["friends"]], [{"id": self.a, "name": "alice", "state": "online"}])
        self.assertEqual(
            self.alice.replies(), [{"msgid": m.FRIEND_STATE_NOTICE, "id": self.b, "name": "bob", "state": "online"}]
        )
        bob.disconnect()
        self.assertEqual(
            self.alice.replies(), [{"msgid": m.FRIEND_STATE_NOTICE, "id": self.b, "name": "bob", "state": "offline"}]
        )


    def countFriendReads(self):
        reads = []
        getFriends = self.h.store.getFriends
        self.h.store.getFriends = lambda uid: (reads.append(uid), getFriends(uid))[1]
        return reads

    def test_logoutUsesTheFriendsReadAtLogin(self):
        """The offline notice at logout goes to the friends the login
        reply listed, without reading them again."""
        self.alice.request({"msgid": 7, "friendid": self.b})
        bob = self.h.login(self.b)
        self.alice.replies()
        reads = self.countFriendReads()
        bob.disconnect()
        self.assertEqual(reads, [])
        self.assertEqual(self.alice.replies()[-1]["state"], "offline")

    def test_logoutReadsFriendsAgainAfterAddFriend(self):
        """A friend added during the session is told of its logout: the
        friends are read again."""
        carol = self.h.register("carol")
        self.h.login(carol).replies()
        reads = self.countFriendReads()
        self.alice.request({"msgid": 7, "friendid": carol})
        self.alice.disconnect()
        self.assertEqual(reads, [self.a])

    def test_logoutReadsFriendsAgainAfterBeingAdded(self):
        """Befriended by another session (FRIEND_ADDED_NOTICE, possibly
        from another server): the friends are read again at logout."""
        bob = self.h.login(self.b)
        reads = self.countFriendReads()
        bob.request({"msgid": 7, "friendid": self.a})
        self.assertEqual(self.alice.replies()[-1]["msgid"], m.FRIEND_ADDED_NOTICE)
        self.alice.disconnect()
        self.assertEqual(reads, [self.a])
        self.assertEqual(bob.replies()[-1], {"msgid": m.FRIEND_STATE_NOTICE, "id": self.a, "name": "alice", "state": "offline"})


class GroupTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness()
        self.a, self.b, self.c = (self.h.register(n) for n in ("alice", "bob", "carol"))
        self.alice = self.h.login(self.a)

    def createGroup(self, name="g1"):
        ack = self.alice.request({"msgid": 8, "groupname": name, "groupdesc": "about " + name})
        self.assertEqual(ack["errno"], 0)
        return ack["groupid"]

    def test_createGroup(self):
        ack = self.alice.request({"msgid": 8, "id": self.a, "groupname": "g1", "groupdesc": "first"})
        self.assertEqual(ack, {"msgid": 14, "errno": 0, "groupid": 1, "groupname": "g1", "groupdesc": "first"})
        dup = self.alice.request({"msgid": 8, "groupname": "g1"})
        self.assertEqual((dup["msgid"], dup["errno"]), (14, m.E_NAME_TAKEN))
        bad = self.alice.request({"msgid": 8, "groupname": "a:b"})
        self.assertEqual(bad["errno"], m.E_INVALID)

    def test_joinGroup(self):
        gid = self.createGroup()
        bob = self.h.login(self.b)
        self.assertEqual(
            bob.request({"msgid": 9, "groupid": gid}),
            {"msgid": 15, "errno": 0, "groupid": gid, "groupname": "g1", "new": True},
        )
        self.assertFalse(bob.request({"msgid": 9, "groupid": gid})["new"])
        self.assertEqual(bob.request({"msgid": 9, "groupid": 404})["errno"], m.E_NO_SUCH_GROUP)

    def test_groupChatFansOut(self):
        gid = self.createGroup()
        bob = self.h.login(self.b)
        bob.request({"msgid": 9, "groupid": gid})
        carol = self.h.login(self.c)
        carol.request({"msgid": 9, "groupid": gid})
        carol.disconnect()
        ack = self.alice.request({"msgid": 10, "groupid": gid, "msg": "hello all"})
        self.assertEqual(ack, {"msgid": 16, "errno": 0, "groupid": gid, "delivered": 1, "stored": 1})
        [msg] = bob.replies()
        self.assertEqual((msg["msgid"], msg["id"], msg["groupid"], msg["msg"]), (10, self.a, gid, "hello all"))
        carol = self.h.connect()
        login = carol.request({"msgid": 1, "id": self.c, "password": "secret"})
        self.assertEqual([json.loads(x)["msg"] for x in login["offlinemsg"]], ["hello all"])
        [group] = [json.loads(g) for g in login["groups"]]
        self.assertEqual((group["id"], group["groupname"], group["groupdesc"]), (gid, "g1", "about g1"))
        users = [json.loads(u) for u in group["users"]]
        self.assertEqual(
            users,
            [
                {"id": self.a, "name": "alice", "state": "online", "role": "creator"},
                {"id": self.b, "name": "bob", "state": "online", "role": "normal"},
                {"id": self.c, "name": "carol", "state": "online", "role": "normal"},
            ],
        )

    def test_groupChatErrors(self):
        gid = self.createGroup()
        bob = self.h.login(self.b)
        self.assertEqual(bob.request({"msgid": 10, "groupid": gid, "msg": "x"})["errno"], m.E_NOT_A_MEMBER)
        self.assertEqual(bob.request({"msgid": 10, "groupid": 404, "msg": "x"})["errno"], m.E_NO_SUCH_GROUP)

    def test_groupList(self):
        gid = self.createGroup()
        reply = self.alice.request({"msgid": 19})
        self.assertEqual(
            reply,
            {
                "msgid": 20,
                "errno": 0,
                "groups": [
                    {
                        "id": gid,
                        "groupname": "g1",
                        "groupdesc": "about g1",
                        "users": [{"id": self.a, "name": "alice", "state": "online", "role": "creator"}],
                    }
                ],
            },
        )


class TextDialectTests(unittest.TestCase):
    def setUp(self):
        self.h = Harness()
        self.c = self.h.connect()

    def test_session(self):
        c = self.c
        c.send("help")
        self.assertEqual(c.lines()[0], "commands:")
        c.send("register:alice:pa:ss")
        self.assertEqual(c.lines(), ["registered: your id is 1; log in with login:1:PASSWORD"])
        self.h.register("bob")
        c.send("login:1:pa:ss")
        self.assertEqual(c.lines(), ["login ok: you are [1]alice"])
        c.send("chat:2:hello: there")
        self.assertEqual(c.lines(), ["stored offline for [2]"])
        c.send("addfriend:2")
        self.assertEqual(c.lines(), ["friend added: [2]bob offline"])
        c.send("friends")
        self.assertEqual(c.lines(), ["friends:", "  [2]bob offline"])
        c.send("creategroup:g1:my: group")
        self.assertEqual(c.lines(), ["group created: [1]g1"])
        c.send("addgroup:1")
        self.assertEqual(c.lines(), ["joined group [1]g1"])
        c.send("groupchat:1:anyone?")
        self.assertEqual(c.lines(), ["sent to group [1]: 0 online, 0 stored offline"])
        c.send("groups")
        self.assertEqual(c.lines(), ["groups:", "  [1]g1: my: group", "    [1]alice online (creator)"])
        c.send("loginout")
        self.assertEqual(c.lines(), ["logged out"])
        c.send("quit")
        self.assertTrue(c.closed)

    def test_incomingInLastUsedDialect(self):
        a, b = self.h.register("alice"), self.h.register("bob")
        bob = self.h.login(b)
        self.c.send(f"login:{a}:secret")
        self.c.lines()
        bob.replies()
        bob.request({"msgid": 6, "toid": a, "msg": "hi alice"})
        [line] = self.c.lines()
        self.assertRegex(line, r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[2\]bob said: hi alice$")
        self.c.send('{"msgid": 21}')
        self.c.lines()
        bob.request({"msgid": 6, "toid": a, "msg": "json now"})
        self.assertEqual(json.loads(self.c.lines()[0])["msg"], "json now")

    def test_offlineMessagesRendered(self):
        a, b = self.h.register("alice"), self.h.register("bob")
        self.h.login(b).request({"msgid": 6, "toid": a, "msg": "while you were out"})
        self.c.send(f"login:{a}:secret")
        lines = self.c.lines()
        self.assertEqual(lines[0], "login ok: you are [1]alice")
        self.assertEqual(lines[1], "1 offline message(s):")
        self.assertTrue(lines[2].endswith("[2]bob said: while you were out"), lines)

    def test_loginFailure(self):
        self.c.send("login:1:nope")
        self.assertEqual(self.c.lines(), ["error 1: id or password is invalid"])


class ShutdownTests(unittest.TestCase):
    def test_stopServiceEndsSessions(self):
        h = Harness()
        a, b = h.register("alice"), h.register("bob")
        alice, bob = h.login(a), h.login(b)
        alice.replies()
        self.successResultOf(h.service.stopService())
        for client in (alice, bob):
            self.assertIn({"msgid": m.KICK_NOTICE, "reason": "server shutting down"}, client.replies())
            self.assertTrue(client.closed)
        self.assertEqual(h.service.sessions, {})
        self.assertEqual(self.successResultOf(h.presence.locate([a, b])), {})
