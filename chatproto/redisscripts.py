"""
The Lua scripts of the Redis presence and relay (see L{chatproto.rediscluster}
for the keys they use).  Each read-decide-write is one script, so there is no
check-then-act window.

Every key a script reads or writes is passed in C{KEYS} (never built from
C{ARGV} inside the script), so proxies that route by key, and Redis Cluster
with a hash-tagged prefix, see every key.  Channel names (pub/sub is not
keyed) are built from the relay prefix in C{ARGV}.

Liveness: C{P live} is a HASH C{server name -> deadline} (milliseconds of
the Redis server's C{TIME}); a server is alive while its deadline is in the
future.  It is written with the registry entry (same TTL), so the scripts
never need to touch another server's keys to know whether it lives.
"""

# Shared by the scripts: the time on the Redis server, and the server part of
# a presence entry when that server is alive (memoised per call in `live`),
# else nil.  liveKey is the `P live` hash.
_LIVE_OWNER = """
local function nowMs()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function isLive(liveKey, srv, live, now)
  local alive = live[srv]
  if alive == nil then
    local deadline = tonumber(redis.call('HGET', liveKey, srv) or '')
    alive = deadline ~= nil and deadline > now
    live[srv] = alive
  end
  return alive
end
local function liveOwner(liveKey, value, live, now)
  if not value then return nil end
  local tab = string.find(value, '\\t', 1, true)
  if not tab then return nil end
  local srv = string.sub(value, 1, tab - 1)
  if isLive(liveKey, srv, live, now) then return srv end
  return nil
end
"""

#: KEYS: P live, P server:ME, P user:UID, P server:PREVIOUS.  ARGV: me,
#: session, replace ("1"/"0"), relay channel prefix (C{P relay:}), the
#: server the caller expects as the previous owner ("" at first).
#: Returns {-1, ""} (this server is not registered), {0, owner} (lost to a
#: live owner), {2, owner} (the owner is another server than expected:
#: call again naming it, so that its C{logins} can move), {3, owner} (won
#: from an owner whose server is registered but has nobody subscribed to
#: its channel: killed and its entry not expired yet, or its subscriber is
#: reconnecting; a kick would reach nobody, and that server's own check
#: closes the session if it comes back) or {1, previous owner or ""}.  An
#: owner not listening never blocks a login, in reject mode either, and
#: its server's C{logins} is not moved here (its own next refresh rewrites
#: it, or the hash expires with the server), so a reconnect storm after a
#: server died costs one call per login.
CLAIM = (
    _LIVE_OWNER
    + """
local liveKey, mine, key = KEYS[1], KEYS[2], KEYS[3]
local me, sess, replace, relay = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now = nowMs()
if not isLive(liveKey, me, {}, now) then return {-1, ''} end
local value = me .. '\\t' .. sess
local current = redis.call('GET', key)
if current == value then return {1, ''} end
local owner = liveOwner(liveKey, current, {}, now)
local listening = true
if owner and owner ~= me then
  listening = redis.call('PUBSUB', 'NUMSUB', relay .. owner)[2] > 0
end
if owner and listening and replace ~= '1' then return {0, current} end
if owner and listening and owner ~= me and ARGV[5] ~= owner then
  -- The previous owner's hash is not in KEYS: the caller calls again with it.
  return {2, current}
end
redis.call('SET', key, value)
if owner ~= me then
  if redis.call('EXISTS', mine) == 1 then redis.call('HINCRBY', mine, 'logins', 1) end
  if owner and listening and redis.call('EXISTS', KEYS[4]) == 1 then redis.call('HINCRBY', KEYS[4], 'logins', -1) end
end
if owner and not listening then return {3, current} end
if owner then return {1, current} end
return {1, ''}
"""
)

#: KEYS: P server:ME, P user:UID.  ARGV: me, session.  Compare-and-delete;
#: returns 1 if removed.
RELEASE = """
local mine, key = KEYS[1], KEYS[2]
if redis.call('GET', key) ~= ARGV[1] .. '\\t' .. ARGV[2] then return 0 end
redis.call('DEL', key)
if redis.call('EXISTS', mine) == 1 then redis.call('HINCRBY', mine, 'logins', -1) end
return 1
"""

#: KEYS: P live, P user:UID...  Returns one entry per user ("" when
#: offline).
LOCATE = (
    _LIVE_OWNER
    + """
local live, out, now = {}, {}, nowMs()
for i = 2, #KEYS do
  local value = redis.call('GET', KEYS[i])
  if liveOwner(KEYS[1], value, live, now) then out[i - 1] = value else out[i - 1] = '' end
end
return out
"""
)

#: KEYS: P server:NAME, P servers, P live.  ARGV: name, host, port, weight,
#: logins, updated, ttl (ms).  Returns 1 if this server was registered and
#: alive, 0 if it was (re)created: this server had been forgotten (Redis
#: restarted or failed over, or this server was cut off past the TTL).
#: Servers whose deadline has passed leave C{P servers} and C{P live}.
REGISTER = (
    _LIVE_OWNER
    + """
local key, servers, liveKey = KEYS[1], KEYS[2], KEYS[3]
local name, ttl = ARGV[1], tonumber(ARGV[7])
local now = nowMs()
local existed = 0
if redis.call('EXISTS', key) == 1 and isLive(liveKey, name, {}, now) then existed = 1 end
redis.call('HSET', key, 'name', name, 'host', ARGV[2], 'port', ARGV[3], 'weight', ARGV[4],
           'logins', ARGV[5], 'updated', ARGV[6])
redis.call('PEXPIRE', key, ttl)
redis.call('SADD', servers, name)
redis.call('HSET', liveKey, name, now + ttl)
local entries = redis.call('HGETALL', liveKey)
for i = 1, #entries, 2 do
  if tonumber(entries[i + 1]) == nil or tonumber(entries[i + 1]) <= now then
    redis.call('HDEL', liveKey, entries[i])
    redis.call('SREM', servers, entries[i])
  end
end
for _, other in ipairs(redis.call('SMEMBERS', servers)) do
  if redis.call('HEXISTS', liveKey, other) == 0 then redis.call('SREM', servers, other) end
end
return existed
"""
)

#: KEYS: P server:NAME, P servers, P live.  ARGV: name.  Announces that
#: this server is gone: from now on its users count as offline everywhere.
DEREGISTER = """
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

#: KEYS: P live, P user:UID1, P user:UID2...  ARGV: me, uid1, session1,
#: uid2, session2...  Checks this server's sessions against presence: an entry
#: that is missing or names a dead server is written again (Redis lost it:
#: restart, failover); an entry of another live server means the account was
#: taken there (a kick may have been lost).  Returns the uids of those.  An entry naming another session of this server is left alone
#: (a newer login here is under way).
REASSERT = (
    _LIVE_OWNER
    + """
local me, live, lost, now = ARGV[1], {}, {}, nowMs()
for i = 2, #KEYS do
  local owner = liveOwner(KEYS[1], redis.call('GET', KEYS[i]), live, now)
  if owner == nil then
    redis.call('SET', KEYS[i], me .. '\\t' .. ARGV[2 * i - 1])
  elseif owner ~= me then
    lost[#lost + 1] = ARGV[2 * i - 2]
  end
end
return lost
"""
)

#: KEYS: P live, P user:UID... (one per distinct uid of the batch, in the
#: order of ARGV[3]).  ARGV: relay channel prefix, batch, distinct uids
#: (comma-separated), the sending server's name as a JSON string (optional:
#: each record names it, so that the receiver confirms to it; see
#: L{chatproto.acks}).  The batch has one line per delivery:
#: C{STORE UIDS <TAB> MESSAGE <LF>}, STORE "1" or "0", UIDS comma-separated,
#: MESSAGE the JSON text (which holds no raw TAB or LF).  Looks every uid
#: up, PUBLISHes one JSON array per owning server, and returns the uids
#: nobody took (offline, dead server, or no subscriber on its channel) as
#: one string C{"INDEX:UID,UID;..."} (INDEX 1-based, only deliveries with
#: misses).
RELAY = (
    _LIVE_OWNER
    + """
local relay = ARGV[1]
local origin = ARGV[4] or 'null'
local liveKey = KEYS[1]
local now = nowMs()
local keyOf, k = {}, 2
for uid in string.gmatch(ARGV[3], '[^,]+') do
  keyOf[uid] = KEYS[k]
  k = k + 1
end
local live, missed, records, routes, order = {}, {}, {}, {}, {}
local d = 0
for store, uidlist, message in string.gmatch(ARGV[2], '([01])([^\\t]*)\\t([^\\n]*)\\n') do
  d = d + 1
  local lost, targets, servers = {}, {}, {}
  for uid in string.gmatch(uidlist, '[^,]+') do
    local key = keyOf[uid]
    local srv = nil
    if key then srv = liveOwner(liveKey, redis.call('GET', key), live, now) end
    if srv then
      local t = targets[srv]
      if not t then
        t = {}
        targets[srv] = t
        servers[#servers + 1] = srv
      end
      t[#t + 1] = uid
    else
      lost[#lost + 1] = uid
    end
  end
  if #lost > 0 then missed[d] = lost end
  for _, srv in ipairs(servers) do
    local uids = targets[srv]
    if not records[srv] then
      records[srv] = {}
      routes[srv] = {}
      order[#order + 1] = srv
    end
    local r = records[srv]
    r[#r + 1] = '[' .. store .. ',[' .. table.concat(uids, ',') .. '],' .. message .. ',' .. origin .. ']'
    local rt = routes[srv]
    rt[#rt + 1] = {d, uids}
  end
end
for _, srv in ipairs(order) do
  local payload = '[' .. table.concat(records[srv], ',') .. ']'
  if redis.call('PUBLISH', relay .. srv, payload) == 0 then
    for _, route in ipairs(routes[srv]) do
      local lost = missed[route[1]]
      if not lost then
        lost = {}
        missed[route[1]] = lost
      end
      for _, uid in ipairs(route[2]) do lost[#lost + 1] = uid end
    end
  end
end
local out = {}
for index, lost in pairs(missed) do out[#out + 1] = index .. ':' .. table.concat(lost, ',') end
return table.concat(out, ';')
"""
)


# --- KEYS and ARGV of each script ------------------------------------------
#
# The callers pass each script the arguments they know (a server name,
# uids, sessions); these build the KEYS and ARGV the script takes, so that
# the key layout lives in one place.


def _user(P: str, uid) -> str:
    return f"{P}user:{uid}"


def _claimCall(P, args):
    me, uid, session, replace, *previous = args
    previous = previous[0] if previous else ""
    keys = [f"{P}live", f"{P}server:{me}", _user(P, uid), f"{P}server:{previous or me}"]
    return keys, [me, session, replace, f"{P}relay:", previous]


def _releaseCall(P, args):
    me, uid, session = args
    return [f"{P}server:{me}", _user(P, uid)], [me, session]


def _locateCall(P, uids):
    return [f"{P}live", *(_user(P, uid) for uid in uids)], []


def _registryCall(P, args):
    return [f"{P}server:{args[0]}", f"{P}servers", f"{P}live"], list(args)


def _reassertCall(P, args):
    me, pairs = args[0], args[1:]
    return [f"{P}live", *(_user(P, uid) for uid in pairs[::2])], [me, *pairs]


def _relayCall(P, args):
    batch, *origin = args
    seen: dict[str, None] = {}
    for line in batch.split("\n"):
        if line:
            for uid in line[1 : line.index("\t")].split(","):
                if uid:
                    seen[uid] = None
    uids = list(seen)
    return [f"{P}live", *(_user(P, uid) for uid in uids)], [f"{P}relay:", batch, ",".join(uids), *origin]


_CALLS = {
    CLAIM: _claimCall,
    RELEASE: _releaseCall,
    LOCATE: _locateCall,
    REGISTER: _registryCall,
    DEREGISTER: _registryCall,
    REASSERT: _reassertCall,
    RELAY: _relayCall,
}


def scriptCall(script: str, prefix: str, args) -> tuple[list[str], list]:
    """The C{(KEYS, ARGV)} of C{script} for the caller's C{args}."""
    return _CALLS[script](prefix, list(args))
