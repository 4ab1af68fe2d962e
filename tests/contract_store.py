"""
The L{IChatStore} contract.  Every store implementation runs it: a TestCase
mixes in L{StoreContract} and provides C{makeStore()}, returning a Deferred
that fires with a started store (closed by the mixin after each test).
"""

from twisted.internet import defer
from zope.interface.verify import verifyObject

from chatproto.interfaces import (
    FriendRequest,
    Group,
    GroupMember,
    IChatStore,
    NameTaken,
    NoSuchGroup,
    NoSuchUser,
    TooManyRequests,
    User,
)


class StoreContract:
    def makeStore(self):
        raise NotImplementedError

    async def setUp(self):
        self.store = await self.makeStore()
        self.addCleanup(self.store.close)

    async def users(self, *names):
        return [await self.store.createUser(name, "hash-" + name) for name in names]

    def test_interface(self):
        self.assertTrue(verifyObject(IChatStore, self.store))

    async def test_startIsIdempotent(self):
        await self.store.start()
        [uid] = await self.users("alice")
        self.assertEqual((await self.store.getUser(uid)).name, "alice")

    async def test_createAndGetUser(self):
        a, b = await self.users("alice", "bob")
        self.assertNotEqual(a, b)
        self.assertEqual(await self.store.getUser(a), User(a, "alice", "hash-alice"))
        self.assertIsNone(await self.store.getUser(b + 1000))

    async def test_nameTaken(self):
        await self.users("alice")
        with self.assertRaises(NameTaken):
            await self.store.createUser("alice", "other")

    async def test_unicode(self):
        [uid] = await self.users("\u00e9mile \U0001f600")
        self.assertEqual((await self.store.getUser(uid)).name, "\u00e9mile \U0001f600")
        await self.store.storeOffline([(uid, '{"msg":"\U0001f680 \u4f60\u597d"}')])
        self.assertEqual(await self.store.peekOffline(uid), ['{"msg":"\U0001f680 \u4f60\u597d"}'])

    async def test_getNames(self):
        a, b = await self.users("alice", "bob")
        self.assertEqual(await self.store.getNames([a, b, b + 99]), {a: "alice", b: "bob"})
        self.assertEqual(await self.store.getNames([]), {})

    async def test_friendsAreMutualAndIdempotent(self):
        a, b, c = await self.users("alice", "bob", "carol")
        self.assertTrue(await self.store.addFriend(a, b))
        self.assertFalse(await self.store.addFriend(a, b))
        self.assertFalse(await self.store.addFriend(b, a))
        await self.store.addFriend(c, a)
        self.assertEqual(await self.store.getFriends(a), [(b, "bob"), (c, "carol")])
        self.assertEqual(await self.store.getFriends(b), [(a, "alice")])

    async def test_friendMustExist(self):
        [a] = await self.users("alice")
        with self.assertRaises(NoSuchUser):
            await self.store.addFriend(a, a + 1000)
        self.assertEqual(await self.store.getFriends(a), [])

    async def test_groups(self):
        a, b, c = await self.users("alice", "bob", "carol")
        gid = await self.store.createGroup("g1", "first", a)
        self.assertTrue(await self.store.joinGroup(gid, b))
        self.assertFalse(await self.store.joinGroup(gid, b))
        self.assertEqual(
            await self.store.getGroupMembers(gid),
            [GroupMember(a, "alice", "creator"), GroupMember(b, "bob", "normal")],
        )
        self.assertEqual(await self.store.getGroup(gid), Group(gid, "g1", "first"))
        other = await self.store.createGroup("g2", "", c)
        await self.store.joinGroup(other, a)
        groups = await self.store.getUserGroups(a)
        self.assertEqual([g.id for g in groups], [gid, other])
        self.assertEqual([m.id for m in groups[1].members], [a, c])
        self.assertEqual(await self.store.getUserGroups(b + 1000), [])
        await self.store.addFriend(a, b)
        self.assertEqual(await self.store.getLoginData(a), ([(b, "bob")], groups, False))
        self.assertEqual(await self.store.getLoginData(b + 1000), ([], [], False))
        await self.store.storeOffline([(a, '"x"')])
        self.assertEqual(await self.store.getLoginData(a), ([(b, "bob")], groups, True))

    async def test_groupNameTaken(self):
        [a] = await self.users("alice")
        await self.store.createGroup("g1", "", a)
        with self.assertRaises(NameTaken):
            await self.store.createGroup("g1", "again", a)

    async def test_noSuchGroup(self):
        [a] = await self.users("alice")
        with self.assertRaises(NoSuchGroup):
            await self.store.joinGroup(12345, a)
        with self.assertRaises(NoSuchGroup):
            await self.store.getGroupMembers(12345)
        with self.assertRaises(NoSuchGroup):
            await self.store.getGroup(12345)

    async def test_offlineOrderKept(self):
        a, b = await self.users("alice", "bob")
        # Issued without waiting: the store keeps the order they came in.
        await defer.gatherResults([self.store.storeOffline([(a, f"m{i}")]) for i in range(50)])
        await self.store.storeOffline([(b, "x"), (a, "m50")])
        self.assertEqual(await self.store.peekOffline(a), [f"m{i}" for i in range(51)])
        self.assertEqual(await self.store.peekOffline(b), ["x"])

    async def test_takeOfflineDeletesWhatWasHandedOver(self):
        a, b = await self.users("alice", "bob")
        await self.store.storeOffline([(a, "one"), (a, "two"), (b, "other")])
        seen = []
        count = await self.store.takeOffline(a, lambda payloads: seen.append(payloads) or True)
        self.assertEqual((count, seen), (2, [["one", "two"]]))
        self.assertEqual(await self.store.peekOffline(a), [])
        self.assertEqual(await self.store.peekOffline(b), ["other"])

    async def test_takeOfflineEmptyStillHandsOver(self):
        [a] = await self.users("alice")
        seen = []
        self.assertEqual(await self.store.takeOffline(a, lambda p: seen.append(p) or True), 0)
        self.assertEqual(seen, [[]])

    async def test_takeOfflineKeepsWhenNotTaken(self):
        [a] = await self.users("alice")
        await self.store.storeOffline([(a, "one")])
        self.assertEqual(await self.store.takeOffline(a, lambda p: False), 0)
        self.assertEqual(await self.store.peekOffline(a), ["one"])

        def broken(payloads):
            raise RuntimeError("session died")

        with self.assertRaises(RuntimeError):
            await self.store.takeOffline(a, broken)
        self.assertEqual(await self.store.peekOffline(a), ["one"])

    async def test_takeOfflineKeepsMessagesStoredMeanwhile(self):
        [a] = await self.users("alice")
        await self.store.storeOffline([(a, "old")])
        later = []

        def handoff(payloads):
            # A message arrives after the read, before the delete.
            later.append(self.store.storeOffline([(a, "new")]))
            return True

        await self.store.takeOffline(a, handoff)
        await later[0]
        self.assertEqual(await self.store.peekOffline(a), ["new"])

    async def test_takeOfflineWaitsForAcceptedWrites(self):
        [a] = await self.users("alice")
        self.store.storeOffline([(a, "in flight")])
        seen = []
        await self.store.takeOffline(a, lambda p: seen.append(p) or True)
        self.assertEqual(seen, [["in flight"]])

    # --- message ids (chatproto.acks) ----------------------------------------

    async def test_offlineOneCopyPerRecipientAndMid(self):
        """A resent message (same mid) is stored once per recipient, in one
        batch or in two; other recipients and messages without mid are
        not affected."""
        a, b = await self.users("alice", "bob")
        one = '{"msgid":6,"msg":"hi","mid":"AAAA"}'
        await self.store.storeOffline([(a, one), (a, one), (b, one), (a, "notice"), (a, "notice")])
        await self.store.storeOffline([(a, one)])
        self.assertEqual(await self.store.peekOffline(a), [one, "notice", "notice"])
        self.assertEqual(await self.store.peekOffline(b), [one])

    async def test_keepAckedUntilDeleted(self):
        """takeOffline(keepAcked=True) deletes only what has no mid; the
        rest goes when deleteOffline names its mids."""
        a, b = await self.users("alice", "bob")
        m1, m2 = '{"msgid":6,"mid":"M1"}', '{"msgid":6,"mid":"M2"}'
        await self.store.storeOffline([(a, m1), (a, "notice"), (a, m2), (b, m1)])
        seen = []
        self.assertEqual(await self.store.takeOffline(a, lambda p: seen.append(p) or True, keepAcked=True), 1)
        self.assertEqual(seen, [[m1, "notice", m2]])
        self.assertEqual(await self.store.peekOffline(a), [m1, m2])
        await self.store.deleteOffline(a, ["M1", "unknown"])
        self.assertEqual(await self.store.peekOffline(a), [m2])
        self.assertEqual(await self.store.peekOffline(b), [m1])

    async def test_deletesMoreThanOneStatementHolds(self):
        """Deletion by id and by mid goes 500 values per statement: 1,200
        handed over (no mid) and 1,200 acked (by mid) all go, and only
        the user's own rows."""
        a, b = await self.users("alice", "bob")
        acked = [f'{{"msgid":6,"mid":"M{i}"}}' for i in range(1200)]
        await self.store.storeOffline([(a, f"n{i}") for i in range(1200)] + [(a, p) for p in acked] + [(b, acked[0])])
        count = await self.store.takeOffline(a, lambda p: True, keepAcked=True)
        self.assertEqual(count, 1200)
        self.assertEqual(await self.store.peekOffline(a), acked)
        await self.store.deleteOffline(a, [f"M{i}" for i in range(1200)])
        self.assertEqual(await self.store.peekOffline(a), [])
        self.assertEqual(await self.store.peekOffline(b), [acked[0]])

    # --- friend requests (chatproto.sqlfriends) -----------------------------

    async def test_friendRequestAccepted(self):
        """A request is pending (idempotently) until accepted; then both
        are friends and the request is gone."""
        a, b = await self.users("alice", "bob")
        self.assertEqual(await self.store.requestFriend(a, b, 1000.0, 0.0, 10), "requested")
        self.assertEqual(await self.store.requestFriend(a, b, 1001.0, 0.0, 10), "pending")
        self.assertEqual(await self.store.getFriendRequests(b, 0.0), [FriendRequest(a, "alice", 1000.0)])
        self.assertEqual(await self.store.getFriendRequests(a, 0.0), [])
        self.assertEqual(await self.store.getFriends(a), [])
        self.assertTrue(await self.store.answerFriendRequest(b, a, True, 0.0))
        self.assertEqual(await self.store.getFriends(a), [(b, "bob")])
        self.assertEqual(await self.store.getFriends(b), [(a, "alice")])
        self.assertEqual(await self.store.getFriendRequests(b, 0.0), [])
        self.assertFalse(await self.store.answerFriendRequest(b, a, True, 0.0))
        self.assertEqual(await self.store.requestFriend(a, b, 1002.0, 0.0, 10), "friends")

    async def test_friendRequestRefused(self):
        """A refused request disappears for its target, stays "pending"
        for its requester (who cannot ask again) until it expires."""
        a, b = await self.users("alice", "bob")
        await self.store.requestFriend(a, b, 1000.0, 0.0, 10)
        self.assertTrue(await self.store.answerFriendRequest(b, a, False, 0.0))
        self.assertEqual(await self.store.getFriendRequests(b, 0.0), [])
        self.assertFalse(await self.store.answerFriendRequest(b, a, True, 0.0))
        self.assertEqual(await self.store.requestFriend(a, b, 1001.0, 0.0, 10), "pending")
        self.assertEqual(await self.store.getFriendRequests(b, 0.0), [])
        self.assertEqual(await self.store.getFriends(a), [])
        # Expired (created before since = 1500): a new request may be made.
        self.assertEqual(await self.store.requestFriend(a, b, 2000.0, 1500.0, 10), "requested")
        self.assertEqual(await self.store.getFriendRequests(b, 1500.0), [FriendRequest(a, "alice", 2000.0)])

    async def test_friendRequestsCrossed(self):
        """A request to someone who asked you first makes both friends."""
        a, b = await self.users("alice", "bob")
        await self.store.requestFriend(a, b, 1000.0, 0.0, 10)
        self.assertEqual(await self.store.requestFriend(b, a, 1001.0, 0.0, 10), "accepted")
        self.assertEqual(await self.store.getFriends(a), [(b, "bob")])
        self.assertEqual(await self.store.getFriendRequests(a, 0.0), [])
        self.assertEqual(await self.store.getFriendRequests(b, 0.0), [])

    async def test_friendRequestsExpire(self):
        """Requests older than since are not listed, cannot be answered
        and do not count against the cap."""
        a, b, c = await self.users("alice", "bob", "carol")
        await self.store.requestFriend(a, b, 1000.0, 0.0, 1)
        self.assertEqual(await self.store.getFriendRequests(b, 1000.0), [FriendRequest(a, "alice", 1000.0)])
        self.assertEqual(await self.store.getFriendRequests(b, 1000.5), [])
        self.assertFalse(await self.store.answerFriendRequest(b, a, True, 1000.5))
        self.assertEqual(await self.store.getFriends(b), [])
        # The expired one no longer counts: the cap of 1 lets a new one through.
        self.assertEqual(await self.store.requestFriend(a, c, 2000.0, 1500.0, 1), "requested")

    async def test_friendRequestCap(self):
        """At most cap unexpired requests out per requester; answered
        (refused) ones still count, accepted ones do not."""
        users = await self.users("alice", "bob", "carol", "dave", "erin")
        a, others = users[0], users[1:]
        for other in others[:3]:
            self.assertEqual(await self.store.requestFriend(a, other, 1000.0, 0.0, 3), "requested")
        with self.assertRaises(TooManyRequests):
            await self.store.requestFriend(a, others[3], 1000.0, 0.0, 3)
        # A repeat of a pending one is still a no-op, not an error.
        self.assertEqual(await self.store.requestFriend(a, others[0], 1000.0, 0.0, 3), "pending")
        await self.store.answerFriendRequest(others[0], a, False, 0.0)
        with self.assertRaises(TooManyRequests):
            await self.store.requestFriend(a, others[3], 1000.0, 0.0, 3)
        await self.store.answerFriendRequest(others[1], a, True, 0.0)
        self.assertEqual(await self.store.requestFriend(a, others[3], 1000.0, 0.0, 3), "requested")
        self.assertEqual([r.id for r in await self.store.getFriendRequests(others[3], 0.0)], [a])

    async def test_friendRequestNoSuchUser(self):
        [a] = await self.users("alice")
        with self.assertRaises(NoSuchUser):
            await self.store.requestFriend(a, a + 1000, 1000.0, 0.0, 10)
        self.assertFalse(await self.store.answerFriendRequest(a, a + 1000, True, 0.0))

    async def test_friendRequestsListedOldestFirstAndLimited(self):
        a, b, c, d = await self.users("alice", "bob", "carol", "dave")
        await self.store.requestFriend(c, a, 1002.0, 0.0, 10)
        await self.store.requestFriend(b, a, 1001.0, 0.0, 10)
        await self.store.requestFriend(d, a, 1003.0, 0.0, 10)
        self.assertEqual([r.id for r in await self.store.getFriendRequests(a, 0.0)], [b, c, d])
        self.assertEqual([r.name for r in await self.store.getFriendRequests(a, 0.0, 2)], ["bob", "carol"])
