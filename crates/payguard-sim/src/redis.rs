//! The simulated Redis: a keyspace on the simulated clock that runs payguard's
//! own Lua lock scripts (`payguard::lock::redis::{ACQUIRE_MANY, RAISE_EPOCH,
//! RELEASE_MANY}`, the shipped texts) in an embedded Lua 5.1, with pub/sub; it
//! can be flushed or restarted.
//!
//! Why a model and not a Redis: a real server runs on the wall clock and its own
//! scheduler, so no seed could replay it. Why Lua: the scripts are the part of
//! the lock protocol that runs inside Redis; running their text here, rather
//! than a Rust re-statement of them, means a change to a script is what the
//! simulation checks.
//!
//! What it keeps of Redis: a script runs atomically (one message at a time)
//! at one instant (Redis freezes a script's clock), with `KEYS` and `ARGV` as
//! Redis sets them; `redis.call` and `redis.pcall` serve exactly the commands
//! the scripts use ([`RedisState::command`]: `SET` with `NX`/`PX`, `GET`, `DEL`,
//! `EXISTS`, `PTTL`, `HINCRBY`, `HSET`, `HGET`, `PUBLISH`) and raise an error
//! for any other, so a script that starts using an unmodelled command fails
//! loudly instead of being answered wrongly; replies cross between Lua and
//! RESP by Redis's rules ([`Scripts`]); a key with a `PX` expiry is gone once
//! the simulated clock reaches it; `FLUSHALL` or a restart loses every key; and
//! a published message reaches the subscribers Redis knows of at that moment,
//! at most once: a restart forgets every subscription (a flush does not), and a
//! message to an instance that is down or cut off is lost.
//!
//! Determinism: the interpreter gets no clock and no random source (no `os`
//! or `io` library, `math.random` removed; Redis forbids both in scripts too),
//! and Lua 5.1 hashes strings without a random seed; a script that creates or
//! reads an undefined global fails, as in Redis. Not modelled: any other
//! command, `EX`/`XX`/`KEEPTTL` and the like, eviction, replication, script
//! timeouts.

use crate::wire::{now_ms, Post, Server, REDIS_PORT};
use mlua::{Function, Lua, LuaOptions, MultiValue, StdLib, Table, Value as LuaValue};
use redis::Value;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// What a client sends, one message each.
#[derive(Debug, Clone)]
pub enum RedisReq {
    /// `EVALSHA` (or `EVAL`): a script's text with its `KEYS` and `ARGV`.
    Eval {
        script: &'static str,
        keys: Vec<String>,
        args: Vec<String>,
    },
    /// `SUBSCRIBE channel` from the sender's socket.
    Subscribe { channel: String },
}

#[derive(Debug, Clone)]
pub enum RedisResp {
    /// A script's reply, or the error reply it ended with.
    Reply(Result<Value, String>),
    /// `SUBSCRIBE` took: `run` names the Redis process (a restart changes it).
    Subscribed { run: u64 },
    /// A message published on a channel the receiver subscribed to.
    Message { channel: String, payload: String },
}

/// A key's value: the two types the scripts use.
#[derive(Debug, Clone)]
enum Data {
    Str(Vec<u8>),
    Hash(BTreeMap<Vec<u8>, Vec<u8>>),
}

#[derive(Debug, Clone)]
struct Entry {
    data: Data,
    /// Gone once the clock reaches it (ms); `None`: no expiry.
    expires_at_ms: Option<u64>,
}

impl Entry {
    fn live(&self, now: u64) -> bool {
        self.expires_at_ms.is_none_or(|t| t > now)
    }
}

/// One reply of a command, before it becomes a Lua value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Status(&'static str),
}

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";

fn wrong_arity(name: &str) -> String {
    format!("ERR wrong number of arguments for '{name}' command")
}

fn integer(arg: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(arg)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| "ERR value is not an integer or out of range".to_owned())
}

#[derive(Debug, Default)]
pub struct RedisState {
    /// Every key: what `FLUSHALL` empties. An expired entry is absent (removed
    /// when next touched, as Redis's lazy expiry does).
    keys: BTreeMap<Vec<u8>, Entry>,
    /// Channel → sockets subscribed to it. A restart forgets them; a flush
    /// does not.
    subscribers: BTreeMap<String, BTreeSet<SocketAddr>>,
    /// Which process this is: changes at every (re)start.
    run: u64,
    /// `(channel, message)` published by the last script, for [`serve`] to push.
    outbox: Vec<(String, String)>,
    /// Grants made so far (successful `SET NX`, for the stats).
    pub grants: u64,
}

impl RedisState {
    /// `FLUSHALL`: every key is gone; subscriptions stay.
    pub fn flush(&mut self) {
        self.keys.clear();
    }

    /// A restart without persistence: every key and every subscription is gone.
    pub fn restart(&mut self) {
        self.flush();
        self.subscribers.clear();
        self.outbox.clear();
        self.run += 1;
    }

    /// `SUBSCRIBE channel` from `from`.
    pub fn subscribe(&mut self, channel: &str, from: SocketAddr) -> RedisResp {
        self.subscribers
            .entry(channel.to_owned())
            .or_default()
            .insert(from);
        RedisResp::Subscribed { run: self.run }
    }

    /// `GET key == owner`, as Redis would answer at `now` (for the oracle: it
    /// changes nothing, not even a lazy expiry).
    pub fn holds(&self, key: &str, owner: &str, now: u64) -> bool {
        matches!(
            self.keys.get(key.as_bytes()),
            Some(e @ Entry { data: Data::Str(v), .. }) if v == owner.as_bytes() && e.live(now)
        )
    }

    /// The orders published since the last call, with their channels.
    pub fn take_published(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.outbox)
    }

    /// The live entry of `key` at `now` (an expired one is removed).
    fn live(&mut self, key: &[u8], now: u64) -> Option<&mut Entry> {
        if self.keys.get(key).is_some_and(|e| !e.live(now)) {
            self.keys.remove(key);
        }
        self.keys.get_mut(key)
    }

    /// The live hash at `key`, created empty if absent.
    fn hash(&mut self, key: &[u8], now: u64) -> Result<&mut BTreeMap<Vec<u8>, Vec<u8>>, String> {
        if self.live(key, now).is_none() {
            self.keys.insert(
                key.to_vec(),
                Entry {
                    data: Data::Hash(BTreeMap::new()),
                    expires_at_ms: None,
                },
            );
        }
        match self.keys.get_mut(key).map(|e| &mut e.data) {
            Some(Data::Hash(h)) => Ok(h),
            _ => Err(WRONGTYPE.to_owned()),
        }
    }

    /// Runs one command (`argv[0]` its name) at `now`: what `redis.call`
    /// does. Exactly the commands the lock scripts use; any other is an error.
    pub fn command(&mut self, argv: &[Vec<u8>], now: u64) -> Result<Reply, String> {
        let Some(name) = argv.first() else {
            return Err("ERR Please specify at least one argument for this redis lib call".into());
        };
        let name = String::from_utf8_lossy(name).to_ascii_uppercase();
        let args = &argv[1..];
        match (name.as_str(), args.len()) {
            ("SET", n) if n >= 2 => self.set(args, now),
            ("GET", 1) => match self.live(&args[0], now).map(|e| &e.data) {
                None => Ok(Reply::Nil),
                Some(Data::Str(v)) => Ok(Reply::Bulk(v.clone())),
                Some(Data::Hash(_)) => Err(WRONGTYPE.into()),
            },
            ("DEL", n) if n >= 1 => {
                let mut gone = 0;
                for key in args {
                    if self.live(key, now).is_some() {
                        self.keys.remove(key);
                        gone += 1;
                    }
                }
                Ok(Reply::Int(gone))
            }
            ("EXISTS", n) if n >= 1 => {
                let found = args.iter().filter(|k| self.live(k, now).is_some()).count();
                Ok(Reply::Int(found as i64))
            }
            ("PTTL", 1) => Ok(Reply::Int(match self.live(&args[0], now) {
                None => -2,
                Some(Entry {
                    expires_at_ms: None,
                    ..
                }) => -1,
                Some(Entry {
                    expires_at_ms: Some(t),
                    ..
                }) => (*t - now) as i64,
            })),
            ("HINCRBY", 3) => {
                let by = integer(&args[2])?;
                let hash = self.hash(&args[0], now)?;
                let was = match hash.get(&args[1]) {
                    None => 0,
                    Some(v) => integer(v).map_err(|_| "ERR hash value is not an integer")?,
                };
                let now_is = was
                    .checked_add(by)
                    .ok_or("ERR increment or decrement would overflow")?;
                hash.insert(args[1].clone(), now_is.to_string().into_bytes());
                Ok(Reply::Int(now_is))
            }
            ("HSET", n) if n >= 3 && n % 2 == 1 => {
                let hash = self.hash(&args[0], now)?;
                let mut added = 0;
                for pair in args[1..].chunks(2) {
                    if hash.insert(pair[0].clone(), pair[1].clone()).is_none() {
                        added += 1;
                    }
                }
                Ok(Reply::Int(added))
            }
            ("HGET", 2) => match self.live(&args[0], now).map(|e| &e.data) {
                None => Ok(Reply::Nil),
                Some(Data::Hash(h)) => Ok(h.get(&args[1]).cloned().map_or(Reply::Nil, Reply::Bulk)),
                Some(Data::Str(_)) => Err(WRONGTYPE.into()),
            },
            ("PUBLISH", 2) => {
                let channel = String::from_utf8_lossy(&args[0]).into_owned();
                let message = String::from_utf8_lossy(&args[1]).into_owned();
                let receivers = self.subscribers.get(&channel).map_or(0, |s| s.len());
                self.outbox.push((channel, message));
                Ok(Reply::Int(receivers as i64))
            }
            (
                "SET" | "GET" | "DEL" | "EXISTS" | "PTTL" | "HINCRBY" | "HSET" | "HGET" | "PUBLISH",
                _,
            ) => Err(wrong_arity(&name.to_ascii_lowercase())),
            _ => Err(format!(
                "ERR unknown command '{name}': the simulated Redis does not model it (src/redis.rs)"
            )),
        }
    }

    /// `SET key value [NX] [PX ms]`: the options the scripts use, in any
    /// order; any other is an error (not modelled).
    fn set(&mut self, args: &[Vec<u8>], now: u64) -> Result<Reply, String> {
        let (key, value) = (&args[0], &args[1]);
        let (mut nx, mut px) = (false, None);
        let mut opts = args[2..].iter();
        while let Some(opt) = opts.next() {
            match String::from_utf8_lossy(opt).to_ascii_uppercase().as_str() {
                "NX" => nx = true,
                "PX" => {
                    let ms = opts.next().ok_or("ERR syntax error")?;
                    let ms = integer(ms)?;
                    if ms <= 0 {
                        return Err("ERR invalid expire time in 'set' command".into());
                    }
                    px = Some(ms as u64);
                }
                other => {
                    return Err(format!(
                        "ERR SET option '{other}' is not modelled by the simulated Redis"
                    ))
                }
            }
        }
        if nx && self.live(key, now).is_some() {
            return Ok(Reply::Nil);
        }
        if nx {
            self.grants += 1;
        }
        self.keys.insert(
            key.clone(),
            Entry {
                data: Data::Str(value.clone()),
                expires_at_ms: px.map(|ms| now + ms),
            },
        );
        Ok(Reply::Status("OK"))
    }
}

/// The embedded interpreter: one Lua state per Redis process, with Redis's
/// script cache (a script is compiled once per text, as `EVALSHA` finds it by
/// its SHA).
pub struct Scripts {
    lua: Lua,
    compiled: HashMap<&'static str, Function>,
}

/// Refuses new globals and undefined ones, as Redis's script environment does.
const STRICT_GLOBALS: &str = r#"
setmetatable(_G, {
  __newindex = function(_, k) error("Script attempted to create global variable '" .. tostring(k) .. "'", 2) end,
  __index = function(_, k) error("Script attempted to access nonexistent global variable '" .. tostring(k) .. "'", 2) end,
})
"#;

impl Scripts {
    /// A fresh interpreter: the base, table, string and math libraries, no
    /// randomness, and a `redis` table whose `call`/`pcall` exist only while
    /// a script runs.
    pub fn new() -> mlua::Result<Scripts> {
        let lua = Lua::new_with(
            StdLib::TABLE | StdLib::STRING | StdLib::MATH,
            LuaOptions::new(),
        )?;
        let globals = lua.globals();
        let math: Table = globals.get("math")?;
        math.set("random", LuaValue::Nil)?;
        math.set("randomseed", LuaValue::Nil)?;
        globals.set("redis", lua.create_table()?)?;
        globals.set("KEYS", lua.create_table()?)?;
        globals.set("ARGV", lua.create_table()?)?;
        lua.load(STRICT_GLOBALS).exec()?;
        Ok(Scripts {
            lua,
            compiled: HashMap::new(),
        })
    }

    fn compiled(&mut self, text: &'static str) -> Result<Function, String> {
        if let Some(f) = self.compiled.get(text) {
            return Ok(f.clone());
        }
        let f = self
            .lua
            .load(text)
            .set_name("user_script")
            .into_function()
            .map_err(|e| format!("ERR Error compiling script: {e}"))?;
        self.compiled.insert(text, f.clone());
        Ok(f)
    }

    /// Runs `text` over `state` at `now` with `keys` and `args`: its reply
    /// converted to RESP, or the error it raised (nothing it wrote before the
    /// error is undone, as in Redis).
    pub fn eval(
        &mut self,
        state: &mut RedisState,
        text: &'static str,
        keys: &[String],
        args: &[String],
        now: u64,
    ) -> Result<Value, String> {
        let f = self.compiled(text)?;
        let lua = &self.lua;
        let script_error = |e: mlua::Error| format!("ERR script error: {e}");
        let globals = lua.globals();
        let set_table = |name: &str, items: &[String]| -> mlua::Result<()> {
            globals.raw_set(
                name,
                lua.create_sequence_from(items.iter().map(String::as_str))?,
            )
        };
        set_table("KEYS", keys).map_err(script_error)?;
        set_table("ARGV", args).map_err(script_error)?;
        let redis_lib: Table = globals.raw_get("redis").map_err(script_error)?;
        let state = RefCell::new(state);
        let run = |lua: &Lua, argv: MultiValue| -> mlua::Result<Result<Reply, String>> {
            let argv = command_args(lua, argv)?;
            Ok(state.borrow_mut().command(&argv, now))
        };
        lua.scope(|scope| {
            let call = scope.create_function(|lua, argv: MultiValue| match run(lua, argv)? {
                Ok(reply) => to_lua(lua, reply),
                Err(e) => Err(mlua::Error::runtime(e)),
            })?;
            let pcall = scope.create_function(|lua, argv: MultiValue| match run(lua, argv)? {
                Ok(reply) => to_lua(lua, reply),
                Err(e) => error_table(lua, &e),
            })?;
            redis_lib.raw_set("call", call)?;
            redis_lib.raw_set("pcall", pcall)?;
            let out: LuaValue = f.call(())?;
            Ok(to_resp(out))
        })
        .map_err(script_error)?
    }
}

/// `redis.call`'s arguments as Redis takes them: strings, and numbers as Lua
/// prints them (`%.14g`); anything else is an error.
fn command_args(lua: &Lua, argv: MultiValue) -> mlua::Result<Vec<Vec<u8>>> {
    argv.into_iter()
        .map(|v| match v {
            LuaValue::String(_) | LuaValue::Integer(_) | LuaValue::Number(_) => lua
                .coerce_string(v)?
                .map(|s| s.as_bytes().to_vec())
                .ok_or_else(|| mlua::Error::runtime("a number that does not print")),
            _ => Err(mlua::Error::runtime(
                "Lua redis lib command arguments must be strings or integers",
            )),
        })
        .collect()
}

/// A command's reply as Lua sees it: an integer is a number, a bulk string a
/// string, a nil reply `false`, a status reply a table `{ok = ...}`.
fn to_lua(lua: &Lua, reply: Reply) -> mlua::Result<LuaValue> {
    Ok(match reply {
        Reply::Int(n) => LuaValue::Integer(n),
        Reply::Bulk(b) => LuaValue::String(lua.create_string(b)?),
        Reply::Nil => LuaValue::Boolean(false),
        Reply::Status(s) => {
            let t = lua.create_table()?;
            t.raw_set("ok", s)?;
            LuaValue::Table(t)
        }
    })
}

/// `redis.pcall`'s answer to a failed command: a table `{err = ...}`.
fn error_table(lua: &Lua, e: &str) -> mlua::Result<LuaValue> {
    let t = lua.create_table()?;
    t.raw_set("err", e)?;
    Ok(LuaValue::Table(t))
}

/// A script's return value as Redis replies it: `false` and `nil` a nil reply,
/// `true` the integer 1, a number an integer (truncated), a string a bulk
/// string, a table `{err = ...}` an error, `{ok = ...}` a status, any other
/// table an array up to its first nil.
fn to_resp(v: LuaValue) -> Result<Value, String> {
    Ok(match v {
        LuaValue::Nil | LuaValue::Boolean(false) => Value::Nil,
        LuaValue::Boolean(true) => Value::Int(1),
        LuaValue::Integer(n) => Value::Int(n),
        LuaValue::Number(x) => Value::Int(x.trunc() as i64),
        LuaValue::String(s) => Value::BulkString(s.as_bytes().to_vec()),
        LuaValue::Table(t) => {
            if let Ok(LuaValue::String(e)) = t.raw_get::<LuaValue>("err") {
                return Err(e.to_string_lossy());
            }
            if let Ok(LuaValue::String(s)) = t.raw_get::<LuaValue>("ok") {
                return Ok(match s.to_string_lossy().as_str() {
                    "OK" => Value::Okay,
                    other => Value::SimpleString(other.to_owned()),
                });
            }
            let mut items = Vec::new();
            for i in 1.. {
                let item: LuaValue = t.raw_get(i).map_err(|e| e.to_string())?;
                if item.is_nil() {
                    break;
                }
                items.push(to_resp(item)?);
            }
            Value::Array(items)
        }
        _ => Value::Nil,
    })
}

/// The Redis state of a seed: its host runs the scripts on it; the run loop
/// flushes it; the oracle reads whether a lock is still held.
pub type SharedRedis = Arc<Mutex<RedisState>>;

pub fn lock(state: &SharedRedis) -> MutexGuard<'_, RedisState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The Redis host's software. A (re)start begins with no keys, no
/// subscribers and a new interpreter (an empty script cache).
pub async fn serve(post: Post, state: SharedRedis) -> turmoil::Result {
    lock(&state).restart();
    let mut scripts = Scripts::new().map_err(|e| format!("starting Lua: {e}"))?;
    let server = Server::bind(post, REDIS_PORT).await?;
    loop {
        let req = server.recv().await?;
        let Some(body) = req.body.downcast_ref::<RedisReq>().cloned() else {
            continue;
        };
        let resp = match body {
            RedisReq::Eval { script, keys, args } => {
                let mut s = lock(&state);
                RedisResp::Reply(scripts.eval(&mut s, script, &keys, &args, now_ms()))
            }
            RedisReq::Subscribe { channel } => lock(&state).subscribe(&channel, req.from()),
        };
        server.reply(&req, Box::new(resp)).await;
        let published = lock(&state).take_published();
        for (channel, payload) in published {
            let subscribers: Vec<SocketAddr> = lock(&state)
                .subscribers
                .get(&channel)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            for to in subscribers {
                server
                    .push(
                        to,
                        Box::new(RedisResp::Message {
                            channel: channel.clone(),
                            payload: payload.clone(),
                        }),
                    )
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use payguard::lock::redis::{ACQUIRE_MANY, RAISE_EPOCH, RELEASE_MANY};

    /// Keys as payguard's client names them (prefix `t`).
    fn lock_key(order: &str) -> String {
        format!("t:lock:order:{order}")
    }

    const FENCE: &str = "t:fence";
    const CHANNEL: &str = "t:released";

    fn run(
        s: &mut Scripts,
        r: &mut RedisState,
        text: &'static str,
        keys: Vec<String>,
        args: Vec<String>,
        now: u64,
    ) -> Result<Value, String> {
        s.eval(r, text, &keys, &args, now)
    }

    /// ACQUIRE_MANY with a 10 ms TTL and a 5 ms waiter grace, as the client
    /// sends it: `(epoch, incarnation, one number per order)`.
    fn acquire(
        s: &mut Scripts,
        r: &mut RedisState,
        orders: &[&str],
        owner: &str,
        hints: &[bool],
        now: u64,
    ) -> (Option<i64>, Option<String>, Vec<i64>) {
        let mut keys = vec![FENCE.to_owned()];
        for o in orders {
            let k = lock_key(o);
            keys.extend([k.clone(), format!("{k}:w"), format!("{k}:s")]);
        }
        let mut args = vec![owner.to_owned(), "10".into(), "5".into()];
        args.extend(hints.iter().map(|h| if *h { "1" } else { "0" }.to_owned()));
        let v: Vec<Value> =
            redis::from_redis_value(run(s, r, ACQUIRE_MANY, keys, args, now).unwrap()).unwrap();
        let mut it = v.into_iter();
        let epoch = redis::from_redis_value(it.next().unwrap()).unwrap();
        let inc = redis::from_redis_value(it.next().unwrap()).unwrap();
        let n = it.map(|v| redis::from_redis_value(v).unwrap()).collect();
        (epoch, inc, n)
    }

    fn release(
        s: &mut Scripts,
        r: &mut RedisState,
        items: &[(&str, bool)],
        owner: &str,
        now: u64,
    ) -> Vec<i64> {
        let mut keys = Vec::new();
        let mut args = vec![owner.to_owned(), CHANNEL.to_owned(), "100".into()];
        for (o, settled) in items {
            let k = lock_key(o);
            keys.extend([k.clone(), format!("{k}:w"), format!("{k}:s")]);
            args.extend([(*o).to_owned(), if *settled { "1" } else { "0" }.to_owned()]);
        }
        redis::from_redis_value(run(s, r, RELEASE_MANY, keys, args, now).unwrap()).unwrap()
    }

    fn raise(
        s: &mut Scripts,
        r: &mut RedisState,
        text: &'static str,
        fresh: i64,
        inc: &str,
    ) -> Option<i64> {
        let v = run(
            s,
            r,
            text,
            vec![FENCE.to_owned()],
            vec![fresh.to_string(), inc.to_owned()],
            1,
        )
        .unwrap();
        redis::from_redis_value(v).unwrap()
    }

    fn published(r: &mut RedisState) -> Vec<String> {
        r.take_published().into_iter().map(|(_, m)| m).collect()
    }

    /// The cross-wise batches of issue #12: nothing waits, each is told busy
    /// with the PTTL, and a release somebody waits for is published.
    #[test]
    fn acquire_many_never_waits_and_a_release_someone_waits_for_is_published() {
        let (mut s, mut r) = (Scripts::new().unwrap(), RedisState::default());
        let (s, r) = (&mut s, &mut r);
        assert_eq!(acquire(s, r, &["x"], "A", &[false], 0).2, [1]);
        assert_eq!(acquire(s, r, &["y"], "B", &[false], 0).2, [2]);
        assert_eq!(
            acquire(s, r, &["y", "z"], "A2", &[false, false], 4).2,
            [-7, 3]
        );
        assert_eq!(release(s, r, &[("x", false), ("y", false)], "A", 6), [1, 0]);
        assert!(published(r).is_empty(), "nobody waited for x");
        assert_eq!(release(s, r, &[("y", true)], "B", 7), [1]);
        assert_eq!(published(r), ["y"]);
        // y's settled hint answers an acquire that asks for it, and only that one.
        assert_eq!(acquire(s, r, &["y", "y2"], "C", &[true, true], 8).2, [0, 4]);
        assert_eq!(acquire(s, r, &["y"], "C", &[false], 8).2, [5]);
        // A lease past its TTL is free: z (granted at 4, 10 ms) at 14.
        assert_eq!(acquire(s, r, &["z"], "D", &[false], 14).2, [6]);
        assert_eq!(r.grants, 6);
    }

    /// A flush loses the counter, the epoch and the incarnation together; a raise
    /// carrying the incarnation from before the flush is refused.
    #[test]
    fn a_raise_delayed_across_a_flush_is_refused() {
        let (mut s, mut r) = (Scripts::new().unwrap(), RedisState::default());
        let (s, r) = (&mut s, &mut r);
        let (epoch, inc, n) = acquire(s, r, &["x"], "A", &[false], 0);
        assert_eq!((epoch, n), (None, vec![1]));
        let inc = inc.expect("the grant created the hash");
        r.flush();
        let (_, inc2, _) = acquire(s, r, &["y"], "B", &[false], 1);
        assert_eq!(raise(s, r, RAISE_EPOCH, 5, &inc), None);
        let inc2 = inc2.expect("re-created");
        assert_eq!(raise(s, r, RAISE_EPOCH, 6, &inc2), Some(6));
        assert_eq!(
            raise(s, r, RAISE_EPOCH, 4, &inc2),
            Some(6),
            "the epoch only rises"
        );
        assert_eq!(acquire(s, r, &["z"], "C", &[false], 2).0, Some(6));
    }

    /// [`RAISE_EPOCH`] with its incarnation check edited out (the bug the
    /// simulation found at seed 2424 of an older schedule; the CI seeds no
    /// longer reach its window, RELIABILITY.md row 6): `(fresh, incarnation)`
    /// of a raise delayed across a flush lands on the re-created hash before
    /// that hash's own raise, and the grants that follow pack an epoch below
    /// the tokens handed out before the flush. The shipped text refuses the
    /// late raise, and the next grant's own raise takes a fresh, higher epoch.
    #[test]
    fn without_the_incarnation_check_a_delayed_raise_puts_an_old_epoch_back() {
        let check =
            "if (redis.call('HGET', KEYS[1], 'inc') or '') ~= ARGV[2] then\n  return false\nend\n";
        assert!(
            RAISE_EPOCH.contains(check),
            "the check this test removes is gone: update the test"
        );
        let edited: &'static str = Box::leak(RAISE_EPOCH.replacen(check, "", 1).into_boxed_str());
        // x under (epoch, n), as each text leaves it after the delayed raise.
        let after_delayed_raise = |text: &'static str| {
            let (mut s, mut r) = (Scripts::new().unwrap(), RedisState::default());
            let (s, r) = (&mut s, &mut r);
            // A's grant creates the hash and A takes epoch 5 from the database;
            // its raise is delayed. B's grant raises 6 meanwhile, and B holds x
            // under (6, 2).
            let (_, inc_a, _) = acquire(s, r, &["w"], "A", &[false], 0);
            let (_, inc, n) = acquire(s, r, &["x"], "B", &[false], 0);
            assert_eq!(n, [2]);
            assert_eq!(raise(s, r, RAISE_EPOCH, 6, &inc.unwrap()), Some(6));
            // Flush; C re-creates the hash; A's late raise lands first.
            r.flush();
            acquire(s, r, &["v"], "C", &[false], 1);
            let late = raise(s, r, text, 5, &inc_a.unwrap());
            // x's lease has gone with the flush: D takes it.
            let (epoch, _, n) = acquire(s, r, &["x"], "D", &[false], 1);
            (late, epoch, n[0])
        };
        assert_eq!(
            after_delayed_raise(RAISE_EPOCH),
            (None, None, 2),
            "shipped: the late raise is refused; D raises a fresh epoch itself"
        );
        let (late, epoch, n) = after_delayed_raise(edited);
        assert_eq!(late, Some(5), "edited: the late raise is applied");
        assert!(
            payguard::lock::token::pack(epoch.unwrap(), n) < payguard::lock::token::pack(6, 2),
            "edited: D, the live holder of x, gets a token below B's earlier one"
        );
    }

    /// Redis's Lua-to-RESP rules, on scripts of their own.
    #[test]
    fn replies_cross_from_lua_as_redis_converts_them() {
        let (mut s, mut r) = (Scripts::new().unwrap(), RedisState::default());
        let mut eval = |text: &'static str| s.eval(&mut r, text, &[], &[], 0);
        assert_eq!(eval("return false"), Ok(Value::Nil));
        assert_eq!(eval("return nil"), Ok(Value::Nil));
        assert_eq!(eval("return true"), Ok(Value::Int(1)));
        assert_eq!(eval("return 3.99"), Ok(Value::Int(3)));
        assert_eq!(eval("return -3.99"), Ok(Value::Int(-3)));
        assert_eq!(eval("return 'x'"), Ok(Value::BulkString(b"x".to_vec())));
        assert_eq!(
            eval("return {1, false, 'a', nil, 2}"),
            Ok(Value::Array(vec![
                Value::Int(1),
                Value::Nil,
                Value::BulkString(b"a".to_vec())
            ])),
            "an array ends at its first nil"
        );
        assert_eq!(eval("return {ok = 'OK'}"), Ok(Value::Okay));
        assert_eq!(eval("return {err = 'boom'}"), Err("boom".into()));
        // A missing key reads as false; a status reply as a table.
        assert_eq!(
            eval("return {redis.call('GET', 'k') == false, type(redis.call('SET', 'k', 'v'))}"),
            Ok(Value::Array(vec![
                Value::Int(1),
                Value::BulkString(b"table".to_vec())
            ]))
        );
        // Numbers cross to commands as Lua prints them.
        assert_eq!(
            eval("redis.call('SET', 'n', 10 + 5, 'PX', 2 * 50) return redis.call('PTTL', 'n')"),
            Ok(Value::Int(100))
        );
        assert_eq!(
            eval("return redis.call('GET', 'n')"),
            Ok(Value::BulkString(b"15".to_vec()))
        );
    }

    /// A command the model does not serve, a wrong type, or a global fails the
    /// script; `redis.pcall` hands the error back instead.
    #[test]
    fn an_unmodelled_command_fails_the_script_loudly() {
        let (mut s, mut r) = (Scripts::new().unwrap(), RedisState::default());
        let mut eval = |text: &'static str| s.eval(&mut r, text, &[], &[], 0);
        let e = eval("return redis.call('INCR', 'k')").unwrap_err();
        assert!(e.contains("does not model"), "{e}");
        let e = eval("return redis.call('SET', 'k', 'v', 'EX', 5)").unwrap_err();
        assert!(e.contains("not modelled"), "{e}");
        eval("redis.call('HSET', 'h', 'f', 'v')").unwrap();
        let e = eval("return redis.call('GET', 'h')").unwrap_err();
        assert!(e.contains("WRONGTYPE"), "{e}");
        let e = eval("x = 1").unwrap_err();
        assert!(e.contains("create global"), "{e}");
        let e = eval("return math.random(1, 6)").unwrap_err();
        assert!(e.contains("random"), "{e}");
        let e = eval("return os.time()").unwrap_err();
        assert!(e.contains("nonexistent global"), "{e}");
        assert_eq!(
            eval("return redis.pcall('INCR', 'k')['err'] ~= nil"),
            Ok(Value::Int(1))
        );
    }
}
