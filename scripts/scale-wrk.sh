#!/usr/bin/env bash
# The multi-instance duplicate storm of `payguard bench scale`, driven by wrk (a
# client payguard did not write) instead of payguard's own storm, in the same run
# for both configurations: three `payguard serve` on one PostgreSQL, without and
# with --redis. Three wrk processes, one per instance, walk the same order ids
# (OD0, OD1, …), so every order's deduct reaches all three instances at about the
# same moment. Prints wrk's requests/s and latency, every status that was not 200,
# and the database's debit count (exactly one per order charged). Orders are
# spread over 1,000 accounts.
#
#   scripts/scale-wrk.sh [postgres://…/postgres] [redis://…]
# Env: ORDERS (default 20000), SECS (default 5), CONNS per wrk (default 16).
set -euo pipefail
cd "$(dirname "$0")/.."
PG="${1:-postgres://postgres@127.0.0.1:5432/postgres}"
REDIS="${2:-redis://127.0.0.1:6379}"
ORDERS="${ORDERS:-20000}"; SECS="${SECS:-5}"; CONNS="${CONNS:-16}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
cargo build --release --locked -q -p payguard-cli
bin="${CARGO_TARGET_DIR:-target}/release/payguard"
work=$(mktemp -d); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
server="${PG%/*}"
cat > "$work/deduct.lua" <<LUA
local n = 0
local orders = $ORDERS
request = function()
  local id = n % orders
  n = n + 1
  return wrk.format("POST", "/v1/orders/OD" .. id .. "/deduct")
end
local others = 0
response = function(status, headers, body)
  if status ~= 200 then others = others + 1 end
end
done = function(summary, latency, requests)
  io.write(string.format("  non-200 answers: %d (socket errors: connect %d, read %d, write %d, timeout %d)\n",
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
  io.write(string.format("  p50 %.1f ms, p99 %.1f ms, max %.1f ms\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
LUA
for redis in no yes; do
  db="scale_wrk_$$_$redis"
  psql -q "$server/postgres" -c "CREATE DATABASE $db" >/dev/null
  urls=()
  for i in 1 2 3; do
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
    extra=(); [ "$redis" = yes ] && extra=(--redis "$REDIS" --redis-prefix "scale-wrk-$$")
    "$bin" serve --listen "127.0.0.1:$port" --db "$server/$db" --pg-pool-max 12 --instance-id "w$i" \
      --log-format json "${extra[@]}" > "$work/$redis-$i.log" 2>&1 &
    pids+=($!); urls+=("http://127.0.0.1:$port")
  done
  for u in "${urls[@]}"; do for _ in $(seq 1 100); do curl -sf "$u/healthz" >/dev/null && break; sleep 0.1; done; done
  python3 - "${urls[0]}" "$ORDERS" <<'PY'
import http.client, json, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1]); n = int(sys.argv[2])
c = http.client.HTTPConnection(u.hostname, u.port)
def post(path, body):
    c.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    r = c.getresponse(); r.read()
    assert r.status in (200, 201), (path, r.status)
accounts = 1000  # spread like pgbench's accounts, not one hot row
for a in range(accounts):
    post("/v1/accounts", {"id": f"wrk{a}", "balance": 10**12})
for i in range(n):
    post("/v1/orders", {"id": f"OD{i}", "account_id": f"wrk{i % accounts}", "amount": 100})
PY
  echo "== 3 instances, Redis lock: $redis ($ORDERS orders, each deduct sent by 3 wrk processes, one per instance, $CONNS connections each, ${SECS} s)"
  wpids=()
  for i in 0 1 2; do
    wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -s "$work/deduct.lua" "${urls[$i]}" > "$work/wrk-$redis-$i.txt" 2>&1 &
    wpids+=($!)
  done
  wait "${wpids[@]}"
  total=0
  for i in 0 1 2; do
    rps=$(awk '/^Requests\/sec/ {print $2}' "$work/wrk-$redis-$i.txt")
    echo " instance $((i+1)): $rps requests/s"; grep -E "non-200|p50" "$work/wrk-$redis-$i.txt"
    total=$(python3 -c "print(round($total + $rps))")
  done
  echo " all three: $total requests/s"
  psql -qtA "$server/$db" -c "SELECT 'orders charged: ' || COUNT(DISTINCT order_id) || ', debits: ' || COUNT(*) FROM entries WHERE kind = 'debit'"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
  # What the lock did, from the instances' logs: grants, waits for another
  # instance's holder, and ops answered from committed state without the lock.
  echo " lock events: $(cat "$work/$redis"-*.log | grep -o '"event":"\(lock_acquired\|lock_wait\|lock_busy\|settled_without_lock\)"\(,"why":"[a-z]*"\)\?' \
    | sed 's/"event"://; s/,"why":/ why=/; s/"//g' | sort | uniq -c | awk '{printf "%s %s%s; ", $2, $3 ? $3 " " : "", $1}')"
  psql -q "$server/postgres" -c "DROP DATABASE $db" >/dev/null
done
