"""Re-runs issue #19's table against a real `payguard serve` with default limits:
1,100 slow connections from one client, GET /healthz from a normal client at 2 s,
20 s and 40 s (new connection, 8 s timeout), connections the server closed by 40 s;
then SIGTERM with 1,098 unfinished requests open. About 4 minutes; not run by CI
(the bounded version is crates/payguard-server/tests/slow_clients.rs).

    python3 .ci/slow_clients_table.py target/debug/payguard

Needs `ulimit -n` above 2,300 (client and server in one shell). Results: BENCHMARKS.md.
"""
import asyncio, os, signal, subprocess, sys, tempfile, time, json

BIN = sys.argv[1]
N = 1100
KEY = "key-issue19-0123456789abcdef"


def start(port, keyed, extra=()):
    env = dict(os.environ)
    env.pop("PAYGUARD_API_KEYS", None)
    if keyed:
        env["PAYGUARD_API_KEYS"] = KEY
    d = tempfile.mkdtemp()
    log = open(f"{d}/log.jsonl", "w")
    p = subprocess.Popen(
        [BIN, "serve", "--listen", f"127.0.0.1:{port}", "--db", f"sqlite://{d}/p.db", "--log-format", "json", *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(200):
        try:
            import urllib.request
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return p, f"{d}/log.jsonl"
        except Exception:
            time.sleep(0.05)
    raise SystemExit("server did not start")


def slow_bytes(kind, keyed_attacker):
    if kind == "headers":
        return b"POST /v1/orders/x/deduct HTTP/1.1\r\nHost: p\r\n"
    if kind == "body":
        auth = f"Authorization: Bearer {KEY}\r\n".encode() if keyed_attacker else b""
        return (b"POST /v1/orders/x/deduct HTTP/1.1\r\nHost: p\r\n" + auth +
                b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
    return b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n"


async def slow_conn(port, kind, t0, closed, answers, keyed_attacker=False):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port)
    except Exception as e:
        closed.append(("connect_failed", time.monotonic() - t0))
        return
    w.write(slow_bytes(kind, keyed_attacker))
    await w.drain()
    got = b""
    try:
        while True:
            chunk = await r.read(65536)
            if not chunk:
                break
            got += chunk
            if kind == "idle" and b"\r\n\r\n" in got and got.count(b"HTTP/1.1") == 1 and got.endswith(b"}"):
                # the one answer; now idle
                pass
    except Exception:
        pass
    closed.append((kind, time.monotonic() - t0))
    answers.append(got.split(b"\r\n", 1)[0].decode(errors="replace"))


async def probe(port, at, t0):
    await asyncio.sleep(max(0, t0 + at - time.monotonic()))
    s = time.monotonic()
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 8)
        w.write(b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        await w.drain()
        line = await asyncio.wait_for(r.readline(), 8 - (time.monotonic() - s))
        w.close()
        return f"{line.decode().split(' ')[1] if line else 'closed'} in {1000*(time.monotonic()-s):.0f} ms"
    except asyncio.TimeoutError:
        return "timed out (8 s)"
    except Exception as e:
        return f"error {e!r}"


async def scenario(name, kind, keyed, keyed_attacker, port):
    p, log = start(port, keyed)
    t0 = time.monotonic()
    closed, answers = [], []
    tasks = [asyncio.create_task(slow_conn(port, kind, t0, closed, answers, keyed_attacker and i % 2 == 0)) for i in range(N)]
    probes = [asyncio.create_task(probe(port, at, t0)) for at in (2, 20, 40)]
    results = [await pr for pr in probes]
    n_closed = len(closed)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    for t in tasks:
        t.cancel()
    warns = [json.loads(l) for l in open(log) if '"connections_closed"' in l]
    reasons = {}
    for w in warns:
        f = w.get("fields", w)
        reasons[f.get("reason")] = reasons.get(f.get("reason"), 0) + int(f.get("count", 0))
    codes = {}
    for a in answers:
        c = a.split(" ")[1] if a.startswith("HTTP/1.1") else "(closed, no answer)"
        codes[c] = codes.get(c, 0) + 1
    print(f"| {name} | {'set' if keyed else 'none'} | {' / '.join(results)} | {n_closed} of {N} | {len(warns)} WARN events {reasons} | answers {codes} |", flush=True)


async def sigterm(port):
    # 1,098 unfinished requests (deadlines far away, so only the drain can close them).
    p, log = start(port, False, ["--header-read-timeout-ms", "600000", "--body-read-timeout-ms", "600000"])
    t0 = time.monotonic()
    closed, answers = [], []
    tasks = [asyncio.create_task(slow_conn(port, "headers" if i % 2 else "body", t0, closed, answers)) for i in range(1098)]
    await asyncio.sleep(3)
    s = time.monotonic()
    p.send_signal(signal.SIGTERM)
    while p.poll() is None and time.monotonic() - s < 60:
        await asyncio.sleep(0.01)
    took = time.monotonic() - s
    await asyncio.sleep(0.2)
    print(f"SIGTERM with 1,098 unfinished requests open: exited {p.poll()} after {took*1000:.0f} ms; {len(closed)} of 1098 seen closed", flush=True)
    for l in open(log):
        if "drain_" in l:
            print("   ", l.strip())
    for t in tasks:
        t.cancel()


async def main():
    print("| what the connections send | API keys | /healthz at 2 s / 20 s / 40 s | closed by 40 s | log | slow connections got |")
    print("|---|---|---|---|---|---|")
    await scenario("request line + one header", "headers", False, False, 18101)
    await scenario("request line + one header", "headers", True, False, 18102)
    await scenario("POST headers, Content-Length 100000, 1 byte", "body", False, False, 18103)
    await scenario("POST headers, Content-Length 100000, 1 byte (half with a valid key)", "body", True, True, 18104)
    await scenario("one GET, then idle keep-alive", "idle", False, False, 18105)
    await sigterm(18106)


asyncio.run(main())
