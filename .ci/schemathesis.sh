#!/usr/bin/env bash
# Drives every route of /openapi.json with schemathesis (all phases, bounded
# examples) against a real `payguard serve` with an API key, on loopback.
# Fails on any 5xx, schema violation or other failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
ST_VERSION="4.32.5"
if ! schemathesis --version 2>/dev/null | grep -q "$ST_VERSION"; then
  python3 -m pip install -q "schemathesis==$ST_VERSION"
fi
cargo build --release --locked -q -p payguard-cli
bin="${CARGO_TARGET_DIR:-target}/release/payguard"
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
key="ci-schemathesis-$(date +%s)-key"
PAYGUARD_API_KEYS="$key" "$bin" serve --listen "127.0.0.1:$port" --db "sqlite://$dir/st.db" \
  --log-format json > "$dir/serve.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break
  kill -0 $pid 2>/dev/null || { echo "schemathesis: payguard serve exited:"; cat "$dir/serve.log"; exit 1; }
  sleep 0.1
done
schemathesis --config-file .ci/schemathesis.toml run "http://127.0.0.1:$port/openapi.json" \
  --checks all --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-100}" --seed 1 \
  --generation-codec ascii --request-timeout 10 --wait-for-schema 30 \
  -H "Authorization: Bearer $key"
if grep -q '"level":"ERROR"' "$dir/serve.log"; then
  echo "schemathesis: the server logged errors:"; grep '"level":"ERROR"' "$dir/serve.log" | head -20
  exit 1
fi
