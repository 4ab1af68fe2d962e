"""
The Lua scripts of the Redis presence and relay (see L{chatproto.redispresence}
for the keys they use).  Each read-decide-write is one script, so there is no
check-then-act window.  Every script takes the key prefix as ARGV[1].
"""

# Shared by the scripts: the server part of a presence entry when that
# server is alive (memoised per call in `live`), else nil.
_LIVE_OWNER = """
local function liveOwner(P, value, live)
  if not value then return nil end
  local tab = string.find(value, '\\t', 1, true)
  if not tab then return nil end
  local srv = string.sub(value, 1, tab - 1)
  local alive = live[srv]
  if alive == nil then
    alive = redis.call('EXISTS', P .. 'server:' .. srv) == 1
    live[srv] = alive
  end
  if alive then return srv end
  return nil
end
"""

#: ARGV: prefix, me, uid, session, replace ("1"/"0").
#: Returns {-1} (this server is not registered), {0, owner} (lost to a live
#: owner) or {1, previous live owner or ""}.
CLAIM = (
    _LIVE_OWNER
    + """
local P, me, uid, sess, replace = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local mine = P .. 'server:' .. me
if redis.call('EXISTS', mine) == 0 then return {-1, ''} end
local key = P .. 'user:' .. uid
local value = me .. '\\t' .. sess
local current = redis.call('GET', key)
if current == value then return {1, ''} end
local owner = liveOwner(P, current, {})
if owner and replace ~= '1' then return {0, current} end
redis.call('SET', key, value)
if owner ~= me then
  redis.call('HINCRBY', mine, 'logins', 1)
  if owner then redis.call('HINCRBY', P .. 'server:' .. owner, 'logins', -1) end
end
if owner then return {1, current} end
return {1, ''}
"""
)

#: ARGV: prefix, me, uid, session.  Compare-and-delete; returns 1 if removed.
RELEASE = """
local P, me, uid, sess = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = P .. 'user:' .. uid
if redis.call('GET', key) ~= me .. '\\t' .. sess then return 0 end
redis.call('DEL', key)
local mine = P .. 'server:' .. me
if redis.call('EXISTS', mine) == 1 then redis.call('HINCRBY', mine, 'logins', -1) end
return 1
"""

#: ARGV: prefix, uid...  Returns one entry per uid ("" when offline).
LOCATE = (
    _LIVE_OWNER
    + """
local P, live, out = ARGV[1], {}, {}
for i = 2, #ARGV do
  local value = redis.call('GET', P .. 'user:' .. ARGV[i])
  if liveOwner(P, value, live) then out[i - 1] = value else out[i - 1] = '' end
end
return out
"""
)

#: ARGV: prefix, name, host, port, weight, logins, updated, ttl (ms).
#: Returns 1 if the hash existed, 0 if it was (re)created: this server had
#: been forgotten (Redis restarted, or this server was cut off past the TTL).
REGISTER = """
local P, name = ARGV[1], ARGV[2]
local key = P .. 'server:' .. name
local existed = redis.call('EXISTS', key)
redis.call('HSET', key, 'name', name, 'host', ARGV[3], 'port', ARGV[4], 'weight', ARGV[5],
           'logins', ARGV[6], 'updated', ARGV[7])
redis.call('PEXPIRE', key, ARGV[8])
local servers = P .. 'servers'
redis.call('SADD', servers, name)
for _, other in ipairs(redis.call('SMEMBERS', servers)) do
  if redis.call('EXISTS', P .. 'server:' .. other) == 0 then redis.call('SREM', servers, other) end
end
return existed
"""

#: ARGV: prefix, name.
DEREGISTER = """
redis.call('DEL', ARGV[1] .. 'server:' .. ARGV[2])
redis.call('SREM', ARGV[1] .. 'servers', ARGV[2])
return 1
"""

#: ARGV: prefix, me, uid1, session1, uid2, session2...  Re-asserts this
#: server's sessions; returns the uids now owned by another live server.
REASSERT = (
    _LIVE_OWNER
    + """
local P, me, live, lost = ARGV[1], ARGV[2], {}, {}
for i = 3, #ARGV, 2 do
  local key = P .. 'user:' .. ARGV[i]
  local owner = liveOwner(P, redis.call('GET', key), live)
  if owner and owner ~= me then
    lost[#lost + 1] = ARGV[i]
  else
    redis.call('SET', key, me .. '\\t' .. ARGV[i + 1])
  end
end
return lost
"""
)

#: Returns the HGETALL of every live server.
SERVERS = """
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', ARGV[1] .. 'servers')) do
  local fields = redis.call('HGETALL', ARGV[1] .. 'server:' .. name)
  if #fields > 0 then out[#out + 1] = fields end
end
return out
"""

#: ARGV: prefix, batch.  The batch has one line per delivery:
#: C{STORE UIDS <TAB> MESSAGE <LF>}, STORE "1" or "0", UIDS comma-separated,
#: MESSAGE the JSON text (which holds no raw TAB or LF).  Looks every uid
#: up, PUBLISHes one JSON array per owning server, and returns the uids
#: nobody took (offline, dead server, or no subscriber on its channel) as
#: one string C{"INDEX:UID,UID;..."} (INDEX 1-based, only deliveries with
#: misses).
RELAY = (
    _LIVE_OWNER
    + """
local P = ARGV[1]
local live, missed, records, routes, order = {}, {}, {}, {}, {}
local d = 0
for store, uidlist, message in string.gmatch(ARGV[2], '([01])([^\\t]*)\\t([^\\n]*)\\n') do
  d = d + 1
  local lost, targets, servers = {}, {}, {}
  for uid in string.gmatch(uidlist, '[^,]+') do
    local srv = liveOwner(P, redis.call('GET', P .. 'user:' .. uid), live)
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
    r[#r + 1] = '[' .. store .. ',[' .. table.concat(uids, ',') .. '],' .. message .. ']'
    local rt = routes[srv]
    rt[#rt + 1] = {d, uids}
  end
end
for _, srv in ipairs(order) do
  local payload = '[' .. table.concat(records[srv], ',') .. ']'
  if redis.call('PUBLISH', P .. 'relay:' .. srv, payload) == 0 then
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
