//! The shared [`StateStore`]: Redis 7 or Valkey, for several keygates that must agree on one
//! policy state (issue 14).
//!
//! Keys (all under `keygate:`):
//! - `tokens` (hash: token id → JSON of the issued token, hashes only), `revoked` (hash: id → 1),
//!   `tokens:rev` (counter bumped by every issue and revocation);
//! - `freezes` (hash: `*` or agent → JSON of the freeze);
//! - `approvals` (hash: id → JSON row) and `approvals:created` (sorted set by creation time, the
//!   newest 10 000 kept); `approved_tokens` (set of `route\u{1f}token_id`);
//! - `budget:AGENT` (hash: `window` start, `charged` in it, and `r:INSTANCE` tokens booked by
//!   each keygate's requests in flight);
//! - `rate:AGENT` (hash: the token bucket's `tokens` and `last` refill time; expires when idle);
//! - channel `keygate:events`: `tokens`, `freezes`, `approval:ID`, so every keygate re-reads
//!   at once instead of at its next periodic re-sync.
//!
//! Every budget and rate decision is one Lua script, so it is atomic on the server and uses the
//! server's clock (`TIME`): keygates whose clocks disagree still share one window and one bucket.
//!
//! The trait is synchronous (the embedded store is SQLite); this store runs its connection on a
//! small runtime of its own, on its own thread, so a synchronous call from an admin command, a
//! `spawn_blocking` task or a runtime worker waits on a channel and never nests runtimes. Each
//! call has a deadline ([`OP_TIMEOUT`]).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use tokio::sync::broadcast;
use zeroize::Zeroizing;

use crate::authenticate::store::Issued;
use crate::config::RedisState;

use super::{
    ApprovalRow, ApprovalState, Booking, Charge, Decision, Event, Freeze, Health, Spent,
    StateError, StateStore,
};

/// A deadline for every operation, connecting included.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the connection is checked (and the health in `status` updated).
const PING_EVERY: Duration = Duration::from_millis(250);
/// Approvals kept in the store, newest first.
const APPROVALS_KEPT: isize = 10_000;

const P: &str = "keygate:";
const CHANNEL: &str = "keygate:events";

/// Books `n` tokens for this instance's requests if the agent's window has room for them.
/// KEYS[1] budget hash; ARGV: period seconds, limit, n, this instance's field (`r:NAME`).
/// Returns {booked (1|0), seconds until the window ends}.
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1])
local per = tonumber(ARGV[1])
local window = now - (now % per)
local h = redis.call('HGETALL', KEYS[1])
local w, charged, reserved = -1, 0, 0
for i = 1, #h, 2 do
  local k, v = h[i], tonumber(h[i + 1]) or 0
  if k == 'window' then w = v
  elseif k == 'charged' then charged = v
  elseif string.sub(k, 1, 2) == 'r:' then reserved = reserved + v end
end
if w ~= window then
  charged = 0
  redis.call('HSET', KEYS[1], 'window', window, 'charged', 0)
end
local limit, n = tonumber(ARGV[2]), tonumber(ARGV[3])
local left = window + per - now
if charged + reserved >= limit or charged + reserved + n > limit then
  return {0, left}
end
redis.call('HINCRBY', KEYS[1], ARGV[4], n)
return {1, left}
"#;

/// Replaces a booking by what the request used: KEYS[1] budget hash; ARGV: period seconds,
/// booked, used, this instance's field. The used tokens land in the window current now.
const SETTLE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1])
local per = tonumber(ARGV[1])
local window = now - (now % per)
local w = tonumber(redis.call('HGET', KEYS[1], 'window') or '-1')
if w ~= window then
  redis.call('HSET', KEYS[1], 'window', window, 'charged', 0)
end
local mine = tonumber(redis.call('HGET', KEYS[1], ARGV[4]) or '0') - tonumber(ARGV[2])
if mine < 0 then mine = 0 end
redis.call('HSET', KEYS[1], ARGV[4], mine)
redis.call('HINCRBY', KEYS[1], 'charged', tonumber(ARGV[3]))
return 1
"#;

/// Takes one request from the agent's bucket: KEYS[1] rate hash; ARGV: capacity, refill per
/// second. Returns {taken (1|0), milliseconds until one is there}.
const TAKE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap, rate = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or ARGV[1])
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or tostring(now))
local elapsed = now - last
if elapsed < 0 then elapsed = 0 end
tokens = math.min(cap, tokens + elapsed * rate)
local ok, wait = 0, 0
if tokens >= 1 then
  tokens = tokens - 1
  ok = 1
else
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'last', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(cap / rate * 1000) + 60000)
return {ok, wait}
"#;

/// Decides a pending approval once, whichever keygate holds the request: KEYS[1] approvals
/// hash; ARGV: id, new state, by, reason ('' for none), decided. Returns the new row or nil.
const DECIDE: &str = r#"
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
local row = cjson.decode(raw)
if row['state'] ~= 'pending' then return false end
row['state'] = ARGV[2]
row['decided_by'] = ARGV[3]
if ARGV[4] ~= '' then row['reason'] = ARGV[4] end
row['decided'] = tonumber(ARGV[5])
local out = cjson.encode(row)
redis.call('HSET', KEYS[1], ARGV[1], out)
return out
"#;

/// The Redis store. Cloning the connection manager is cheap; it reconnects by itself.
pub struct RedisStore {
    location: String,
    instance: String,
    max_stale: Duration,
    rt: tokio::runtime::Handle,
    conn: ConnectionManager,
    health: Arc<Watch>,
    events: broadcast::Sender<Event>,
    scripts: Arc<Scripts>,
}

struct Scripts {
    reserve: Script,
    settle: Script,
    take: Script,
    decide: Script,
}

/// What the store knows of its connection, for `status` and the staleness check.
struct Watch {
    born: Instant,
    /// Milliseconds since `born` of the last successful round trip; 0: never.
    last_ok_ms: AtomicU64,
    connected: AtomicBool,
    reconnects: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Watch {
    fn ok(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ok_ms.store(ms.max(1), Ordering::Relaxed);
        if !self.connected.swap(true, Ordering::Relaxed) {
            tracing::info!("state store reachable");
        }
    }

    fn failed(&self, e: &str) {
        if self.connected.swap(false, Ordering::Relaxed) {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "state store unreachable; decisions that need it are refused until it is back");
        }
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    fn age(&self) -> Option<Duration> {
        let ms = self.last_ok_ms.load(Ordering::Relaxed);
        (ms != 0).then(|| {
            self.born
                .elapsed()
                .saturating_sub(Duration::from_millis(ms))
        })
    }
}

impl RedisStore {
    /// Connects (within [`OP_TIMEOUT`]) and starts the health check and the event subscriber.
    /// `password` comes from the secret named by `password_from`.
    pub fn open(
        cfg: &RedisState,
        instance: &str,
        password: Option<Zeroizing<String>>,
    ) -> Result<RedisStore, StateError> {
        let location = cfg.url.clone();
        let err = |m: String| StateError::Store {
            path: location.clone().into(),
            message: m,
        };
        let info = connection_info(cfg, password.as_deref().map(|p| p.as_str()))
            .map_err(|e| err(format!("bad url: {e}")))?;
        let client = redis::Client::open(info).map_err(|e| err(e.to_string()))?;
        let rt = store_runtime().map_err(|e| err(format!("cannot start its runtime: {e}")))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let c2 = client.clone();
        let conn = block_on(&rt, async move {
            tokio::time::timeout(OP_TIMEOUT, c2.get_connection_manager_with_config(config))
                .await
                .map_err(|_| "connecting timed out".to_string())?
                .map_err(|e| e.to_string())
        })
        .and_then(|r| r)
        .map_err(|e| err(format!("cannot connect: {e}")))?;
        let health = Arc::new(Watch {
            born: Instant::now(),
            last_ok_ms: AtomicU64::new(0),
            connected: AtomicBool::new(true),
            reconnects: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        health.ok();
        let (events, _) = broadcast::channel(256);
        let store = RedisStore {
            location: redacted_location(&cfg.url),
            instance: instance.to_string(),
            max_stale: cfg.max_stale,
            rt: rt.clone(),
            conn,
            health: health.clone(),
            events: events.clone(),
            scripts: Arc::new(Scripts {
                reserve: Script::new(RESERVE),
                settle: Script::new(SETTLE),
                take: Script::new(TAKE),
                decide: Script::new(DECIDE),
            }),
        };
        rt.spawn(pinger(store.conn.clone(), health.clone()));
        rt.spawn(subscriber(client, events, health));
        Ok(store)
    }

    /// Runs `f` on the store's runtime and waits for it, within [`OP_TIMEOUT`].
    fn run<T, F, Fut>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
    {
        let fut = f(self.conn.clone());
        let health = self.health.clone();
        let out = block_on(&self.rt, bounded(fut, health));
        match out {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(m)) | Err(m) => Err(self.error(m)),
        }
    }

    /// A decision on the request's own task: the multiplexed connection's driver (on the
    /// store's runtime) does the I/O, so the request waits for one hand-off each way; spawning
    /// the call on the store's runtime first added a third (issue 13's thread hops).
    fn decide<T, F, Fut>(&self, f: F) -> Decision<T>
    where
        T: Send + 'static,
        F: FnOnce(ConnectionManager, Arc<Scripts>) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>> + Send + 'static,
    {
        let fut = f(self.conn.clone(), self.scripts.clone());
        let health = self.health.clone();
        let location = self.location.clone();
        Box::pin(async move {
            bounded(fut, health).await.map_err(|m| StateError::Store {
                path: location.into(),
                message: m,
            })
        })
    }

    fn error(&self, message: String) -> StateError {
        StateError::Store {
            path: self.location.clone().into(),
            message,
        }
    }

    fn publish(&self, what: String) {
        let mut c = self.conn.clone();
        // Best effort: the periodic re-sync catches anything a lost message would have said.
        self.rt.spawn(async move {
            let _ = tokio::time::timeout(OP_TIMEOUT, c.publish::<_, _, i64>(CHANNEL, what)).await;
        });
    }
}

/// A dedicated current-thread runtime on its own thread, kept alive for the process.
fn store_runtime() -> std::io::Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("keygate-state".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

/// Runs a future on `rt` from any thread (also a runtime worker) and waits for its result.
fn block_on<T: Send + 'static>(
    rt: &tokio::runtime::Handle,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv_timeout(OP_TIMEOUT + Duration::from_secs(1))
        .map_err(|_| "the state store did not answer in time".to_string())
}

fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() || e.is_io_error()
}

fn connection_info(
    cfg: &RedisState,
    password: Option<&str>,
) -> redis::RedisResult<redis::ConnectionInfo> {
    use redis::IntoConnectionInfo;
    let url = &cfg.url;
    let url = match url
        .strip_prefix("unix:")
        .filter(|p| !p.starts_with("//"))
        .or_else(|| {
            url.strip_prefix("redis+unix:")
                .filter(|p| !p.starts_with("//"))
        }) {
        Some(path) => format!("unix://{path}"),
        None => url.clone(),
    };
    let info = url.as_str().into_connection_info()?;
    let mut settings = info.redis_settings().clone();
    if let Some(u) = &cfg.username {
        settings = settings.set_username(u);
    }
    if let Some(p) = password {
        settings = settings.set_password(p);
    }
    Ok(info.set_redis_settings(settings))
}

/// The URL without any query string, for `status` and errors.
fn redacted_location(url: &str) -> String {
    format!("redis:{}", url.split('?').next().unwrap_or(url))
}

/// One store operation within [`OP_TIMEOUT`], its outcome reported to the health watch (a lost
/// connection or a timeout marks the store unreachable).
async fn bounded<T>(
    fut: impl Future<Output = redis::RedisResult<T>>,
    health: Arc<Watch>,
) -> Result<T, String> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(Ok(v)) => {
            health.ok();
            Ok(v)
        }
        Ok(Err(e)) => {
            let m = e.to_string();
            if is_connection_error(&e) {
                health.failed(&m);
            }
            Err(m)
        }
        Err(_) => {
            health.failed("timed out");
            Err("timed out".to_string())
        }
    }
}

async fn pinger(mut conn: ConnectionManager, health: Arc<Watch>) {
    let mut tick = tokio::time::interval(PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ping = redis::cmd("PING");
        match tokio::time::timeout(OP_TIMEOUT, ping.query_async::<String>(&mut conn)).await {
            Ok(Ok(_)) => health.ok(),
            Ok(Err(e)) => health.failed(&e.to_string()),
            Err(_) => health.failed("timed out"),
        }
    }
}

/// Listens on the events channel, reconnecting by itself; after each (re)connection it says
/// [`Event::Resync`], since messages sent meanwhile were lost.
async fn subscriber(client: redis::Client, events: broadcast::Sender<Event>, health: Arc<Watch>) {
    use futures_util::StreamExt;
    loop {
        let connected = tokio::time::timeout(OP_TIMEOUT, async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(CHANNEL).await?;
            Ok::<_, redis::RedisError>(ps)
        })
        .await;
        match connected {
            Ok(Ok(ps)) => {
                let _ = events.send(Event::Resync);
                let mut stream = ps.into_on_message();
                while let Some(msg) = stream.next().await {
                    let Ok(text) = msg.get_payload::<String>() else {
                        continue;
                    };
                    let _ = events.send(Event::parse(&text));
                }
                health.failed("event subscription lost");
            }
            Ok(Err(e)) => health.failed(&e.to_string()),
            Err(_) => health.failed("timed out subscribing"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn budget_key(agent: &str) -> String {
    format!("{P}budget:{agent}")
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_str(s).ok()
}

impl StateStore for RedisStore {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn shared(&self) -> bool {
        true
    }

    fn instance(&self) -> Option<&str> {
        Some(&self.instance)
    }

    fn health(&self) -> Health {
        let w = &self.health;
        let age = w.age();
        Health {
            connected: w.connected.load(Ordering::Relaxed),
            fresh: age.is_some_and(|a| a <= self.max_stale),
            last_ok_ms_ago: age.map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX)),
            reconnects: w.reconnects.load(Ordering::Relaxed),
            last_error: w
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    fn fresh(&self) -> bool {
        self.health.age().is_some_and(|a| a <= self.max_stale)
    }

    fn events(&self) -> Option<broadcast::Receiver<Event>> {
        Some(self.events.subscribe())
    }

    fn freezes(&self) -> Result<Vec<Freeze>, StateError> {
        let all = self.run(|mut c| async move {
            c.hgetall::<_, Vec<(String, String)>>(format!("{P}freezes"))
                .await
        })?;
        let mut out: Vec<Freeze> = all.iter().filter_map(|(_, v)| from_json(v)).collect();
        out.sort_by(|a, b| a.agent.cmp(&b.agent));
        Ok(out)
    }

    fn set_freeze(&self, agent: Option<&str>, on: bool, by: &str) -> Result<(), StateError> {
        let scope = agent.unwrap_or("*").to_string();
        let row = serde_json::to_string(&Freeze {
            agent: agent.map(str::to_string),
            by: by.to_string(),
            at: super::now(),
        })
        .unwrap_or_default();
        let all = agent.is_none();
        self.run(move |mut c| async move {
            let key = format!("{P}freezes");
            match (on, all) {
                (true, _) => c.hset::<_, _, _, i64>(&key, scope, row).await?,
                (false, false) => c.hdel::<_, _, i64>(&key, scope).await?,
                (false, true) => c.del::<_, i64>(&key).await?,
            };
            Ok(())
        })?;
        self.publish("freezes".into());
        Ok(())
    }

    fn spent(&self) -> Result<Vec<Spent>, StateError> {
        // Budgets live in the store itself, decided per request: nothing to restore.
        Ok(Vec::new())
    }

    fn save_spent(&self, _spent: &[Spent]) -> Result<(), StateError> {
        Ok(())
    }

    fn charge(
        &self,
        agent: &str,
        window_start: u64,
        limit: u64,
        tokens: u64,
    ) -> Result<Charge, StateError> {
        // Kept for the trait's callers; per-request budgets use `reserve_budget`.
        let key = format!("{P}charge:{agent}");
        self.run(move |mut c| async move {
            let script = Script::new(
                r#"
local w = tonumber(redis.call('HGET', KEYS[1], 'window') or '-1')
local cur = 0
if w == tonumber(ARGV[1]) then cur = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0') end
local total = cur + tonumber(ARGV[3])
if total > tonumber(ARGV[2]) then return {0, cur} end
redis.call('HSET', KEYS[1], 'window', ARGV[1], 'tokens', total)
return {1, total}
"#,
            );
            let (ok, n): (i64, u64) = script
                .key(key)
                .arg(window_start)
                .arg(limit)
                .arg(tokens)
                .invoke_async(&mut c)
                .await?;
            Ok(if ok == 1 {
                Charge::Charged(n)
            } else {
                Charge::Over(n)
            })
        })
    }

    fn reserve_budget(&self, agent: &str, per: Duration, limit: u64, n: u64) -> Decision<Booking> {
        let key = budget_key(agent);
        let field = format!("r:{}", self.instance);
        let per = per.as_secs().max(1);
        self.decide(move |mut c, s| async move {
            let (ok, left): (i64, u64) = s
                .reserve
                .key(key)
                .arg(per)
                .arg(limit)
                .arg(n)
                .arg(field)
                .invoke_async(&mut c)
                .await?;
            let left = Duration::from_secs(left.max(1));
            Ok(if ok == 1 {
                Booking::Booked
            } else {
                Booking::Refused(left)
            })
        })
    }

    fn settle_budget(&self, agent: &str, per: Duration, booked: u64, used: u64) -> Decision<()> {
        let key = budget_key(agent);
        let field = format!("r:{}", self.instance);
        let per = per.as_secs().max(1);
        self.decide(move |mut c, s| async move {
            let _: i64 = s
                .settle
                .key(key)
                .arg(per)
                .arg(booked)
                .arg(used)
                .arg(field)
                .invoke_async(&mut c)
                .await?;
            Ok(())
        })
    }

    fn forget_in_flight(&self, agents: &[String]) -> Result<(), StateError> {
        let keys: Vec<String> = agents.iter().map(|a| budget_key(a)).collect();
        let field = format!("r:{}", self.instance);
        self.run(move |mut c| async move {
            for k in keys {
                c.hdel::<_, _, i64>(k, &field).await?;
            }
            Ok(())
        })
    }

    fn budget_usage(&self, agent: &str) -> Result<u64, StateError> {
        let key = budget_key(agent);
        self.run(move |mut c| async move {
            c.hget::<_, _, Option<u64>>(key, "charged")
                .await
                .map(|v| v.unwrap_or(0))
        })
    }

    fn take_rate(&self, agent: &str, capacity: u64, per_sec: f64) -> Decision<Option<Duration>> {
        let key = format!("{P}rate:{agent}");
        self.decide(move |mut c, s| async move {
            let (ok, wait_ms): (i64, u64) = s
                .take
                .key(key)
                .arg(capacity)
                .arg(per_sec)
                .invoke_async(&mut c)
                .await?;
            Ok((ok != 1).then(|| Duration::from_millis(wait_ms)))
        })
    }

    fn put_approval(&self, row: &ApprovalRow) -> Result<(), StateError> {
        let json = serde_json::to_string(row).unwrap_or_default();
        let (id, created) = (row.id.clone(), row.created);
        self.run(move |mut c| async move {
            redis::pipe()
                .atomic()
                .hset(format!("{P}approvals"), &id, json)
                .ignore()
                .zadd(format!("{P}approvals:created"), &id, created)
                .ignore()
                .query_async::<()>(&mut c)
                .await?;
            // Old rows go, so the store does not grow forever.
            let old: Vec<String> = c
                .zrange(format!("{P}approvals:created"), 0, -(APPROVALS_KEPT + 1))
                .await?;
            if !old.is_empty() {
                redis::pipe()
                    .hdel(format!("{P}approvals"), &old)
                    .ignore()
                    .zrem(format!("{P}approvals:created"), &old)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await?;
            }
            Ok(())
        })
    }

    fn approvals(&self, limit: usize) -> Result<Vec<ApprovalRow>, StateError> {
        let stop = isize::try_from(limit)
            .unwrap_or(isize::MAX)
            .saturating_sub(1);
        self.run(move |mut c| async move {
            let ids: Vec<String> = c
                .zrevrange(format!("{P}approvals:created"), 0, stop)
                .await?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let rows: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(format!("{P}approvals"))
                .arg(&ids)
                .query_async(&mut c)
                .await?;
            Ok(rows
                .iter()
                .flatten()
                .filter_map(|r| from_json::<ApprovalRow>(r))
                .collect())
        })
    }

    fn approval(&self, id: &str) -> Result<Option<ApprovalRow>, StateError> {
        let id = id.to_string();
        self.run(move |mut c| async move {
            let row: Option<String> = c.hget(format!("{P}approvals"), id).await?;
            Ok(row.and_then(|r| from_json(&r)))
        })
    }

    fn decide_approval(
        &self,
        id: &str,
        state: ApprovalState,
        by: &str,
        reason: Option<&str>,
    ) -> Result<Option<ApprovalRow>, StateError> {
        let args = (
            id.to_string(),
            state.as_str(),
            by.to_string(),
            reason.unwrap_or("").to_string(),
            super::now(),
        );
        let scripts = self.scripts.clone();
        let row = self.run(move |mut c| async move {
            let out: Option<String> = scripts
                .decide
                .key(format!("{P}approvals"))
                .arg(&args.0)
                .arg(args.1)
                .arg(&args.2)
                .arg(&args.3)
                .arg(args.4)
                .invoke_async(&mut c)
                .await?;
            Ok(out)
        })?;
        let row = row.and_then(|r| from_json::<ApprovalRow>(&r));
        if row.is_some() {
            self.publish(format!("approval:{id}"));
        }
        Ok(row)
    }

    fn approve_token(&self, route: &str, token_id: &str) -> Result<(), StateError> {
        let member = format!("{route}\u{1f}{token_id}");
        self.run(move |mut c| async move {
            c.sadd::<_, _, i64>(format!("{P}approved_tokens"), member)
                .await?;
            Ok(())
        })
    }

    fn source_state(&self, key: &str) -> Result<Option<String>, StateError> {
        let key = key.to_string();
        self.run(move |mut c| async move {
            c.hget::<_, _, Option<String>>(format!("{P}source_state"), key)
                .await
        })
    }

    fn put_source_state(&self, key: &str, value: &str) -> Result<(), StateError> {
        let (key, value) = (key.to_string(), value.to_string());
        self.run(move |mut c| async move {
            c.hset::<_, _, _, ()>(format!("{P}source_state"), key, value)
                .await
        })
    }

    fn approved_tokens(&self) -> Result<Vec<(String, String)>, StateError> {
        let all = self.run(|mut c| async move {
            c.smembers::<_, Vec<String>>(format!("{P}approved_tokens"))
                .await
        })?;
        Ok(all
            .iter()
            .filter_map(|m| m.split_once('\u{1f}'))
            .map(|(r, t)| (r.to_string(), t.to_string()))
            .collect())
    }

    fn tokens(&self) -> Result<Vec<Issued>, StateError> {
        let (all, revoked) = self.run(|mut c| async move {
            let all: Vec<(String, String)> = c.hgetall(format!("{P}tokens")).await?;
            let revoked: Vec<(String, String)> = c.hgetall(format!("{P}revoked")).await?;
            Ok((all, revoked))
        })?;
        let mut out: Vec<Issued> = all
            .iter()
            .filter_map(|(_, v)| from_json::<Issued>(v))
            .map(|mut t| {
                t.revoked |= revoked.iter().any(|(id, _)| id == &t.id);
                t
            })
            .collect();
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    fn add_token(&self, token: &Issued) -> Result<(), StateError> {
        let json = serde_json::to_string(token).unwrap_or_default();
        let id = token.id.clone();
        let now = super::now();
        self.run(move |mut c| async move {
            // Expired tokens are dropped as new ones are issued, so the hash does not grow
            // forever.
            let all: Vec<(String, String)> = c.hgetall(format!("{P}tokens")).await?;
            let expired: Vec<String> = all
                .iter()
                .filter_map(|(k, v)| Some((k, from_json::<Issued>(v)?)))
                .filter(|(_, t)| t.expires <= now)
                .map(|(k, _)| k.clone())
                .collect();
            let mut p = redis::pipe();
            p.atomic();
            if !expired.is_empty() {
                p.hdel(format!("{P}tokens"), &expired).ignore();
                p.hdel(format!("{P}revoked"), &expired).ignore();
            }
            p.hset_nx(format!("{P}tokens"), id, json)
                .ignore()
                .incr(format!("{P}tokens:rev"), 1)
                .ignore()
                .publish(CHANNEL, "tokens")
                .ignore();
            p.query_async::<()>(&mut c).await
        })
    }

    fn revoke_tokens(&self, id: Option<&str>, agent: Option<&str>) -> Result<usize, StateError> {
        let ids: Vec<String> = self
            .tokens()?
            .into_iter()
            .filter(|t| id == Some(t.id.as_str()) || agent == Some(t.agent.as_str()))
            .map(|t| t.id)
            .collect();
        self.run(move |mut c| async move {
            let mut n = 0;
            for id in &ids {
                let newly: bool = c.hset_nx(format!("{P}revoked"), id, 1).await?;
                n += usize::from(newly);
            }
            redis::pipe()
                .atomic()
                .incr(format!("{P}tokens:rev"), 1)
                .ignore()
                .publish(CHANNEL, "tokens")
                .ignore()
                .query_async::<()>(&mut c)
                .await?;
            Ok(n)
        })
    }

    fn tokens_revision(&self) -> Result<u64, StateError> {
        self.run(|mut c| async move {
            c.get::<_, Option<u64>>(format!("{P}tokens:rev"))
                .await
                .map(|v| v.unwrap_or(0))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> RedisState {
        RedisState {
            url: url.into(),
            tls: false,
            username: Some("kg".into()),
            password_from: None,
            rate_limits: crate::config::FailMode::FailClosed,
            max_stale: Duration::from_secs(5),
        }
    }

    #[test]
    fn urls_of_every_accepted_shape_become_connection_info() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis://127.0.0.1:6379/2",
            "unix:/run/redis.sock",
            "unix:///run/redis.sock",
            "rediss://cache.example:6380",
        ] {
            let info = connection_info(&cfg(url), Some("pw")).unwrap();
            assert_eq!(info.redis_settings().username(), Some("kg"), "{url}");
            assert_eq!(info.redis_settings().password(), Some("pw"), "{url}");
        }
    }

    #[test]
    fn the_shown_location_never_carries_a_query() {
        assert_eq!(
            redacted_location("redis://h:1/0?protocol=3"),
            "redis:redis://h:1/0"
        );
    }
}
