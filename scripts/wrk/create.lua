-- POST /v1/orders with fresh ids o<thread>_<n>, amount 100, on 64 accounts.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
local start = tonumber(os.getenv("PG_START") or "0")
function request()
  local id = "o" .. tid .. "_" .. (start + n)
  n = n + 1
  return wrk.format("POST", "/v1/orders", {["content-type"] = "application/json"},
    '{"id":"' .. id .. '","account_id":"a' .. (n % 64) .. '","amount":100}')
end
