-- First charges: POST /v1/orders/o<thread>_<n>/deduct, each id once, in creation order.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
-- PG_START: skip the first ids of each thread (charged by an earlier run).
local start = tonumber(os.getenv("PG_START") or "0")
function request()
  local id = "o" .. tid .. "_" .. (start + n)
  n = n + 1
  return wrk.format("POST", "/v1/orders/" .. id .. "/deduct")
end
