-- Shared prelude of the semaphore scripts: the Go side prepends it to each of them before loading.
--
-- KEYS[1]  holders: sorted set of lease tokens, scored by lease deadline (ms of the Redis server clock)
-- KEYS[2]  waiters: sorted set of waiting tokens, scored by ticket (first come, first served)
-- KEYS[3]  ticket counter (INCR)
-- KEYS[4]  lost: sorted set of tokens whose lease expired, scored by the time it was reclaimed,
--          kept for expiry so that a release can tell an expired lease from one already released
-- ARGV[1]  prefix of the per-owner keys, inside the limiter's hash tag ("...{sem:NAME}:")
-- ARGV[2]  capacity
-- ARGV[3]  expiry in ms: lease length and idle lifetime of every key
-- ARGV[4]  owner id of the caller; every token is "<owner>:<sequence number>"
--
-- Per-owner keys are built from ARGV[1] and stay in the limiter's cluster slot:
--   <prefix>alive:<owner>  exists while the owner checks in, so a crashed owner's waiters are skipped
--   <prefix>wake:<owner>   list onto which a token is pushed when another owner admits it
local holders, waiters, tickets, lost = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local prefix = ARGV[1]
local capacity = tonumber(ARGV[2])
local expiry = tonumber(ARGV[3])
local caller = ARGV[4]

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
-- Lease deadline of a slot granted or renewed now. Written with %d because Redis may turn a Lua
-- number argument into exponent notation.
local deadline = string.format('%d', now + expiry)

local function alive_key(owner)
  return prefix .. 'alive:' .. owner
end

local function owner_of(token)
  return string.match(token, '^([^:]*):')
end

-- Leases whose deadline has passed belong to holders that stopped renewing (crashed or stalled).
local expired = redis.call('ZRANGEBYSCORE', holders, '-inf', now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', holders, '-inf', now)
  for _, token in ipairs(expired) do
    redis.call('ZADD', lost, now, token)
  end
  redis.call('ZREMRANGEBYSCORE', lost, '-inf', now - expiry)
  redis.call('PEXPIRE', lost, ARGV[3])
end

-- Moves waiters into the holders set in ticket order while there is room. Waiters of a caller
-- other than this one are told through their owner's wake list; the caller's own are returned,
-- so the Go side wakes them without a round trip.
--
-- A live owner refreshes its alive key every expiry/3, so the key always has more than 2/3 of
-- expiry left. An owner whose key has expiry/3 or less left has missed a check-in, and a crashed
-- one is in that state by the time its last lease runs out; its waiters are dropped (a live but
-- late owner enqueues them again at its next check-in). A waiter of another owner also gets a
-- lease that ends no later than that owner's alive key.
local function admit()
  local own = {}
  local free = capacity - redis.call('ZCARD', holders)
  while free > 0 do
    local head = redis.call('ZPOPMIN', waiters)
    if #head == 0 then
      break
    end
    local token = head[1]
    local owner = owner_of(token)
    local alive_ttl = owner and redis.call('PTTL', alive_key(owner)) or -2
    if alive_ttl > 0 and (owner == caller or alive_ttl > expiry / 3) then
      free = free - 1
      if owner == caller then
        redis.call('ZADD', holders, deadline, token)
        own[#own + 1] = token
      else
        redis.call('ZADD', holders, string.format('%d', now + math.min(expiry, alive_ttl)), token)
        local wake = prefix .. 'wake:' .. owner
        redis.call('RPUSH', wake, token)
        redis.call('PEXPIRE', wake, ARGV[3])
      end
    end
  end
  return own
end

-- Returns the ms left until the earliest lease deadline, or -1 when nobody holds a slot. A waiter
-- checks in at that moment, so a crashed holder's slot is reclaimed even if nobody releases.
local function next_deadline()
  local first = redis.call('ZRANGE', holders, 0, 0, 'WITHSCORES')
  if #first == 0 then
    return -1
  end
  return tonumber(first[2]) - now
end

-- Renews the idle lifetime of the shared keys: the caller's expiry, or longer while a lease of
-- a participant with a longer expiry lasts, so that a caller with a short expiry never deletes
-- the leases of others. PEXPIRE ignores keys that do not exist.
local function touch()
  local ttl = expiry
  local last = redis.call('ZRANGE', holders, -1, -1, 'WITHSCORES')
  if #last == 2 then
    ttl = math.max(ttl, tonumber(last[2]) - now)
  end
  ttl = string.format('%d', ttl)
  redis.call('PEXPIRE', holders, ttl)
  redis.call('PEXPIRE', waiters, ttl)
  redis.call('PEXPIRE', tickets, ttl)
end
