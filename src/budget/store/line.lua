-- One account's line and GCRA, shared by every replica: the rules of
-- src/budget/schedule.rs (read its module docs for the invariants), run
-- atomically on Redis' clock (TIME), so replicas whose clocks disagree still
-- share one schedule. Each call is one command on one account.
--
-- KEYS (one hash tag per account on a Cluster, so all live on one slot)
--   1 tat      string: GCRA theoretical arrival time, µs; absent: none
--   2 line     list: waiting ticket ids, in service order
--   3 tickets  hash: ticket id -> "<tag> <ready_at µs>"
--   4 lanes    hash: caller lane -> finish tag (weighted fair queueing)
--   5 vtime    string: tag of the ticket served last
--   6 held     hash: ticket id -> held until, µs (a request not yet left)
--   7 granted  sorted set: ticket id, scored by when granted (kept 10 s, so
--              a retried command whose answer was lost is answered again)
--
-- ARGV
--   1 command: admit | claim | leave | hold | left | pushback
--   2 interval T µs (>= 1)   3 burst (>= 1)   4 max wait µs
--   5 max queue              6 horizon µs     7 grace µs
--   8 ticket id (any command but pushback)
--   admit:    9 lane  10 weight (>= 1)  11 ready_in µs
--   leave:    9 channel: PUBLISHed the account name when the line moved
--             10 the account name
--   hold:     9 hold µs
--   left:     9 late (1) or not (0); 10, 11 as leave's 9, 10 (published
--             when the request held the line)
--   pushback: 9 wait µs
--
-- Answer {code, wait µs, clock_reset (0|1), refusal}
--   code 1 granted | 2 queued, slot at the latest in `wait` | 3 refused,
--   a slot in `wait`, refusal 1 queue full, 2 max wait, 3 deadline |
--   4 gone (not in line) | 0 done (leave, hold, left, pushback)
--
-- Invariants kept (schedule.rs): every waiting ticket's slot is at or
-- before its ready_at; grants T apart (burst 1) and none while a request is
-- held; grants in line order; a tat or hold beyond now + horizon is a clock
-- that stepped back and is reset to now + T (clock_reset = 1).

-- Redis < 5 replicates a script by its source, which forbids a write after
-- TIME; effects replication makes it safe (the default from 5, the only
-- mode from 7, where this call is a no-op).
if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cmd = ARGV[1]
local T = tonumber(ARGV[2])
local tau = (tonumber(ARGV[3]) - 1) * T
local max_wait = tonumber(ARGV[4])
local max_queue = tonumber(ARGV[5])
local horizon = tonumber(ARGV[6])
local grace = tonumber(ARGV[7])
local ticket = ARGV[8]
local K_TAT, K_LINE, K_TICKETS, K_LANES, K_VTIME, K_HELD, K_GRANTED =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local REMEMBER = 10000000
local NONE = -2 ^ 62

local function fmt(n)
  return string.format('%d', n)
end

-- Every key lives as long as anything in it can matter.
local function keep()
  local ttl = math.floor((horizon + max_wait) / 1000) + 60000
  for _, k in ipairs(KEYS) do
    redis.call('PEXPIRE', k, ttl)
  end
end

local tat = tonumber(redis.call('GET', K_TAT))
local held = {}
local held_max = NONE
local clock_reset = 0

-- tidy: drop what expired; a state beyond the horizon is a clock step back.
do
  local beyond = now + horizon
  local h = redis.call('HGETALL', K_HELD)
  for i = 1, #h, 2 do
    local until_ = tonumber(h[i + 1]) or 0
    if until_ > beyond then
      clock_reset = 1
    end
    if until_ > now then
      held[h[i]] = until_
    else
      redis.call('HDEL', K_HELD, h[i])
    end
  end
  if tat and tat > beyond then
    clock_reset = 1
  end
  if clock_reset == 1 then
    -- When the last grant was is lost with the clock: one may have just gone.
    tat = now + T
    redis.call('SET', K_TAT, fmt(tat))
    redis.call('DEL', K_HELD)
    held = {}
  end
  for _, until_ in pairs(held) do
    if until_ > held_max then
      held_max = until_
    end
  end
  redis.call('ZREMRANGEBYSCORE', K_GRANTED, '-inf', '(' .. fmt(now - REMEMBER))
  redis.call('ZREMRANGEBYSCORE', K_GRANTED, '(' .. fmt(now), '+inf')
end

-- The waiting tickets, in order, expired ones dropped.
local ids = redis.call('LRANGE', K_LINE, 0, -1)
local tags, ready = {}, {}
do
  local kept = {}
  if #ids > 0 then
    local data = redis.call('HMGET', K_TICKETS, unpack(ids))
    for i, id in ipairs(ids) do
      local tag, ready_at = string.match(data[i] or '', '^(%S+) (%S+)$')
      ready_at = tonumber(ready_at)
      if ready_at and ready_at >= now then
        kept[#kept + 1] = id
        tags[id] = tonumber(tag)
        ready[id] = ready_at
      else
        redis.call('LREM', K_LINE, 1, id)
        redis.call('HDEL', K_TICKETS, id)
      end
    end
  end
  ids = kept
end
if #ids == 0 and tat and tat <= now then
  tat = nil
  redis.call('DEL', K_TAT)
end

-- When position p (0-based) is due by the GCRA and the holds alone.
local function due(p)
  local gcra = tat and (tat - tau) or NONE
  local h = held_max > NONE and (held_max + T) or NONE
  local d = math.max(gcra, h)
  if d == NONE then
    return NONE
  end
  return d + p * T
end

local function slot(p)
  return math.max(now, due(p))
end

local function position(id)
  for i, x in ipairs(ids) do
    if x == id then
      return i - 1
    end
  end
  return nil
end

local function grant(id, tag)
  local base = tat and math.max(tat, now) or now
  tat = base + T
  redis.call('SET', K_TAT, fmt(tat))
  local vtime = tonumber(redis.call('GET', K_VTIME)) or 0
  if tag > vtime then
    redis.call('SET', K_VTIME, string.format('%.17g', tag))
  end
  redis.call('ZADD', K_GRANTED, fmt(now), id)
end

local function push_tat(at)
  local want = at + tau
  if not tat or want > tat then
    tat = want
    redis.call('SET', K_TAT, fmt(tat))
  end
end

local function remove(id)
  redis.call('LREM', K_LINE, 1, id)
  redis.call('HDEL', K_TICKETS, id)
  local p = position(id)
  if p then
    table.remove(ids, p + 1)
  end
end

local answer

if cmd == 'admit' then
  if redis.call('ZSCORE', K_GRANTED, ticket) then
    answer = {1, 0}
  elseif position(ticket) then
    answer = {2, slot(position(ticket)) - now}
  else
    local lane = ARGV[9]
    local weight = math.max(tonumber(ARGV[10]) or 1, 1)
    local ready_in = tonumber(ARGV[11])
    local vtime = tonumber(redis.call('GET', K_VTIME)) or 0
    local tag = math.max(vtime, tonumber(redis.call('HGET', K_LANES, lane)) or 0) + 1 / weight
    -- From the tail: pass every ticket with a later tag that can still
    -- afford one interval more.
    local at = #ids
    while at > 0 do
      local id = ids[at]
      if tags[id] <= tag or slot(at) > ready[id] then
        break
      end
      at = at - 1
    end
    local s = slot(at)
    local wait = s - now
    local refusal = nil
    if #ids >= max_queue then
      refusal = 1
    elseif wait > max_wait then
      refusal = 2
    elseif wait > ready_in then
      refusal = 3
    end
    if refusal then
      answer = {3, math.max(slot(#ids) - now, wait), 0, refusal}
    else
      redis.call('HSET', K_LANES, lane, string.format('%.17g', tag))
      if at == 0 and s <= now then
        grant(ticket, tag)
        answer = {1, 0}
      else
        redis.call('HSET', K_TICKETS, ticket, string.format('%.17g', tag) .. ' ' .. fmt(now + ready_in))
        if at == #ids then
          redis.call('RPUSH', K_LINE, ticket)
        else
          redis.call('LINSERT', K_LINE, 'BEFORE', ids[at + 1], ticket)
        end
        answer = {2, wait}
      end
      -- Lanes caught up with the virtual time need no entry (pruned now
      -- and then: the answer is the same with or without them).
      if redis.call('HLEN', K_LANES) > 2 * #ids + 16 then
        local lanes = redis.call('HGETALL', K_LANES)
        for i = 1, #lanes, 2 do
          if tonumber(lanes[i + 1]) <= vtime then
            redis.call('HDEL', K_LANES, lanes[i])
          end
        end
      end
    end
  end
elseif cmd == 'claim' then
  if redis.call('ZSCORE', K_GRANTED, ticket) then
    answer = {1, 0}
  else
    local p = position(ticket)
    if not p then
      answer = {4, 0}
    else
      -- Heads whose turn came and went unclaimed: their replica is gone.
      while p > 0 and now >= due(0) + grace do
        remove(ids[1])
        p = p - 1
      end
      local s = slot(p)
      if p > 0 then
        -- Someone ahead has not claimed yet; if this ticket's own slot has
        -- come, ask again one interval on, or when that one goes stale.
        local again = s
        if s <= now then
          again = math.min(due(0) + grace, now + T)
        end
        answer = {2, again - now}
      elseif s > now then
        answer = {2, s - now}
      else
        local tag = tags[ticket]
        remove(ticket)
        grant(ticket, tag)
        answer = {1, 0}
      end
    end
  end
elseif cmd == 'leave' then
  local moved = redis.call('HDEL', K_HELD, ticket) == 1
  if position(ticket) then
    remove(ticket)
    moved = true
  end
  if moved then
    redis.call('PUBLISH', ARGV[9], ARGV[10])
  end
  answer = {0, 0}
elseif cmd == 'hold' then
  local hold = math.min(math.max(tonumber(ARGV[9]) or 0, 0), horizon)
  local until_ = now + hold
  if not held[ticket] or held[ticket] < until_ then
    redis.call('HSET', K_HELD, ticket, fmt(until_))
  end
  answer = {0, 0}
elseif cmd == 'left' then
  local was_held = redis.call('HDEL', K_HELD, ticket) == 1
  if ARGV[9] == '1' then
    push_tat(now + T)
  end
  if was_held then
    redis.call('PUBLISH', ARGV[10], ARGV[11])
  end
  answer = {0, 0}
elseif cmd == 'pushback' then
  push_tat(now + math.min(math.max(tonumber(ARGV[9]) or 0, 0), horizon))
  answer = {0, 0}
else
  return redis.error_reply('line.lua: unknown command ' .. tostring(cmd))
end

keep()
answer[3] = clock_reset
answer[4] = answer[4] or 0
return answer
