-- One account's line and GCRA, shared by every replica: the rules of
-- src/budget/schedule.rs (read its module docs for the invariants), run
-- atomically on Redis' clock (TIME), so replicas whose clocks disagree still
-- share one schedule. Each call is one command on one account. Kept to a
-- few Redis calls per command: a free slot costs TIME, GET and SET.
--
-- KEYS (one hash tag per account on a Cluster, so both live on one slot)
--   1 state  string "tat|vtime|recent|held|n":
--            tat     GCRA theoretical arrival time, µs (empty: none; a bare
--                    number is a tat alone)
--            vtime   the fair-share tag of the ticket served last
--            recent  the last 16 granted tickets, comma-separated (a retried
--                    command whose answer was lost is answered again)
--            held    ticket=until,… requests held up on their way out
--            n       tickets waiting (the line is read only when n > 0)
--   2 line   list: waiting tickets in service order, each
--            "<ticket>\t<tag>\t<ready_at µs>\t<lane>"
--
-- ARGV
--   1 command: admit | claim | leave | hold | left | pushback
--   2 interval T µs (>= 1)   3 burst (>= 1)   4 max wait µs
--   5 max queue              6 horizon µs     7 grace µs
--   8 ticket id (any command but pushback; no ',', '=', '|' or tab)
--   admit:    9 lane  10 weight (>= 1)  11 ready_in µs  12 background:
--             1 = granted only with the line empty and the slot free now,
--             never queued (refused 3 with when a slot would come); 0 = a call
--   leave:    9 channel, PUBLISHed 10 the account name when the line moved
--   hold:     9 hold µs
--   left:     9 late (1) or not (0); 10, 11 as leave's 9, 10 (published
--             when the request held the line)
--   pushback: 9 wait µs
--
-- Answer {code, wait µs, clock_reset (0|1), refusal}
--   code 1 granted | 2 queued, slot at the latest in `wait` | 3 refused,
--   refusal 1 queue full, 2 max wait, 3 deadline; `wait`: when a caller
--   coming back with the same deadline could be admitted |
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
local K_STATE, K_LINE = KEYS[1], KEYS[2]
local RECENT = 16
local NONE = -2 ^ 62
local TTL = math.floor((horizon + max_wait) / 1000) + 60000

local function fmt(n)
  return string.format('%d', n)
end

local function split(s, sep)
  local out = {}
  for part in string.gmatch(s, '([^' .. sep .. ']+)') do
    out[#out + 1] = part
  end
  return out
end

-- The state.
local fields = {}
for field in string.gmatch((redis.call('GET', K_STATE) or '') .. '|', '([^|]*)|') do
  fields[#fields + 1] = field
end
local tat = tonumber(fields[1] or '')
local vtime = tonumber(fields[2] or '') or 0
local recent = split(fields[3] or '', ',')
local held = {}
for _, pair in ipairs(split(fields[4] or '', ',')) do
  local id, until_ = string.match(pair, '^(.*)=(%d+)$')
  if id then
    held[id] = tonumber(until_)
  end
end
local n = tonumber(fields[5] or '') or 0
local dirty = false
local clock_reset = 0

-- tidy: drop what expired; a state beyond the horizon is a clock step back.
do
  local beyond = now + horizon
  if tat and tat > beyond then
    clock_reset = 1
  end
  for id, until_ in pairs(held) do
    if until_ > beyond then
      clock_reset = 1
    end
    if until_ <= now then
      held[id] = nil
      dirty = true
    end
  end
  if clock_reset == 1 then
    -- When the last grant was is lost with the clock: one may have just gone.
    tat = now + T
    held = {}
    dirty = true
  end
end
local held_max = NONE
for _, until_ in pairs(held) do
  if until_ > held_max then
    held_max = until_
  end
end

-- The waiting tickets, in order, expired ones dropped: kept until
-- min(T/2, 50 ms) past their ready_at (schedule.rs, claim_late), so a claim
-- that comes a few ms after a slot at exactly ready_at still finds it.
local late = math.min(math.floor(T / 2), 50000)
local line = {}
if n > 0 then
  for _, entry in ipairs(redis.call('LRANGE', K_LINE, 0, -1)) do
    local id, tag, ready_at, lane = string.match(entry, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
    ready_at = tonumber(ready_at)
    if id and ready_at and ready_at + late >= now then
      line[#line + 1] = {id = id, tag = tonumber(tag), ready_at = ready_at, lane = lane, entry = entry}
    else
      redis.call('LREM', K_LINE, 1, entry)
    end
  end
  if #line ~= n then
    n = #line
    dirty = true
  end
end
if n == 0 and tat and tat <= now then
  tat = nil
  dirty = true
end

-- When position p (0-based) is due by the GCRA and the holds alone.
local function due(p)
  local d = math.max(tat and (tat - tau) or NONE, held_max > NONE and (held_max + T) or NONE)
  if d == NONE then
    return NONE
  end
  return d + p * T
end

local function slot(p)
  return math.max(now, due(p))
end

local function position(id)
  for i, x in ipairs(line) do
    if x.id == id then
      return i - 1
    end
  end
  return nil
end

local function granted(id)
  for _, x in ipairs(recent) do
    if x == id then
      return true
    end
  end
  return false
end

local function grant(id, tag)
  tat = (tat and math.max(tat, now) or now) + T
  if tag > vtime then
    vtime = tag
  end
  recent[#recent + 1] = id
  if #recent > RECENT then
    table.remove(recent, 1)
  end
  dirty = true
end

local function push_tat(at)
  local want = at + tau
  if not tat or want > tat then
    tat = want
    dirty = true
  end
end

-- Takes the ticket at position p (0-based) out of the line.
local function remove(p)
  local x = table.remove(line, p + 1)
  redis.call('LREM', K_LINE, 1, x.entry)
  n = n - 1
  dirty = true
  return x
end

local answer

if cmd == 'admit' then
  if granted(ticket) then
    answer = {1, 0}
  elseif position(ticket) then
    answer = {2, slot(position(ticket)) - now}
  elseif ARGV[12] == '1' then
    -- Background: only a slot no waiting ticket can use.
    local s = slot(#line)
    if #line == 0 and s <= now then
      grant(ticket, vtime)
      answer = {1, 0}
    else
      answer = {3, math.max(s - now, 1), 0, 3}
    end
  else
    local lane = ARGV[9]
    local weight = math.max(tonumber(ARGV[10]) or 1, 1)
    local ready_in = tonumber(ARGV[11])
    -- The lane's finish tag: its last ticket waiting, or the virtual time.
    local last = vtime
    for _, x in ipairs(line) do
      if x.lane == lane and x.tag > last then
        last = x.tag
      end
    end
    local tag = last + 1 / weight
    -- From the tail: pass every ticket with a later tag that can still
    -- afford one interval more.
    local at = #line
    while at > 0 do
      local x = line[at]
      if x.tag <= tag or slot(at) > x.ready_at then
        break
      end
      at = at - 1
    end
    local s = slot(at)
    local wait = s - now
    local refusal = nil
    if #line >= max_queue then
      refusal = 1
    elseif wait > max_wait then
      refusal = 2
    elseif wait > ready_in then
      refusal = 3
    end
    if refusal then
      -- When a caller coming back with the same deadline could be admitted
      -- (schedule.rs, come_back): the tail's slot less what its deadline or
      -- max wait allows; for a full line, when its head is served.
      local back = math.max(slot(#line) - now, wait)
      if refusal == 3 then
        back = back - math.max(ready_in, 0)
      elseif refusal == 2 then
        back = back - max_wait
      else
        back = slot(0) - now
      end
      answer = {3, math.max(back, 0), 0, refusal}
    elseif at == 0 and s <= now then
      grant(ticket, tag)
      answer = {1, 0}
    else
      local entry = ticket .. '\t' .. string.format('%.17g', tag) .. '\t' .. fmt(now + ready_in) .. '\t' .. lane
      if at == #line then
        redis.call('RPUSH', K_LINE, entry)
      else
        redis.call('LINSERT', K_LINE, 'BEFORE', line[at + 1].entry, entry)
      end
      redis.call('PEXPIRE', K_LINE, TTL)
      n = n + 1
      dirty = true
      answer = {2, wait}
    end
  end
elseif cmd == 'claim' then
  if granted(ticket) then
    answer = {1, 0}
  else
    local p = position(ticket)
    if not p then
      answer = {4, 0}
    else
      -- Heads whose turn came and went unclaimed: their replica is gone.
      while p > 0 and now >= due(0) + grace do
        remove(0)
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
        local x = remove(0)
        grant(x.id, x.tag)
        answer = {1, 0}
      end
    end
  end
elseif cmd == 'leave' then
  local moved = false
  if held[ticket] then
    held[ticket] = nil
    dirty = true
    moved = true
  end
  local p = position(ticket)
  if p then
    remove(p)
    moved = true
  end
  if moved then
    redis.call('PUBLISH', ARGV[9], ARGV[10])
  end
  answer = {0, 0}
elseif cmd == 'hold' then
  local until_ = now + math.min(math.max(tonumber(ARGV[9]) or 0, 0), horizon)
  if not held[ticket] or held[ticket] < until_ then
    held[ticket] = until_
    dirty = true
  end
  answer = {0, 0}
elseif cmd == 'left' then
  local was_held = held[ticket] ~= nil
  held[ticket] = nil
  if was_held then
    dirty = true
  end
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

if dirty then
  local pairs_ = {}
  for id, until_ in pairs(held) do
    pairs_[#pairs_ + 1] = id .. '=' .. fmt(until_)
  end
  local state = (tat and fmt(tat) or '') .. '|' .. string.format('%.17g', vtime) .. '|'
    .. table.concat(recent, ',') .. '|' .. table.concat(pairs_, ',') .. '|' .. fmt(n)
  redis.call('SET', K_STATE, state, 'PX', TTL)
end
answer[3] = clock_reset
answer[4] = answer[4] or 0
return answer
