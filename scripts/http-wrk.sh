#!/usr/bin/env bash
# Where an HTTP deduct's time goes: one `payguard serve` (release, SQLite, JSON logs
# to a file as production would), driven by wrk (a client payguard did not write),
# in one run: GET /healthz (a constant answer, the floor), first charges of fresh
# orders, replays of PAID orders, then first charges again paced at half their peak
# (for the p99 target). Prints one RESULT line per row and the ratios.
#
#   scripts/http-wrk.sh [LOG_FILE]   (LOG_FILE default: a file in a temp dir; /dev/null works)
# `payguard bench http` runs the same scripts beside its own client (no log file, no paced row).
# Each row also reports the server's CPU per request (server_cpu_us_per_req, from
# /proc/<pid>/stat), the figure to compare between builds on a shared machine.
# Env: PAYGUARD_BIN (the binary to serve), SECS (default 5), CONNS (default 64), THREADS (default 2), PERF=1 records a
# `perf record -g` profile of the server per row into $PERF_DIR (default /tmp/payguard-perf).
# WEBHOOK=1 subscribes one webhook endpoint (scripts/webhook-sink.py, answering 200 at
# once) before the rows, so every charge is also delivered; prints the deliveries.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${SECS:-5}"; CONNS="${CONNS:-64}"; THREADS="${THREADS:-2}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
bin="${PAYGUARD_BIN:-${CARGO_TARGET_DIR:-target}/release/payguard}"
[ -x "$bin" ] || cargo build --release --locked -q -p payguard-cli
work=$(mktemp -d); log="${1:-$work/serve.log}"; pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  [ -n "${sink_pid:-}" ] && kill "$sink_pid" 2>/dev/null
  wait 2>/dev/null; rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
url="http://127.0.0.1:$port"
hook_flags=(); sink_pid=""
if [ "${WEBHOOK:-}" = 1 ]; then
  sink_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
  python3 scripts/webhook-sink.py "$sink_port" "$work/sink.count" & sink_pid=$!
  hook_flags=(--webhook-allow-private)
fi
"$bin" serve --listen "127.0.0.1:$port" --db "sqlite://$work/http.db" --instance-id wrk \
  --log-format json "${hook_flags[@]}" > "$log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do curl -sf "$url/healthz" >/dev/null && break; sleep 0.1; done
if [ -n "$sink_pid" ]; then
  curl -sf -X POST "$url/v1/webhook_endpoints" -H 'content-type: application/json' \
    -d "{\"url\":\"http://127.0.0.1:$sink_port/hook\"}" >/dev/null
fi
for a in $(seq 0 63); do
  curl -sf -X POST "$url/v1/accounts" -H 'content-type: application/json' \
    -d "{\"id\":\"a$a\",\"balance\":1000000000000}" >/dev/null
done
run() { # name secs script [env...]: one wrk row
  local name=$1 secs=$2 script=$3; shift 3
  if [ "${PERF:-}" = 1 ]; then
    mkdir -p "${PERF_DIR:=/tmp/payguard-perf}"
    perf record -q -g -p "$pid" -o "$PERF_DIR/$name.data" -- sleep "$secs" 2>/dev/null &
  fi
  local out cpu0 cpu1; cpu0=$(cpu_ticks)
  out=$(env PG_CONNS="$CONNS" "$@" wrk -t"$THREADS" -c"$CONNS" -d"${secs}s" \
    -s "scripts/wrk/$script" "$url" | grep '^RESULT')
  cpu1=$(cpu_ticks)
  wait 2>/dev/null || true
  # The server's CPU (user + system, every thread) per request of the row: steadier
  # than requests/s on a shared machine, since other work does not inflate it.
  local reqs; reqs=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$out")
  echo "$name ${out#RESULT } server_cpu_us_per_req=$(( (cpu1 - cpu0) * 1000000 / $(getconf CLK_TCK) / (reqs > 0 ? reqs : 1) ))"
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$pid/stat"; }
field() { sed -n "s/.* $2=\([0-9.]*\).*/\1/p" <<<"$1"; }
# Orders to charge (not timed as a row): enough for the peak run and the paced one.
created=$(run create $((SECS * 3)) create.lua)
health=$(run healthz "$SECS" healthz.lua); echo "$health"
fresh=$(run fresh "$SECS" deduct.lua); echo "$fresh"
charged=$(field "$fresh" per_thread_max)
replay=$(run replay "$SECS" replay.lua PG_REPLAY_OF="$((charged < 5000 ? charged - 1 : 5000))"); echo "$replay"
half=$(awk -v r="$(field "$fresh" rps)" 'BEGIN { printf "%d", r / 2 }')
paced=$(run fresh_at_half "$SECS" deduct.lua PG_START="$charged" PG_RATE="$half"); echo "$paced"
echo "orders created per thread: $(field "$created" per_thread_max); log: $(du -h "$log" | cut -f1) $(wc -l < "$log") lines"
if [ -n "$sink_pid" ]; then # every first charge is one event to deliver
  want=$(( $(field "$fresh" requests) + $(field "$paced" requests) )); t0=$(date +%s%N)
  for _ in $(seq 1 300); do [ "$(cat "$work/sink.count" 2>/dev/null || echo 0)" -ge "$want" ] && break; sleep 0.1; done
  echo "webhook deliveries: $(cat "$work/sink.count") of $want events, the last $(( ($(date +%s%N) - t0) / 1000000 )) ms after the last row"
fi
awk -v h="$(field "$health" rps)" -v f="$(field "$fresh" rps)" -v r="$(field "$replay" rps)" \
  -v p="$(field "$paced" p99_ms)" -v half="$half" 'BEGIN {
  printf "first charges / healthz: %.2fx   replays / healthz: %.2fx   p99 of first charges at %d/s: %s ms\n", f / h, r / h, half, p }'
