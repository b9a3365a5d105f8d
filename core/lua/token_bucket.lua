-- Token bucket acquire: takes one token now or reserves the next one to be refilled.
--
-- KEYS[1]  bucket state: hash with "tokens" (negative while future tokens are reserved) and
--          "refilled" (time of the last refill, us of the Redis server clock)
-- ARGV[1]  capacity
-- ARGV[2]  refill period in us
-- ARGV[3]  tokens added per refill
-- ARGV[4]  maximum wait in us, or 0 for no limit
--
-- Returns {granted, wait}: granted 1 with the wait in us until the reserved token exists (0 when
-- one was available), or granted 0 with the wait that would have been needed, when it exceeds
-- the maximum; the bucket is then left unchanged.
--
-- A bucket that does not exist is full, and the key expires once the bucket would be full again,
-- so an idle bucket leaves no key behind. Numbers are written with %d because Redis may turn a Lua
-- number argument into exponent notation, which PEXPIRE rejects and which loses digits.
local key = KEYS[1]
local capacity = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local tokens = capacity
local refilled = now
local state = redis.call('HMGET', key, 'tokens', 'refilled')
if state[1] and state[2] then
  tokens = tonumber(state[1])
  refilled = tonumber(state[2])
  local periods = math.floor((now - refilled) / period)
  if periods > 0 then
    tokens = math.min(capacity, tokens + periods * amount)
    refilled = refilled + periods * period
  end
end

local wait = 0
if tokens < 1 then
  -- This caller needs the (1 - tokens)-th token still to come; refills bring amount at a time.
  local refills = math.ceil((1 - tokens) / amount)
  wait = refilled + refills * period - now
  if max_wait > 0 and wait > max_wait then
    return {0, wait}
  end
end
tokens = tokens - 1

local full_at = refilled + math.ceil((capacity - tokens) / amount) * period
redis.call('HSET', key, 'tokens', string.format('%d', tokens), 'refilled', string.format('%d', refilled))
redis.call('PEXPIRE', key, string.format('%d', math.ceil((full_at - now) / 1000) + 1))
return {1, wait}
