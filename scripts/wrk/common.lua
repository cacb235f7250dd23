-- Shared by payguard's wrk scripts: per-thread order ids (o<thread>_<n>), a
-- count of answers that were not 2xx, and a one-line summary with p50/p99/max.
-- Env: PG_RATE (requests/s over all connections; 0 or unset: as fast as possible),
-- PG_CONNS (connections, to spread PG_RATE), PG_REPLAY_OF (replays cycle over the
-- first N ids of each thread).
-- These scripts are also compiled into `payguard bench http` (include_str! in
-- crates/payguard-cli/src/bench/http/wrk.rs): after a change here, rebuild it.
local threads = {}
local next_thread = 0
function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
  table.insert(threads, thread)
end
local rate = tonumber(os.getenv("PG_RATE") or "0")
local conns = tonumber(os.getenv("PG_CONNS") or "64")
if rate > 0 then
  function delay()
    -- Each connection waits its share of the interval (a paced, not open, load).
    return conns * 1000 / rate
  end
end
bad = 0
n = 0
function response(status, headers, body)
  if status < 200 or status > 299 then
    bad = bad + 1
    if bad <= 3 then io.stderr:write("status " .. status .. ": " .. body .. "\n") end
  end
end
function done(summary, latency, requests)
  local bad_total, made = 0, 0
  for _, t in ipairs(threads) do
    bad_total = bad_total + t:get("bad")
    made = math.max(made, t:get("n"))
  end
  io.write(string.format("RESULT rps=%.0f p50_ms=%.2f p99_ms=%.2f max_ms=%.2f requests=%d non2xx=%d errors=%d per_thread_max=%d\n",
    summary.requests / (summary.duration / 1e6), latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, summary.requests, bad_total,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, made))
end
