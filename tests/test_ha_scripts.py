"""
Every Lua script declares every key it touches in KEYS (issue 11), so that
key-routing proxies and Redis Cluster (with a hash-tagged prefix) can run
them.  Checked against the real Redis at 127.0.0.1:6379 by running every
script, through the cluster's real call paths, with each C{redis.call}
replaced by one that fails on a key of the test's prefix that is not in
KEYS (channel names, which are not keys, are allowed for PUBLISH and
PUBSUB).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial import unittest

from chatproto import redisscripts
from chatproto.interfaces import ClaimResult, Location, PresenceUnavailable
from chatproto.rediscluster import unavailable
from tests.test_presence_redis import ClusterMixin, SessionsReceiver

_CHECKED = """
local function checkedCall(cmd, ...)
  local declared = {}
  for _, k in ipairs(KEYS) do declared[k] = true end
  local name = string.upper(cmd)
  if name ~= 'PUBLISH' and name ~= 'PUBSUB' then
    for _, arg in ipairs({...}) do
      if type(arg) == 'string' and string.sub(arg, 1, #PREFIX) == PREFIX and not declared[arg] then
        error('undeclared key ' .. arg .. ' in ' .. name)
      end
    end
  end
  local reply = redis.pcall(cmd, ...)
  if type(reply) == 'table' and reply.err then error(reply.err) end
  return reply
end
"""


def instrument(script: str, prefix: str) -> str:
    """C{script} with every C{redis.call} checked (keys of C{prefix} must
    be in KEYS)."""
    return _CHECKED.replace("PREFIX", repr(prefix)) + script.replace("redis.call(", "checkedCall(")


class DeclaredKeysTests(ClusterMixin, unittest.TestCase):
    ttl = 60.0
    refreshInterval = 30.0

    def setUp(self):
        self.setUpPrefix()

    def checked(self, cluster):
        """Make C{cluster} run instrumented scripts."""
        prefix = self.prefix

        def evalChecked(script, args):
            keys, argv = redisscripts.scriptCall(script, prefix, args)
            try:
                d = cluster.protocol().eval(instrument(script, prefix), keys, argv)
            except Exception:
                d = defer.fail()
            return d.addErrback(unavailable)

        cluster.eval = evalChecked
        return cluster

    async def test_instrumentationCatchesUndeclared(self):
        """The check itself: a script building a key from ARGV fails."""
        a = await self.startCluster("a")
        script = "return redis.call('GET', ARGV[1] .. 'user:1')"
        with self.assertRaises(Exception) as caught:
            await a.protocol().eval(instrument(script, self.prefix), [], [self.prefix])
        self.assertIn("undeclared key", str(caught.exception))
        # Declared, it runs.
        self.assertIsNone(
            await a.protocol().eval(instrument(script, self.prefix), [self.prefix + "user:1"], [self.prefix])
        )

    async def test_everyScript(self):
        """Register, claim (also across servers, with the second call that
        names the previous owner), relay, kick, locate, check, release,
        deregister: no undeclared key anywhere."""
        receiver = SessionsReceiver({1: "s1", 3: "s3"})
        a = self.checked(self.newCluster("a"))
        b = self.checked(self.newCluster("b"))
        for cluster, r in ((a, receiver), (b, SessionsReceiver({2: "t2"}))):
            self.addCleanup(cluster.presence.stop)
            self.addCleanup(cluster.relay.stop)
            await cluster.presence.start(lambda: 0)
            await cluster.relay.start(r)
        self.assertEqual(await a.presence.claim(1, "s1", False), ClaimResult(True, None))
        self.assertEqual(await a.presence.claim(3, "s3", False), ClaimResult(True, None))
        self.assertEqual(await b.presence.claim(2, "t2", False), ClaimResult(True, None))
        self.assertEqual(await a.relay.deliver([2, 4], {"msgid": 5, "msg": "x"}, True), [4])
        self.assertEqual(await b.presence.claim(3, "t3", True), ClaimResult(True, Location("a", "s3")))
        self.assertEqual(
            await a.presence.locate([1, 2, 3, 4]),
            {1: Location("a", "s1"), 2: Location("b", "t2"), 3: Location("b", "t3")},
        )
        await a.checkSessions()
        self.assertEqual(receiver.kicked, [(3, "s3", "logged in elsewhere")])
        self.assertTrue(await a.presence.release(1, "s1"))
        self.assertEqual(sorted(s.name for s in await a.presence.servers()), ["a", "b"])
        await a.presence.announceStop()
        with self.assertRaises(PresenceUnavailable):
            await a.register()
        self.assertEqual([s.name for s in await b.presence.servers()], ["b"])
