"""
Token login (session resumption) and password changes, wired into the
login flow: a real ChatService on an in-memory SQLite store, a
MemoryTokenStore and a Clock, clients on StringTransports (no sleeps).
"""

from __future__ import annotations

import sqlite3

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from chatproto import messages as m
from chatproto.embedded import LocalPresence, LocalRelay
from chatproto.service import ChatService
from chatproto.sqlstore import ImmediatePool, SQLStore
from chatproto.tokens import DEFAULT_GRACE, DEFAULT_TTL, MemoryTokenStore, TokenStoreUnavailable, tokenHash, wellFormed
from tests.chat_helpers import ControlledHasher, Harness


class TokenHarness(Harness):
    """L{Harness} whose service issues tokens from a L{MemoryTokenStore}."""

    def __init__(self, onRelogin: str = "kick", tokens=None) -> None:
        self.clock = Clock()
        self.connection = sqlite3.connect(":memory:")
        self.store = SQLStore(ImmediatePool(self.connection))
        self.presence = LocalPresence("test")
        self.hasher = ControlledHasher()
        self.tokens = MemoryTokenStore(self.clock) if tokens is None else tokens
        self.service = ChatService(
            self.store, self.presence, LocalRelay(), self.hasher, self.clock, onRelogin, tokens=self.tokens
        )
        self.service.startService()
        self.maxLength = 1024
        self.idleTimeout = 300
        self._ports = 0

    def passwordLogin(self, uid: int, password: str = "secret", host: str = "10.0.0.1"):
        client = self.connect(host)
        reply = client.request({"msgid": m.LOGIN_MSG, "id": uid, "password": password})
        return client, reply

    def resume(self, uid: int, token, host: str = "10.0.0.1"):
        client = self.connect(host)
        reply = client.request({"msgid": m.LOGIN_MSG, "id": uid, "token": token})
        return client, reply


class UnavailableTokens(MemoryTokenStore):
    """A token store whose backend is down."""

    down = False

    def resume(self, uid, token):
        if self.down:
            return defer.fail(TokenStoreUnavailable("down"))
        return super().resume(uid, token)

    def issue(self, uid, name=None):
        if self.down:
            return defer.fail(TokenStoreUnavailable("down"))
        return super().issue(uid, name)


class HeldTokens(MemoryTokenStore):
    """A token store whose checks wait until the test fires them
    (C{held}: their Deferreds, in order)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.held: list[defer.Deferred] = []

    def resume(self, uid, token):
        d = defer.Deferred()
        self.held.append(d)
        return d.addCallback(lambda _: MemoryTokenStore.resume(self, uid, token))


class TokenLoginTests(unittest.TestCase):
    def setUp(self):
        self.h = TokenHarness()
        self.alice = self.h.register("alice")

    def test_passwordLoginIssuesToken(self):
        """A password login's ack carries a well-formed token, of which the
        store keeps only the SHA-256."""
        _, reply = self.h.passwordLogin(self.alice)
        self.assertEqual(reply["errno"], 0)
        token = reply["token"]
        self.assertTrue(wellFormed(token), token)
        stored = repr({uid: dict(a.entries) for uid, a in self.h.tokens.accounts.items()})
        self.assertIn(tokenHash(token), stored)
        self.assertNotIn(token, stored)

    def test_tokenLoginWithoutKDF(self):
        """A token logs in while the KDF is held (it is never asked), and
        the ack carries the rotated token."""
        client, reply = self.h.passwordLogin(self.alice)
        client.disconnect()
        self.h.hasher.hold = True
        client2, again = self.h.resume(self.alice, reply["token"])
        self.assertEqual(
            (again["msgid"], again["errno"], again["id"], again["name"]), (m.LOGIN_MSG_ACK, 0, self.alice, "alice")
        )
        self.assertEqual(self.h.hasher.waiting, [])
        self.assertTrue(wellFormed(again["token"]))
        self.assertNotEqual(again["token"], reply["token"])
        self.assertIs(self.h.service.sessions[self.alice], client2.protocol)

    def test_nameFromTokenStore(self):
        """A resume where the name is not cached (another server issued the
        token) takes the name from the token store: no getUser query."""
        _, reply = self.h.passwordLogin(self.alice)
        self.h.service.registry.names.clear()
        calls = []
        getUser = self.h.store.getUser
        self.h.store.getUser = lambda uid: calls.append(uid) or getUser(uid)
        _, again = self.h.resume(self.alice, reply["token"], host="10.0.0.7")
        self.assertEqual((again["errno"], again["name"], calls), (0, "alice", []))

    def test_offlineMessagesOnResume(self):
        """A resumed session gets what was stored meanwhile."""
        bob = self.h.register("bob")
        client, reply = self.h.passwordLogin(self.alice)
        client.disconnect()
        sender = self.h.login(bob)
        self.assertEqual(sender.request({"msgid": m.ONE_CHAT_MSG, "toid": self.alice, "msg": "hi"})["state"], "stored")
        _, again = self.h.resume(self.alice, reply["token"])
        self.assertEqual(again["errno"], 0)
        self.assertTrue(any('"msg":"hi"' in x for x in again["offlinemsg"]), again["offlinemsg"])

    def test_wrongTokenIsInvalid(self):
        """A wrong, malformed or other account's token: errno 1, nobody
        logged in."""
        bob = self.h.register("bob")
        _, bobLogin = self.h.passwordLogin(bob)
        for token in ("A" * 43, "short", "x:y" * 20, bobLogin["token"]):
            client, reply = self.h.resume(self.alice, token, host=f"10.0.1.{len(token)}")
            self.assertEqual((reply["msgid"], reply["errno"]), (m.LOGIN_MSG_ACK, m.E_INVALID), token)
            self.assertIsNone(client.protocol.uid)
        self.assertNotIn(self.alice, self.h.service.sessions)

    def test_expiry(self):
        """A token unused for the ttl fails; one second before, it works."""
        _, first = self.h.passwordLogin(self.alice)
        _, second = self.h.passwordLogin(self.alice, host="10.0.0.2")
        self.h.clock.advance(DEFAULT_TTL - 1)
        self.assertEqual(self.h.resume(self.alice, first["token"])[1]["errno"], 0)
        self.h.clock.advance(2)
        self.assertEqual(self.h.resume(self.alice, second["token"])[1]["errno"], m.E_INVALID)

    def test_rotationWithGrace(self):
        """After a resume the old token works for the grace period only;
        the new one keeps working."""
        client, reply = self.h.passwordLogin(self.alice)
        client.disconnect()
        c2, rotated = self.h.resume(self.alice, reply["token"])
        c2.disconnect()
        self.h.clock.advance(DEFAULT_GRACE + 1)
        c3, old = self.h.resume(self.alice, reply["token"])
        self.assertEqual(old["errno"], m.E_INVALID)
        _, new = self.h.resume(self.alice, rotated["token"])
        self.assertEqual(new["errno"], 0)

    def test_logoutRevokes(self):
        """LOGINOUT_MSG revokes the session's token."""
        client, reply = self.h.passwordLogin(self.alice)
        self.assertEqual(client.request({"msgid": m.LOGINOUT_MSG})["errno"], 0)
        self.assertEqual(self.h.resume(self.alice, reply["token"])[1]["errno"], m.E_INVALID)

    def test_logoutRevokesRotated(self):
        """Logging out of a resumed session revokes its token, and the
        predecessor still in its grace period."""
        client, reply = self.h.passwordLogin(self.alice)
        client.disconnect()
        c2, rotated = self.h.resume(self.alice, reply["token"])
        c2.request({"msgid": m.LOGINOUT_MSG})
        for token in (reply["token"], rotated["token"]):
            self.assertEqual(self.h.resume(self.alice, token)[1]["errno"], m.E_INVALID)

    def test_textQuitRevokes(self):
        """Text quit is an explicit logout: the token is revoked."""
        client = self.h.connect()
        client.send("login:%d:secret" % self.alice)
        [line] = client.lines()
        token = line.rsplit(":", 1)[1].rstrip(")")
        client.send("quit")
        self.assertEqual(self.h.resume(self.alice, token)[1]["errno"], m.E_INVALID)

    def test_dropKeepsToken(self):
        """A dropped connection does not revoke: that is what resumption is for."""
        client, reply = self.h.passwordLogin(self.alice)
        client.disconnect()
        self.assertEqual(self.h.resume(self.alice, reply["token"])[1]["errno"], 0)

    def test_kickedSessionKeepsToken(self):
        """A session replaced by a newer login (kick) keeps its token."""
        client, reply = self.h.passwordLogin(self.alice)
        self.h.passwordLogin(self.alice, host="10.0.0.2")
        self.assertTrue(client.closed)
        client.disconnect()
        self.assertEqual(self.h.resume(self.alice, reply["token"])[1]["errno"], 0)

    def test_shutdownKeepsToken(self):
        """A graceful stop kicks each session and then logs it out
        (chatproto.shutdown): that logout does not revoke the token."""
        client, reply = self.h.passwordLogin(self.alice)
        client.protocol.kick("server shutting down")
        self.successResultOf(defer.Deferred.fromCoroutine(self.h.service.logout(client.protocol)))
        client.disconnect()
        self.assertEqual(self.h.resume(self.alice, reply["token"])[1]["errno"], 0)

    def test_wrongTokensThrottled(self):
        """Five wrong tokens, and even the right one is refused with errno
        3 until the back-off passes."""
        _, reply = self.h.passwordLogin(self.alice)
        for i in range(5):
            self.assertEqual(self.h.resume(self.alice, "B" * 43)[1]["errno"], m.E_INVALID)
        self.assertEqual(self.h.resume(self.alice, reply["token"])[1]["errno"], m.E_THROTTLED)
        self.h.clock.advance(2)
        self.assertEqual(self.h.resume(self.alice, reply["token"])[1]["errno"], 0)

    def test_parallelWrongPasswordsThrottled(self):
        """Ten wrong passwords at once on ten connections: only the allowance
        (5) reaches the KDF, the rest are refused at once, like sequential
        guesses."""
        self.h.hasher.hold = True
        clients = [self.h.connect(host=f"10.0.2.{i}") for i in range(10)]
        for client in clients:
            client.send({"msgid": m.LOGIN_MSG, "id": self.alice, "password": "guess"})
        self.assertEqual(len(self.h.hasher.waiting), 5)
        refused = [c.reply()["errno"] for c in clients[5:]]
        self.assertEqual(refused, [m.E_THROTTLED] * 5)
        self.h.hasher.release()
        self.assertEqual([c.reply()["errno"] for c in clients[:5]], [m.E_INVALID] * 5)

    def test_parallelWrongTokensThrottled(self):
        """The same for tokens, whose check is held in the store."""
        tokenStore = HeldTokens(Clock())
        held = tokenStore.held
        h = TokenHarness(tokens=tokenStore)
        uid = h.register("carol")
        clients = [h.connect(host=f"10.0.3.{i}") for i in range(8)]
        for client in clients:
            client.send({"msgid": m.LOGIN_MSG, "id": uid, "token": "C" * 43})
        self.assertEqual(len(held), 5)
        self.assertEqual([c.reply()["errno"] for c in clients[5:]], [m.E_THROTTLED] * 3)
        for d in held:
            d.callback(None)
        self.assertEqual([c.reply()["errno"] for c in clients[:5]], [m.E_INVALID] * 5)

    def test_burstFromOneAddress(self):
        """Sixty honest token logins at once from one address (a balancer
        without PROXY headers) all succeed: checks in flight are counted
        per account, not per address."""
        tokenStore = HeldTokens(Clock())
        held = tokenStore.held
        h = TokenHarness(tokens=tokenStore)
        tokens = {}
        for i in range(60):
            uid = h.register(f"u{i}")
            tokens[uid] = h.passwordLogin(uid)[1]["token"]
        h.clock.advance(1)
        clients = []
        for uid, token in tokens.items():
            client = h.connect()
            client.send({"msgid": m.LOGIN_MSG, "id": uid, "token": token})
            clients.append(client)
        self.assertEqual(len(held), 60)
        for d in held:
            d.callback(None)
        self.assertEqual([c.reply()["errno"] for c in clients], [0] * 60)

    def test_wrongTokensFromOneAddressThrottled(self):
        """Wrong tokens sprayed at many accounts from one address: after 50
        failures the address is refused (errno 3)."""
        uids = [self.h.register(f"v{i}") for i in range(51)]
        for uid in uids[:50]:
            self.assertEqual(self.h.resume(uid, "F" * 43, host="10.9.9.9")[1]["errno"], m.E_INVALID)
        self.assertEqual(self.h.resume(uids[50], "F" * 43, host="10.9.9.9")[1]["errno"], m.E_THROTTLED)

    def test_loginsInFlightBounded(self):
        """A burst of token logins: at most maxLoginsInFlight are carried
        out at once; the rest wait their turn and then succeed."""
        tokenStore = HeldTokens(Clock())
        held = tokenStore.held
        h = TokenHarness(tokens=tokenStore)
        h.service.loginFlow.slots = defer.DeferredSemaphore(3)
        tokens = {}
        for i in range(5):
            uid = h.register(f"w{i}")
            tokens[uid] = h.passwordLogin(uid)[1]["token"]
        clients = []
        for uid, token in tokens.items():
            client = h.connect(host=f"10.0.4.{uid}")
            client.send({"msgid": m.LOGIN_MSG, "id": uid, "token": token})
            clients.append(client)
        self.assertEqual(len(held), 3)
        while held:
            held.pop(0).callback(None)
        self.assertEqual([c.reply()["errno"] for c in clients], [0] * 5)

    def test_storeUnavailable(self):
        """A token store that is down: errno 30, not counted as failures;
        a password login then goes on without a token."""
        h = TokenHarness(tokens=UnavailableTokens(Clock()))
        uid = h.register("dave")
        h.tokens.down = True
        for _ in range(7):
            self.assertEqual(h.resume(uid, "D" * 43)[1]["errno"], m.E_UNAVAILABLE)
        _, reply = h.passwordLogin(uid)
        self.assertEqual(reply["errno"], 0)
        self.assertNotIn("token", reply)

    def test_noTokenStore(self):
        """A service built without a token store issues none, and refuses
        token logins as invalid."""
        h = Harness()
        uid = h.register("erin")
        client = h.connect()
        reply = client.request({"msgid": m.LOGIN_MSG, "id": uid, "password": "secret"})
        self.assertNotIn("token", reply)
        other = h.connect()
        self.assertEqual(other.request({"msgid": m.LOGIN_MSG, "id": uid, "token": "E" * 43})["errno"], m.E_INVALID)

    def test_exactlyOneCredential(self):
        """Both or neither of password and token: errno 13."""
        client = self.h.connect()
        for fields in ({}, {"password": "secret", "token": "A" * 43}):
            reply = client.request({"msgid": m.LOGIN_MSG, "id": self.alice, **fields})
            self.assertEqual(reply["errno"], m.E_BAD_FIELD, fields)
        self.assertEqual(client.request({"msgid": m.LOGIN_MSG, "id": self.alice, "token": 5})["errno"], m.E_BAD_FIELD)

    def test_textResume(self):
        """resume:ID:TOKEN logs in; the reply shows the next command."""
        client = self.h.connect()
        client.send("login:%d:secret" % self.alice)
        [line] = client.lines()
        pattern = r"^login ok: you are \[%d\]alice \(resume with resume:%d:[A-Za-z0-9_-]{43}\)$"
        self.assertRegex(line, pattern % (self.alice, self.alice))
        token = line.rsplit(":", 1)[1].rstrip(")")
        client.disconnect()
        again = self.h.connect()
        again.send(f"resume:{self.alice}:{token}")
        [line2] = again.lines()
        prefix = f"login ok: you are [{self.alice}]alice (resume with resume:{self.alice}:"
        self.assertTrue(line2.startswith(prefix), line2)
        self.assertNotIn(token, line2)
        third = self.h.connect()
        third.send(f"resume:{self.alice}:nonsense")
        self.assertEqual(third.lines(), ["error 1: id or token is invalid"])


class PasswordChangeTests(unittest.TestCase):
    def setUp(self):
        self.h = TokenHarness()
        self.alice = self.h.register("alice")

    def test_changeRevokesEveryToken(self):
        """27 with the right old password: 28 with a fresh token; every
        earlier token is revoked; the new password works, the old not."""
        _, other = self.h.passwordLogin(self.alice, host="10.0.0.9")
        client, reply = self.h.passwordLogin(self.alice)
        ack = client.request({"msgid": m.PASSWD_MSG, "old": "secret", "new": "n3w"})
        self.assertEqual((ack["msgid"], ack["errno"], ack["id"]), (m.PASSWD_MSG_ACK, 0, self.alice))
        self.assertTrue(wellFormed(ack["token"]))
        for token in (other["token"], reply["token"]):
            self.assertEqual(self.h.resume(self.alice, token)[1]["errno"], m.E_INVALID)
        self.assertEqual(self.h.passwordLogin(self.alice, "secret")[1]["errno"], m.E_INVALID)
        self.assertEqual(self.h.passwordLogin(self.alice, "n3w")[1]["errno"], 0)
        self.assertEqual(self.h.resume(self.alice, ack["token"])[1]["errno"], 0)

    def test_logoutAfterChangeRevokesFreshToken(self):
        """The token of the 28 is the session's token from then on."""
        client, _ = self.h.passwordLogin(self.alice)
        ack = client.request({"msgid": m.PASSWD_MSG, "old": "secret", "new": "n3w"})
        client.request({"msgid": m.LOGINOUT_MSG})
        self.assertEqual(self.h.resume(self.alice, ack["token"])[1]["errno"], m.E_INVALID)

    def test_wrongOldPasswordThrottled(self):
        """A wrong old password is errno 1 and counts in the throttle:
        after five, even the right one is refused with errno 3."""
        client, reply = self.h.passwordLogin(self.alice)
        for _ in range(5):
            self.assertEqual(client.request({"msgid": m.PASSWD_MSG, "old": "nope", "new": "x"})["errno"], m.E_INVALID)
        self.assertEqual(client.request({"msgid": m.PASSWD_MSG, "old": "secret", "new": "x"})["errno"], m.E_THROTTLED)
        # Nothing changed: the token still resumes.
        self.assertEqual(self.h.resume(self.alice, reply["token"], host="10.0.0.5")[1]["errno"], m.E_THROTTLED)
        self.h.clock.advance(2)
        self.assertEqual(self.h.resume(self.alice, reply["token"], host="10.0.0.5")[1]["errno"], 0)

    def test_needsLogin(self):
        client = self.h.connect()
        self.assertEqual(client.request({"msgid": m.PASSWD_MSG, "old": "a", "new": "b"})["errno"], m.E_NOT_LOGGED_IN)

    def test_emptyNewPassword(self):
        client, _ = self.h.passwordLogin(self.alice)
        self.assertEqual(client.request({"msgid": m.PASSWD_MSG, "old": "secret", "new": ""})["errno"], m.E_INVALID)
        self.assertEqual(self.h.passwordLogin(self.alice, "secret", host="10.0.0.3")[1]["errno"], 0)

    def test_textPasswd(self):
        client = self.h.connect()
        client.send("login:%d:secret" % self.alice)
        client.lines()
        client.send("passwd:secret:n3w")
        [line] = client.lines()
        self.assertRegex(
            line,
            r"^password changed; older resume tokens are revoked"
            r" \(resume with resume:%d:[A-Za-z0-9_-]{43}\)$" % self.alice,
        )
        client.send("passwd:bad:x")
        self.assertEqual(client.lines(), ["error 1: id or password is invalid"])
