"""
Session-resumption tokens in Redis (txredisapi): any server of a cluster
accepts a token another one issued.  The rules are those of
L{chatproto.tokens} (read its docstring); this module only stores them.

Keys (prefix C{P}, C{chat:} by default)
=======================================

C{P tokens:UID} (HASH, TTL: until its last token expires)
    One field per token: the token's SHA-256 in hex, with the value
    C{"EXPIRES SEQ STATE NEXT"}: expiry (unix time, ms), issue order,
    C{L} (live) or C{R} (rotated, in its grace period) and the hash of the
    successor (C{-} if none).  The field C{#} is the account's issue
    counter.  The raw token is never stored.

One key per account, so each script names every key it touches in KEYS
(one key: fine for Redis Cluster too), C{revokeAll} is one C{DEL}, and the
cap is a count of fields.  Each operation is one Lua script (no
check-then-act window): two servers resuming the same token at once
cannot both consume it as a live token.  The scripts drop expired fields
whenever they touch an account and set the key's TTL to its latest expiry,
so an account nobody uses disappears by itself.

The connection
==============

C{connection} is an object with txredisapi's C{eval(script, keys, args)}
(a C{txredisapi.RedisProtocol}, a C{ConnectionHandler}), or a callable
returning one, or L{None} while disconnected, so that a cluster can hand
over the command connection it keeps up (for example
C{lambda: cluster.commands.protocol}).  txredisapi caches the scripts'
SHA1 and uses C{EVALSHA} after the first call.
"""

from __future__ import annotations

import txredisapi
from twisted.internet import defer, error
from twisted.python.failure import Failure
from zope.interface import implementer

from chatproto.tokens import (
    DEFAULT_GRACE,
    DEFAULT_MAX_PER_USER,
    DEFAULT_TTL,
    ITokenStore,
    checkSettings,
    Resumed,
    TokenStoreUnavailable,
    validUid,
    newToken,
    tokenHash,
    wellFormed,
)

_COMMON = """
local K = KEYS[1]
local now = tonumber(ARGV[1])

local function load()
  local flat = redis.call('HGETALL', K)
  local entries, dead = {}, {}
  for i = 1, #flat, 2 do
    local f = flat[i]
    if f ~= '#' and f ~= '@' then
      local exp, seq, state, nxt = string.match(flat[i + 1], '^(%d+) (%d+) ([LR]) (%S+)$')
      exp = tonumber(exp)
      if exp and exp > now then
        entries[f] = {exp = exp, seq = tonumber(seq), rotated = (state == 'R'), next = nxt}
      else
        dead[#dead + 1] = f
      end
    end
  end
  if #dead > 0 then redis.call('HDEL', K, unpack(dead)) end
  return entries
end

local function save(f, e)
  local state = 'L'
  if e.rotated then state = 'R' end
  redis.call('HSET', K, f, string.format('%.0f %.0f %s %s', e.exp, e.seq, state, e.next))
end

local function bound(entries, rotated, room, cap)
  local kind = {}
  for f, e in pairs(entries) do
    if e.rotated == rotated then kind[#kind + 1] = {e.seq, f} end
  end
  local excess = #kind - (cap - room)
  if excess <= 0 then return end
  table.sort(kind, function(a, b) return a[1] < b[1] end)
  for i = 1, excess do
    redis.call('HDEL', K, kind[i][2])
    entries[kind[i][2]] = nil
  end
end

local function add(entries, h, ttl, cap)
  bound(entries, false, 1, cap)
  local seq = redis.call('HINCRBY', K, '#', 1)
  local e = {exp = now + ttl, seq = seq, rotated = false, next = '-'}
  entries[h] = e
  save(h, e)
end

local function settle(entries)
  local last = 0
  for _, e in pairs(entries) do
    if e.exp > last then last = e.exp end
  end
  if last == 0 then
    redis.call('DEL', K)
  else
    redis.call('PEXPIRE', K, string.format('%.0f', last - now))
  end
end
"""

#: KEYS: account.  ARGV: now (ms), ttl (ms), cap, hash[, name].
ISSUE = (
    _COMMON
    + """
local entries = load()
if ARGV[5] and ARGV[5] ~= '' then redis.call('HSET', K, '@', ARGV[5]) end
add(entries, ARGV[4], tonumber(ARGV[2]), tonumber(ARGV[3]))
settle(entries)
return 1
"""
)

#: KEYS: account.  ARGV: now, ttl, grace (ms), cap, presented hash, new hash.
#: Returns {1, name or nil} (consumed; the new hash is live) or 0 (not a
#: token of this account).
RESUME = (
    _COMMON
    + """
local ttl, grace, cap, ph, nh = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local entries = load()
local e = entries[ph]
if not e then
  settle(entries)
  return 0
end
if e.rotated then
  if entries[e.next] then
    redis.call('HDEL', K, e.next)
    entries[e.next] = nil
  end
else
  bound(entries, true, 1, cap)
  e.rotated = true
  if now + grace < e.exp then e.exp = now + grace end
end
e.next = nh
if e.exp <= now then
  redis.call('HDEL', K, ph)
  entries[ph] = nil
else
  save(ph, e)
end
add(entries, nh, ttl, cap)
settle(entries)
return {1, redis.call('HGET', K, '@')}
"""
)

#: KEYS: account.  ARGV: now, hash.  Returns 1 if it was a token of the account.
REVOKE = (
    _COMMON
    + """
local h = ARGV[2]
local entries = load()
local found = 0
if entries[h] then
  found = 1
  redis.call('HDEL', K, h)
  entries[h] = nil
end
for f, e in pairs(entries) do
  if e.rotated and e.next == h then
    redis.call('HDEL', K, f)
    entries[f] = nil
  end
end
settle(entries)
return found
"""
)

#: KEYS: account.  ARGV: now.  Returns how many tokens were removed.
REVOKE_ALL = (
    _COMMON
    + """
local n = 0
for _ in pairs(load()) do n = n + 1 end
redis.call('DEL', K)
return n
"""
)


def _unavailable(failure: Failure):
    if failure.check(txredisapi.RedisError, error.ConnectionDone, error.ConnectionLost, defer.CancelledError):
        raise TokenStoreUnavailable(f"Redis: {failure.getErrorMessage()}")
    return failure


def _resumed(reply, successor: str) -> Resumed | None:
    if isinstance(reply, list) and reply and int(reply[0]) == 1:
        name = reply[1] if len(reply) > 1 else None
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return Resumed(successor, name if isinstance(name, str) and name else None)
    return None


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


@implementer(ITokenStore)
class RedisTokenStore:
    """
    L{ITokenStore} in Redis.

    @param connection: see the module docstring.
    @param clock: an L{IReactorTime}; its C{seconds()} (unix time) is the
        time the scripts use, so the servers of a cluster should keep
        their clocks in step (NTP); a skew of S seconds moves expiry and
        the grace period by S.
    """

    def __init__(
        self,
        connection,
        clock,
        prefix: str = "chat:",
        ttl: float = DEFAULT_TTL,
        grace: float = DEFAULT_GRACE,
        maxPerUser: int = DEFAULT_MAX_PER_USER,
    ) -> None:
        checkSettings(ttl, grace, maxPerUser)
        self.connection = connection
        self.clock = clock
        self.prefix = prefix
        self.ttl = ttl
        self.grace = grace
        self.maxPerUser = maxPerUser

    def key(self, uid: int) -> str:
        """The Redis key of C{uid}'s tokens."""
        return f"{self.prefix}tokens:{uid}"

    def _eval(self, script: str, uid: int, args) -> defer.Deferred:
        try:
            connection = self.connection
            if not hasattr(connection, "eval"):
                connection = connection()
            if connection is None:
                raise TokenStoreUnavailable("not connected to Redis")
            d = connection.eval(script, [self.key(uid)], [_ms(self.clock.seconds()), *args])
        except Exception:
            d = defer.fail()
        return d.addErrback(_unavailable)

    def issue(self, uid, name: str | None = None) -> defer.Deferred:
        if not validUid(uid):
            return defer.fail(ValueError(f"bad uid {uid!r}"))
        token = newToken()
        args = [_ms(self.ttl), self.maxPerUser, tokenHash(token)]
        if name:
            args.append(name)
        d = self._eval(ISSUE, uid, args)
        return d.addCallback(lambda _: token)

    def resume(self, uid, token) -> defer.Deferred:
        if not (validUid(uid) and wellFormed(token)):
            return defer.succeed(None)
        successor = newToken()
        d = self._eval(
            RESUME,
            uid,
            [_ms(self.ttl), _ms(self.grace), self.maxPerUser, tokenHash(token), tokenHash(successor)],
        )
        return d.addCallback(_resumed, successor)

    def revoke(self, uid, token) -> defer.Deferred:
        if not (validUid(uid) and wellFormed(token)):
            return defer.succeed(False)
        return self._eval(REVOKE, uid, [tokenHash(token)]).addCallback(lambda found: int(found) == 1)

    def revokeAll(self, uid) -> defer.Deferred:
        if not validUid(uid):
            return defer.succeed(0)
        return self._eval(REVOKE_ALL, uid, []).addCallback(int)
