-- GCRA for one account, checked and advanced atomically on Redis' clock.
-- Every replica of the gateway asks this script, and the script reads the time
-- with TIME, so there is one clock for all of them: replica clocks may
-- disagree freely without breaking the budget.
--
-- KEYS[1]  the account's TAT (theoretical arrival time), in microseconds on
--          Redis' clock. A missing key means "no constraint": the key expires
--          once its TAT is past, so an idle account costs nothing.
-- ARGV[1]  emission interval T, microseconds (> 0)
-- ARGV[2]  burst: slots that may go back to back after idling (>= 1)
-- ARGV[3]  0 to take a slot; > 0 is an upstream pushback: no slot before
--          now + ARGV[3] microseconds, for every replica
--
-- Returns {1, 0} when the slot is taken now, else {0, wait}: the next slot is
-- `wait` microseconds away (a pushback answers {0, wait} too).

-- Redis < 5 replicates a script by its source, which forbids a write after
-- TIME; effects replication makes it safe (the default from 5, the only mode
-- from 7, where this call is a no-op).
if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = (tonumber(ARGV[2]) - 1) * interval
local pushback = tonumber(ARGV[3])

-- GET answers false for a missing key; anything unreadable counts as missing.
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then
  tat = now
end

local function store(value)
  -- Kept until its TAT is past (plus a second of slack): after that the key
  -- and its absence mean the same. %d keeps all digits (tostring would not).
  local ttl_ms = math.ceil((value - now) / 1000) + 1000
  redis.call('SET', KEYS[1], string.format('%d', value), 'PX', ttl_ms)
end

if pushback > 0 then
  local hold = now + pushback + tau
  if hold > tat then
    tat = hold
    store(tat)
  end
  return {0, tat - tau - now}
end

local allowed_at = tat - tau
if now < allowed_at then
  return {0, allowed_at - now}
end
store(tat + interval)
return {1, 0}
