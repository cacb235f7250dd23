-- Replays: deducts of orders already PAID, cycling over the first PG_REPLAY_OF ids
-- of each thread (run after deduct.lua charged at least that many).
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
local of = tonumber(os.getenv("PG_REPLAY_OF") or "5000")
function request()
  -- From 1: wrk builds (and drops) one request per thread before it connects,
  -- so id 0 of each thread was never sent by create.lua.
  local id = "o" .. tid .. "_" .. (1 + n % of)
  n = n + 1
  return wrk.format("POST", "/v1/orders/" .. id .. "/deduct")
end
