"""
Session-resumption tokens (L{chatproto.tokens}): one contract, run against
L{MemoryTokenStore} and against L{RedisTokenStore} on the Redis at
127.0.0.1:6379 (a random key prefix per test, deleted afterwards).  Both
take the time from a L{Clock}: the Redis scripts are given the time, so
expiry is tested without sleeping; what Redis does by itself (the key's
TTL) is checked by reading the TTL.
"""

from __future__ import annotations

import txredisapi
from twisted.internet import defer, endpoints, reactor
from twisted.internet.testing import Clock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from chatproto.tokens import (
    DEFAULT_GRACE,
    DEFAULT_MAX_PER_USER,
    DEFAULT_TTL,
    ITokenStore,
    MemoryTokenStore,
    TokenStoreUnavailable,
    newToken,
    tokenHash,
    wellFormed,
)
from chatproto.tokenstore_redis import RedisTokenStore
from tests.cluster_helpers import REDIS_HOST, REDIS_PORT, SyncRedis, deleteRedisPrefix, uniquePrefix

TTL = 1000.0
GRACE = 10.0
CAP = 4
# A plausible unix time, so that millisecond values look like real ones.
START = 1_800_000_000.0


class TokenStoreContract:
    """Mixed into a TestCase that provides C{makeStore(**kw)} (returning a
    Deferred or a store whose clock is C{self.clock}), C{storedText()}
    (everything the store holds, as text) and C{storedCount(uid)} (the
    account's stored entries)."""

    async def setUp(self):
        self.clock = Clock()
        self.clock.advance(START)
        self.store = await defer.maybeDeferred(self.makeStore, ttl=TTL, grace=GRACE, maxPerUser=CAP)

    def test_interface(self):
        self.assertTrue(verifyObject(ITokenStore, self.store))
        self.assertEqual((self.store.ttl, self.store.grace, self.store.maxPerUser), (TTL, GRACE, CAP))

    async def test_issueAndResume(self):
        """An issued token resumes its account once and is replaced by a
        new, different token."""
        token = await self.store.issue(7)
        self.assertTrue(wellFormed(token))
        self.assertGreaterEqual(len(token), 43)  # 256 bits in base64
        successor = await self.store.resume(7, token)
        self.assertTrue(wellFormed(successor))
        self.assertNotEqual(successor, token)
        self.assertTrue(await self.store.resume(7, successor))

    async def test_nameKept(self):
        """The name given to issue comes back with every resume (and is
        None when none was given); revokeAll forgets it with the tokens."""
        plain = await self.store.resume(8, await self.store.issue(8))
        self.assertIsNone(plain.name)
        token = await self.store.issue(7, "al:ice \u00e9")
        first = await self.store.resume(7, token)
        self.assertEqual(first.name, "al:ice \u00e9")
        second = await self.store.resume(7, first)
        self.assertEqual((second.name, str(second) == second), ("al:ice \u00e9", True))
        await self.store.revokeAll(7)
        later = await self.store.resume(7, await self.store.issue(7))
        self.assertIsNone(later.name)

    async def test_wrongToken(self):
        token = await self.store.issue(7)
        self.assertIsNone(await self.store.resume(7, newToken()))
        self.assertIsNone(await self.store.resume(7, token[:-1] + ("A" if token[-1] != "A" else "B")))
        self.assertIsNone(await self.store.resume(9, newToken()))
        # the real one still works
        self.assertIsNotNone(await self.store.resume(7, token))

    async def test_otherAccount(self):
        """A token is only good for the account it was issued to."""
        token = await self.store.issue(7)
        self.assertIsNone(await self.store.resume(8, token))
        self.assertIsNotNone(await self.store.resume(7, token))

    async def test_malformed(self):
        """Malformed tokens and uids fail (None/False), without an error."""
        token = await self.store.issue(7)
        for bad in [None, 12, b"x" * 43, "", "short", token + ":x", "é" * 43, "A" * 129, [token]]:
            self.assertIsNone(await self.store.resume(7, bad), bad)
            self.assertFalse(await self.store.revoke(7, bad))
        for uid in [0, -1, "7", True, None, 7.0]:
            self.assertIsNone(await self.store.resume(uid, token), uid)
            self.assertEqual(await self.store.revokeAll(uid), 0)
        self.failureResultOf(self.store.issue("7"), ValueError)
        self.assertIsNotNone(await self.store.resume(7, token))

    async def test_expiry(self):
        """A token works until C{ttl} after it was issued, not after."""
        token = await self.store.issue(7)
        other = await self.store.issue(7)
        self.clock.advance(TTL - 1)
        self.assertIsNotNone(await self.store.resume(7, token))
        self.clock.advance(2)
        self.assertIsNone(await self.store.resume(7, other))

    async def test_slidingThroughRotation(self):
        """Each resume starts a new C{ttl}: an account used within every
        C{ttl} stays logged in."""
        token = await self.store.issue(7)
        for _ in range(3):
            self.clock.advance(TTL - 1)
            token = await self.store.resume(7, token)
            self.assertIsNotNone(token)
        self.clock.advance(TTL + 1)
        self.assertIsNone(await self.store.resume(7, token))

    async def test_rotationGrace(self):
        """A consumed token keeps working for C{grace} seconds (a resume
        whose reply was lost), then stops."""
        first = await self.store.issue(7)
        second = await self.store.resume(7, first)
        self.assertIsNotNone(second)
        self.clock.advance(GRACE - 1)
        third = await self.store.resume(7, first)
        self.assertIsNotNone(third)
        self.clock.advance(2)
        self.assertIsNone(await self.store.resume(7, first))
        self.assertIsNotNone(await self.store.resume(7, third))

    async def test_graceRetryRevokesUnseenSuccessor(self):
        """Resuming again with the old token revokes the successor the
        client never received: one live token per login chain."""
        first = await self.store.issue(7)
        lost = await self.store.resume(7, first)
        retried = await self.store.resume(7, first)
        self.assertNotIn(retried, (first, lost))
        self.assertIsNone(await self.store.resume(7, lost))
        self.assertIsNotNone(await self.store.resume(7, retried))

    async def test_racingResumes(self):
        """Two resumes of the same token at once: only one successor stays
        usable."""
        first = await self.store.issue(7)
        a, b = await defer.gatherResults([self.store.resume(7, first), self.store.resume(7, first)])
        self.assertIsNotNone(a)
        self.assertIsNotNone(b)
        usable = [t for t in (a, b) if await self.store.resume(7, t)]
        self.assertEqual(len(usable), 1)

    async def test_graceDoesNotOutliveToken(self):
        """A token rotated just before it expires keeps only its own
        lifetime, not a fresh grace period beyond it."""
        first = await self.store.issue(7)
        self.clock.advance(TTL - 2)
        self.assertIsNotNone(await self.store.resume(7, first))
        self.clock.advance(3)
        self.assertIsNone(await self.store.resume(7, first))

    async def test_revokeOne(self):
        """Logout revokes that token only."""
        mine = await self.store.issue(7)
        other = await self.store.issue(7)
        self.assertTrue(await self.store.revoke(7, mine))
        self.assertFalse(await self.store.revoke(7, mine))
        self.assertIsNone(await self.store.resume(7, mine))
        self.assertIsNotNone(await self.store.resume(7, other))

    async def test_revokeWrongAccount(self):
        token = await self.store.issue(7)
        self.assertFalse(await self.store.revoke(8, token))
        self.assertIsNotNone(await self.store.resume(7, token))

    async def test_revokeEndsGraceOfPredecessor(self):
        """After a logout, the token the session resumed with (still in its
        grace period) does not work either."""
        first = await self.store.issue(7)
        current = await self.store.resume(7, first)
        self.assertTrue(await self.store.revoke(7, current))
        self.assertIsNone(await self.store.resume(7, first))
        self.assertEqual(self.storedCount(7), 0)

    async def test_revokeAll(self):
        """A password change revokes every token of the account, rotated
        ones in their grace period included, and no other account's."""
        tokens = [await self.store.issue(7) for _ in range(3)]
        rotated = tokens[0]
        tokens[0] = await self.store.resume(7, rotated)
        others = await self.store.issue(8)
        self.assertEqual(await self.store.revokeAll(7), 4)
        for token in [*tokens, rotated]:
            self.assertIsNone(await self.store.resume(7, token))
        self.assertEqual(self.storedCount(7), 0)
        self.assertEqual(await self.store.revokeAll(7), 0)
        self.assertIsNotNone(await self.store.resume(8, others))

    async def test_capDropsOldest(self):
        """An account holds at most C{maxPerUser} live tokens: one more
        drops the oldest."""
        tokens = [await self.store.issue(7) for _ in range(CAP + 2)]
        self.assertEqual(self.storedCount(7), CAP)
        self.assertIsNone(await self.store.resume(7, tokens[0]))
        self.assertIsNone(await self.store.resume(7, tokens[1]))
        self.assertIsNotNone(await self.store.resume(7, tokens[2]))
        self.assertIsNotNone(await self.store.resume(7, tokens[-1]))

    async def test_capOnRotatedTokens(self):
        """A hostile client resuming in a loop cannot pile up rotated
        tokens: at most C{maxPerUser} of them are kept."""
        token = await self.store.issue(7)
        for _ in range(5 * CAP):
            token = await self.store.resume(7, token)
        self.assertLessEqual(self.storedCount(7), 2 * CAP)
        self.assertIsNotNone(await self.store.resume(7, token))

    async def test_onlyHashesStored(self):
        """Nothing the store holds contains a raw token; the hashes are
        there."""
        tokens = [await self.store.issue(7) for _ in range(2)]
        tokens.append(await self.store.resume(7, tokens[0]))
        tokens.append(await self.store.issue(8))
        text = self.storedText()
        for token in tokens:
            self.assertNotIn(token, text)
        for token in tokens[1:]:
            self.assertIn(tokenHash(token), text)

    async def test_forgetsExpiredAccounts(self):
        """An account whose tokens all expired is removed when touched."""
        token = await self.store.issue(7)
        self.clock.advance(TTL + 1)
        self.assertIsNone(await self.store.resume(7, token))
        self.assertEqual(self.storedCount(7), 0)


class DefaultsTests(unittest.TestCase):
    def test_documentedDefaults(self):
        store = MemoryTokenStore(Clock())
        self.assertEqual((store.ttl, store.grace, store.maxPerUser), (7 * 24 * 3600, 60, 20))
        self.assertEqual((DEFAULT_TTL, DEFAULT_GRACE, DEFAULT_MAX_PER_USER), (7 * 24 * 3600, 60, 20))

    def test_badSettings(self):
        for kw in [dict(ttl=0), dict(grace=-1), dict(maxPerUser=0)]:
            self.assertRaises(ValueError, MemoryTokenStore, Clock(), **kw)
            self.assertRaises(ValueError, RedisTokenStore, None, Clock(), **kw)

    def test_tokensDiffer(self):
        tokens = {newToken() for _ in range(1000)}  # across batches of os.urandom
        self.assertEqual(len(tokens), 1000)
        self.assertTrue(all(wellFormed(t) and ":" not in t for t in tokens))
        # 256 bits: 43 characters of base64url, no padding
        self.assertEqual({len(t) for t in tokens}, {43})


class MemoryTokenStoreTests(TokenStoreContract, unittest.TestCase):
    def makeStore(self, **kw):
        return MemoryTokenStore(self.clock, **kw)

    def storedText(self):
        return repr({uid: (a.seq, a.entries) for uid, a in self.store.accounts.items()})

    def storedCount(self, uid):
        account = self.store.accounts.get(uid)
        return len(account.entries) if account else 0

    async def test_prune(self):
        """prune() forgets accounts nobody touched since their tokens
        expired, and keeps live ones."""
        await self.store.issue(7)
        self.clock.advance(TTL / 2)
        live = await self.store.issue(8)
        self.clock.advance(TTL / 2 + 1)
        self.assertEqual(self.store.prune(), 1)
        self.assertEqual(list(self.store.accounts), [8])
        self.assertIsNotNone(await self.store.resume(8, live))

    async def test_graceZero(self):
        """With no grace period a consumed token stops at once."""
        store = MemoryTokenStore(self.clock, ttl=TTL, grace=0)
        first = await store.issue(7)
        self.assertIsNotNone(await store.resume(7, first))
        self.assertIsNone(await store.resume(7, first))


class _RedisProtocol(txredisapi.RedisProtocol):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.lost = defer.Deferred()

    def connectionLost(self, why):
        super().connectionLost(why)
        self.lost.callback(None)


async def connectRedis(testCase) -> txredisapi.RedisProtocol:
    endpoint = endpoints.TCP4ClientEndpoint(reactor, REDIS_HOST, REDIS_PORT)
    p = await endpoints.connectProtocol(endpoint, _RedisProtocol(charset="utf-8", convertNumbers=False))

    def close():
        if p.transport is not None and p.connected:
            p.transport.loseConnection()
            return p.lost

    testCase.addCleanup(close)
    return p


class RedisTokenStoreTests(TokenStoreContract, unittest.TestCase):
    async def setUp(self):
        self.prefix = uniquePrefix()
        self.addCleanup(deleteRedisPrefix, self.prefix)
        self.redis = SyncRedis()
        self.addCleanup(self.redis.close)
        self.protocol = await connectRedis(self)
        await TokenStoreContract.setUp(self)

    def makeStore(self, **kw):
        return RedisTokenStore(self.protocol, self.clock, prefix=self.prefix, **kw)

    def keys(self):
        cursor, keys = "0", []
        while True:
            cursor, batch = self.redis("SCAN", cursor, "MATCH", self.prefix + "*", "COUNT", 1000)
            keys += batch
            if cursor == "0":
                return sorted(keys)

    def storedText(self):
        out = []
        for key in self.keys():
            out.append(key)
            out += self.redis("HGETALL", key)
        return "\n".join(out)

    def storedCount(self, uid):
        return len([f for f in self.redis("HKEYS", self.prefix + f"tokens:{uid}") if f != "#"])

    async def test_layout(self):
        """One hash per account, a field per token hash, the key's TTL the
        latest expiry."""
        token = await self.store.issue(7)
        key = self.prefix + "tokens:7"
        self.assertEqual(self.keys(), [key])
        fields = dict(zip(*[iter(self.redis("HGETALL", key))] * 2))
        self.assertEqual(set(fields), {"#", tokenHash(token)})
        expires, seq, state, successor = fields[tokenHash(token)].split(" ")
        self.assertEqual((int(expires), seq, state, successor), (int((START + TTL) * 1000), "1", "L", "-"))
        pttl = self.redis("PTTL", key)
        self.assertTrue(TTL * 1000 - 5000 < pttl <= TTL * 1000, pttl)

    async def test_ttlFollowsLatestToken(self):
        await self.store.issue(7)
        self.clock.advance(TTL / 2)
        await self.store.issue(7)
        pttl = self.redis("PTTL", self.prefix + "tokens:7")
        self.assertTrue(TTL * 1000 - 5000 < pttl <= TTL * 1000, pttl)

    async def test_defaultTTLOnKey(self):
        """The documented 7 days reach Redis as the key's TTL."""
        store = RedisTokenStore(self.protocol, self.clock, prefix=self.prefix)
        await store.issue(9)
        pttl = self.redis("PTTL", self.prefix + "tokens:9")
        self.assertTrue(7 * 86400_000 - 5000 < pttl <= 7 * 86400_000, pttl)

    async def test_revokeAllDeletesKey(self):
        await self.store.issue(7)
        await self.store.revokeAll(7)
        self.assertEqual(self.keys(), [])

    async def test_anotherServerAccepts(self):
        """A token issued through one connection (server) resumes through
        another."""
        other = RedisTokenStore(lambda: self.otherProtocol, self.clock, prefix=self.prefix, ttl=TTL)
        self.otherProtocol = await connectRedis(self)
        token = await self.store.issue(7)
        self.assertIsNotNone(await other.resume(7, token))

    async def test_unavailable(self):
        """No connection, or a lost one: TokenStoreUnavailable, not a wrong
        token."""
        store = RedisTokenStore(lambda: None, self.clock, prefix=self.prefix)
        await self.assertFailure(store.resume(7, newToken()), TokenStoreUnavailable)
        await self.assertFailure(store.issue(7), TokenStoreUnavailable)
        await self.assertFailure(store.revoke(7, newToken()), TokenStoreUnavailable)
        await self.assertFailure(store.revokeAll(7), TokenStoreUnavailable)
        p = await connectRedis(self)
        p.transport.loseConnection()
        await p.lost
        store = RedisTokenStore(p, self.clock, prefix=self.prefix)
        await self.assertFailure(store.resume(7, newToken()), TokenStoreUnavailable)

    async def test_damagedValueIgnored(self):
        """A field that is not in the store's format counts as expired and
        is removed, not an error."""
        key = self.prefix + "tokens:7"
        token = newToken()
        self.redis("HSET", key, tokenHash(token), "garbage")
        self.assertIsNone(await self.store.resume(7, token))
        self.assertEqual(self.keys(), [])
