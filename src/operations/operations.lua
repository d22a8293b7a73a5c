-- One account's batch operations and pending requests (src/operations/redis.rs
-- describes the layout and the protocol). Every command is atomic on one
-- account; every key starts with KEYS[1] = <prefix>{<account>}:ops, so on a
-- Cluster they share the account's hash slot.
--
-- ARGV[1] is the command:
--   submit  now_us interval_us id owner rid fingerprint request...
--           -> {'created'|'existing', id}
--   hold    consumer lease_ms          -> 1 (held by consumer) | 0
--   release consumer                   -> 1 | 0
--   take    consumer                   -> {'item', entry, op, index, request,
--                                          owner, started (0|1)} | {'empty'} |
--                                          {'lost'} | {'busy'} (dropped some, ask again)
--   start   consumer op index          -> 'go' | 'cancelled' | 'lost' | 'gone'
--   finish  op index entry ok result now_us retention_ms -> 'ok'
--   cancel  op now_us retention_ms     -> 'ok' | 'missing'
--   delete  op                         -> 'deleted' | 'running' | 'missing'
--   list    owner before ('' newest) limit -> flat {id, FIELDS...} per operation
--
-- Numbers go back to Redis as strings formatted here: Lua's own conversion
-- would print large ones with an exponent.

local B = KEYS[1]
local QUEUE, LEASE, GROUP = B .. ':queue', B .. ':lease', 'drainers'
local FIELDS = {'owner', 'fp', 'total', 'ok', 'failed', 'create', 'eta', 'end',
                'cancel', 'cancel_from', 'done'}
local cmd = ARGV[1]

local function int(x) return string.format('%.0f', x) end
local function op_key(id) return B .. ':op:' .. id end
local function owner_key(owner) return B .. ':owner:' .. owner end
local function rid_key(rid) return B .. ':rid:' .. rid end

-- Every request has a result (cancelled ones counted): done, kept for the
-- retention; the owner's index forgets a few operations that expired.
local function settle(op, now, retention_ms)
  local f = redis.call('HMGET', op, 'total', 'ok', 'failed', 'done', 'rid', 'owner')
  local total, ok, failed = tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0
  if f[4] == '1' or ok + failed < total then return end
  redis.call('HSET', op, 'done', '1', 'end', now)
  redis.call('PEXPIRE', op, retention_ms)
  if f[5] and f[5] ~= '' then redis.call('PEXPIRE', rid_key(f[5]), retention_ms) end
  if f[6] then
    local index = owner_key(f[6])
    for _, id in ipairs(redis.call('ZRANGE', index, 0, 9)) do
      if redis.call('EXISTS', op_key(id)) == 0 then redis.call('ZREM', index, id) end
    end
  end
end

local function drop(entry)
  redis.call('XACK', QUEUE, GROUP, entry)
  redis.call('XDEL', QUEUE, entry)
end

if cmd == 'submit' then
  local now, interval, id, owner, rid, fp = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], ARGV[7]
  if rid ~= '' then
    local existing = redis.call('GET', rid_key(rid))
    if existing and redis.call('EXISTS', op_key(existing)) == 1 then
      return {'existing', existing}
    end
  end
  redis.pcall('XGROUP', 'CREATE', QUEUE, GROUP, '0', 'MKSTREAM')
  local ahead = redis.call('XLEN', QUEUE)
  local n = #ARGV - 7
  redis.call('HSET', op_key(id), 'owner', owner, 'fp', fp, 'rid', rid, 'total', int(n),
    'ok', '0', 'failed', '0', 'create', now, 'eta', int(tonumber(now) + (ahead + n) * interval),
    'cancel', '0', 'cancel_from', int(n), 'taken', '0', 'done', '0')
  for i = 1, n do
    redis.call('XADD', QUEUE, '*', 'op', id, 'i', int(i - 1), 'req', ARGV[7 + i])
  end
  redis.call('ZADD', owner_key(owner), '0', id)
  if rid ~= '' then redis.call('SET', rid_key(rid), id) end
  return {'created', id}

elseif cmd == 'hold' then
  local holder = redis.call('GET', LEASE)
  if holder == ARGV[2] then
    redis.call('PEXPIRE', LEASE, ARGV[3])
    return 1
  end
  if holder or redis.call('XLEN', QUEUE) == 0 then return 0 end
  redis.call('SET', LEASE, ARGV[2], 'PX', ARGV[3])
  return 1

elseif cmd == 'release' then
  if redis.call('GET', LEASE) == ARGV[2] then
    redis.call('DEL', LEASE)
    return 1
  end
  return 0

elseif cmd == 'take' then
  local me = ARGV[2]
  if redis.call('GET', LEASE) ~= me then return {'lost'} end
  for _ = 1, 100 do
    -- The oldest pending entry first (this consumer's own, or a dead
    -- holder's), else the next new one.
    local claimed = redis.pcall('XAUTOCLAIM', QUEUE, GROUP, me, '0', '0-0', 'COUNT', '1')
    if claimed.err then
      redis.pcall('XGROUP', 'CREATE', QUEUE, GROUP, '0', 'MKSTREAM')
      return {'empty'}
    end
    local entry = claimed[2][1]
    if not entry then
      local read = redis.call('XREADGROUP', 'GROUP', GROUP, me, 'COUNT', '1', 'STREAMS', QUEUE, '>')
      if not read then return {'empty'} end
      entry = read[1][2][1]
      if not entry then return {'empty'} end
    end
    local eid, fields, f = entry[1], entry[2], {}
    if type(fields) == 'table' then
      for k = 1, #fields, 2 do f[fields[k]] = fields[k + 1] end
    end
    local id, i = f['op'], tonumber(f['i'])
    if id and i and f['req'] then
      local op = op_key(id)
      local s = redis.call('HMGET', op, 'cancel', 'cancel_from', 'owner', 'taken')
      local cancelled = s[1] == '1' and i >= (tonumber(s[2]) or 0)
      if s[3] and not cancelled and redis.call('HEXISTS', op, 'r:' .. int(i)) == 0 then
        if i + 1 > (tonumber(s[4]) or 0) then redis.call('HSET', op, 'taken', int(i + 1)) end
        local started = redis.call('HEXISTS', op, 's:' .. int(i))
        return {'item', eid, id, int(i), f['req'], s[3], int(started)}
      end
    end
    -- Its operation is gone or cancelled before it, it has a result, or
    -- it is no request at all: dropped.
    drop(eid)
  end
  return {'busy'}

elseif cmd == 'start' then
  if redis.call('GET', LEASE) ~= ARGV[2] then return 'lost' end
  local op = op_key(ARGV[3])
  local cancel = redis.call('HGET', op, 'cancel')
  if not cancel then return 'gone' end
  if cancel == '1' then return 'cancelled' end
  redis.call('HSET', op, 's:' .. ARGV[4], '1')
  return 'go'

elseif cmd == 'finish' then
  local op, i = op_key(ARGV[2]), ARGV[3]
  if redis.call('EXISTS', op) == 1 and redis.call('HSETNX', op, 'r:' .. i, ARGV[6]) == 1 then
    redis.call('HINCRBY', op, ARGV[5] == '1' and 'ok' or 'failed', '1')
    redis.call('HDEL', op, 's:' .. i)
    settle(op, ARGV[7], ARGV[8])
  end
  drop(ARGV[4])
  return 'ok'

elseif cmd == 'cancel' then
  local op = op_key(ARGV[2])
  local s = redis.call('HMGET', op, 'done', 'cancel', 'taken', 'total')
  if not s[1] then return 'missing' end
  if s[1] == '1' or s[2] == '1' then return 'ok' end
  local taken, total = tonumber(s[3]) or 0, tonumber(s[4]) or 0
  redis.call('HSET', op, 'cancel', '1', 'cancel_from', int(taken))
  if total > taken then redis.call('HINCRBY', op, 'failed', int(total - taken)) end
  settle(op, ARGV[3], ARGV[4])
  return 'ok'

elseif cmd == 'delete' then
  local id = ARGV[2]
  local s = redis.call('HMGET', op_key(id), 'done', 'owner', 'rid')
  if not s[1] then return 'missing' end
  if s[1] ~= '1' then return 'running' end
  redis.call('DEL', op_key(id))
  if s[3] and s[3] ~= '' and redis.call('GET', rid_key(s[3])) == id then
    redis.call('DEL', rid_key(s[3]))
  end
  if s[2] then redis.call('ZREM', owner_key(s[2]), id) end
  return 'deleted'

elseif cmd == 'list' then
  local index, limit = owner_key(ARGV[2]), tonumber(ARGV[4])
  local from = ARGV[3] == '' and '+' or ('(' .. ARGV[3])
  local out, found = {}, 0
  while found < limit do
    local ids = redis.call('ZREVRANGEBYLEX', index, from, '-', 'LIMIT', '0', int(limit))
    if #ids == 0 then break end
    for _, id in ipairs(ids) do
      from = '(' .. id
      local f = redis.call('HMGET', op_key(id), unpack(FIELDS))
      if f[1] then
        out[#out + 1] = id
        for k = 1, #FIELDS do out[#out + 1] = f[k] or '' end
        found = found + 1
        if found >= limit then break end
      else
        redis.call('ZREM', index, id)
      end
    end
  end
  return out
end

return redis.error_reply('unknown command ' .. tostring(cmd))
