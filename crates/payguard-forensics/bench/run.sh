#!/usr/bin/env bash
# Benchmark for payguard-forensics: 1 GiB of generated logs, forensics vs ripgrep on the same files.
set -euo pipefail
# Run from anywhere: `crates/payguard-forensics/bench/run.sh`. Needs ripgrep and GNU time
# (`apt-get install ripgrep time`). The 1 GiB of logs goes to $FORENSICS_BENCH_DIR.
cd "$(dirname "$0")/../../.."
nice -n 10 cargo build --release -p payguard-forensics --bins
DATA=${FORENSICS_BENCH_DIR:-/tmp/payguard-forensics-bench}
OUT=$DATA/out
mkdir -p "$OUT"
if [ ! -f "$DATA/expected.json" ]; then
  nice -n 10 ./target/release/gen-logs --bytes 1G --out "$DATA" --zst-hosts 1
fi
cat "$DATA"/logs/* > /dev/null   # warm the page cache for both tools
uptime   # the machine is shared: the load average says how much of it we had
for i in 1 2 3; do
  /usr/bin/time -f "forensics run $i: wall %e s, user %U s, sys %S s, cpu %P, peak RSS %M KB" \
    nice -n 10 ./target/release/payguard-forensics "$DATA/logs" --json > "$OUT/out-$i.json" || true
  /usr/bin/time -f "rg run $i: wall %e s, user %U s, sys %S s, cpu %P, peak RSS %M KB" \
    nice -n 10 rg -z -c duplicate_deduct "$DATA"/logs/* > "$OUT/rg-$i.txt" || true
done
cat "$DATA/expected.json"
python3 - "$DATA/expected.json" "$OUT/out-1.json" <<'PY'
import json, sys
e = json.load(open(sys.argv[1])); v = json.load(open(sys.argv[2]))
t = v["totals"]
print("expected incidents", e["incidents"], "found", len(v["incidents"]))
print("expected amount_lost", e["amount_lost"], "found", t["amount_lost"])
print("expected healthy race windows", e["healthy_race_windows"], "found", t["race_windows"])
print("expected orders", e["orders"], "seen", v["orders_seen"], "lines", e["lines"], "read", v["lines_read"])
ok = (e["incidents"] == len(v["incidents"]) and e["amount_lost"] == t["amount_lost"]
      and e["healthy_race_windows"] == t["race_windows"] and e["orders"] == v["orders_seen"])
print("MATCH" if ok else "MISMATCH")
PY
cat "$OUT/rg-1.txt"
uptime
