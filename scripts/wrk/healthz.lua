-- The constant baseline: GET /healthz on the same server.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")
function request()
  n = n + 1
  return wrk.format("GET", "/healthz")
end
