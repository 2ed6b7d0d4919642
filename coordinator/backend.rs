//! Read-only access to the backend's Redis (`--redis`): samples of its streams for the
//! diagnosis backlog, and the diagnosis results joined to their raw entries for the score.
//! Only EXISTS, XINFO, XRANGE and TIME are ever sent: vtox never writes to a backend's Redis.

use crate::args::{RedisArgs, ScoreArgs};
use anyhow::{anyhow, Context, Result};
use redis::aio::MultiplexedConnection;
use redis::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use vtox::backlog::{self, parse_entries_added, parse_groups, text, Sample};
use vtox::redis_url::shown;
use vtox::score::{Diagnosis, Raw, Scorecard, Truth};

/// One Redis call may take this long before the backend's Redis counts as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Results read per XRANGE page.
const PAGE: usize = 500;

async fn call<T: redis::FromRedisValue>(
    con: &mut MultiplexedConnection,
    cmd: &redis::Cmd,
) -> Result<T> {
    tokio::time::timeout(CALL_TIMEOUT, cmd.query_async(con))
        .await
        .map_err(|_| anyhow!("the backend's Redis did not answer within {CALL_TIMEOUT:?}"))?
        .map_err(|e| anyhow!("the backend's Redis: {e}"))
}

/// This host's clock in Unix seconds.
pub fn unix_now() -> f64 {
    vtox::ingest::unix_secs(SystemTime::now())
}

/// A connection to the backend's Redis.
#[derive(Clone)]
pub struct BackendRedis {
    con: MultiplexedConnection,
    raw: String,
    results: String,
}

impl BackendRedis {
    /// Connects when `--redis` was given.
    pub async fn connect(a: &RedisArgs) -> Result<Option<BackendRedis>> {
        let Some(url) = &a.redis else {
            return Ok(None);
        };
        let client = redis::Client::open(url.as_str()).context("--redis")?;
        let con = tokio::time::timeout(CALL_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| anyhow!("the backend's Redis at {} did not answer", shown(url)))?
            .with_context(|| format!("cannot reach the backend's Redis at {}", shown(url)))?;
        Ok(Some(BackendRedis {
            con,
            raw: a.raw_stream.clone(),
            results: a.results_stream.clone(),
        }))
    }

    async fn exists(&mut self, key: &str) -> Result<bool> {
        let n: u64 = call(&mut self.con, redis::cmd("EXISTS").arg(key)).await?;
        Ok(n > 0)
    }

    async fn stream_added(&mut self, key: &str) -> Result<Option<u64>> {
        if !self.exists(key).await? {
            // Nothing was ever added (or the stream was deleted): nothing to rate.
            return Ok(Some(0));
        }
        let info: Value = call(&mut self.con, redis::cmd("XINFO").arg("STREAM").arg(key)).await?;
        Ok(parse_entries_added(&info))
    }

    /// The streams and the raw stream's consumer groups now, settled (see `Sample::settle`).
    pub async fn sample(&mut self) -> Result<Sample> {
        let at_s = unix_now();
        let raw = self.raw.clone();
        let (raw_len, raw_added, groups) = if self.exists(&raw).await? {
            let len: u64 = call(&mut self.con, redis::cmd("XLEN").arg(&raw)).await?;
            let info: Value =
                call(&mut self.con, redis::cmd("XINFO").arg("STREAM").arg(&raw)).await?;
            let g: Value = call(&mut self.con, redis::cmd("XINFO").arg("GROUPS").arg(&raw)).await?;
            (len, parse_entries_added(&info), parse_groups(&g))
        } else {
            (0, Some(0), Vec::new())
        };
        let results = self.results.clone();
        let results_added = self.stream_added(&results).await?;
        let mut sample = Sample {
            at_s,
            raw_len,
            raw_added,
            results_added,
            groups,
        };
        sample.settle();
        Ok(sample)
    }

    /// The Redis server's clock in Unix milliseconds: it stamps the entry IDs, so time
    /// ranges over streams are taken on it, not on this host's clock.
    pub async fn server_ms(&mut self) -> Result<u64> {
        let (secs, micros): (u64, u64) = call(&mut self.con, &redis::cmd("TIME")).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// Scores every result written since `from_ms` (server time; all when None) against its
    /// raw entry's truth.
    pub async fn score(&mut self, from_ms: Option<u64>) -> Result<Scorecard> {
        let mut start = from_ms.map_or_else(|| "-".to_string(), |ms| ms.to_string());
        let mut card = Scorecard::new();
        let mut truths: HashMap<String, Option<Option<Truth>>> = HashMap::new();
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_message("scoring diagnoses");
        loop {
            let page: Value = call(
                &mut self.con,
                redis::cmd("XRANGE")
                    .arg(&self.results)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(PAGE),
            )
            .await?;
            let page = entries(&page);
            let Some((last_id, _)) = page.last() else {
                break;
            };
            start = format!("({last_id}");
            let parsed: Vec<Option<Diagnosis>> = page
                .iter()
                .map(|(id, f)| Diagnosis::parse(id, f).ok())
                .collect();
            let missing: Vec<String> = parsed
                .iter()
                .flatten()
                .filter(|d| !truths.contains_key(&d.original_id))
                .map(|d| d.original_id.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if !missing.is_empty() {
                // Results of five analyzers point at the same raw entries: fetch each once.
                if truths.len() > 200_000 {
                    truths.clear();
                }
                let mut pipe = redis::pipe();
                for id in &missing {
                    pipe.cmd("XRANGE")
                        .arg(&self.raw)
                        .arg(id)
                        .arg(id)
                        .arg("COUNT")
                        .arg(1);
                }
                let replies: Vec<Value> =
                    tokio::time::timeout(CALL_TIMEOUT * 4, pipe.query_async(&mut self.con))
                        .await
                        .map_err(|_| anyhow!("the backend's Redis did not answer in time"))?
                        .map_err(|e| anyhow!("the backend's Redis: {e}"))?;
                for (id, reply) in missing.into_iter().zip(replies) {
                    let found = entries(&reply).into_iter().next().map(|(_, fields)| {
                        fields
                            .iter()
                            .find(|(k, _)| k == "metadata")
                            .and_then(|(_, v)| Truth::from_metadata(v))
                    });
                    truths.insert(id, found);
                }
            }
            for d in &parsed {
                match d {
                    None => card.add_unreadable(),
                    Some(d) => match truths.get(&d.original_id) {
                        Some(Some(t)) => card.add(d, Raw::Found(t.as_ref())),
                        _ => card.add(d, Raw::Trimmed),
                    },
                }
            }
            bar.set_message(format!("scoring diagnoses: {} read", card.results));
            bar.tick();
            if page.len() < PAGE {
                break;
            }
        }
        bar.finish_and_clear();
        Ok(card)
    }
}

/// The entries of an XRANGE reply as (ID, field/value pairs).
fn entries(reply: &Value) -> Vec<(String, Vec<(String, String)>)> {
    let Value::Array(list) = reply else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| {
            let Value::Array(parts) = e else { return None };
            let id = text(parts.first()?)?;
            let fields = backlog::pairs(parts.get(1)?)
                .into_iter()
                .filter_map(|(k, v)| Some((k, text(v)?)))
                .collect();
            Some((id, fields))
        })
        .collect()
}

/// Samples the backend's Redis once a second in the background, keeping the newest ones.
pub struct Sampler {
    samples: Arc<Mutex<VecDeque<Sample>>>,
    error: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling; `keep` bounds the memory to that many samples.
    pub fn start(mut redis: BackendRedis, keep: usize) -> Sampler {
        let samples = Arc::new(Mutex::new(VecDeque::new()));
        let error = Arc::new(Mutex::new(None));
        let (s, e) = (samples.clone(), error.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match redis.sample().await {
                    Ok(mut sample) => {
                        if let Ok(mut q) = s.lock() {
                            if let Some(prev) = q.back() {
                                backlog::carry(prev, &mut sample);
                            }
                            q.push_back(sample);
                            while q.len() > keep.max(2) {
                                q.pop_front();
                            }
                        }
                        if let Ok(mut e) = e.lock() {
                            *e = None;
                        }
                    }
                    Err(err) => {
                        if let Ok(mut e) = e.lock() {
                            if e.is_none() {
                                tracing::warn!("{err:#}");
                            }
                            *e = Some(format!("{err:#}"));
                        }
                    }
                }
            }
        });
        Sampler {
            samples,
            error,
            task,
        }
    }

    /// Samples taken from `from_s` to `to_s` (Unix seconds), oldest first.
    pub fn between(&self, from_s: f64, to_s: f64) -> Vec<Sample> {
        self.samples
            .lock()
            .map(|q| {
                q.iter()
                    .filter(|s| s.at_s >= from_s && s.at_s <= to_s)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The newest `n` samples, oldest first.
    pub fn newest(&self, n: usize) -> Vec<Sample> {
        self.samples
            .lock()
            .map(|q| q.iter().skip(q.len().saturating_sub(n)).cloned().collect())
            .unwrap_or_default()
    }

    /// The last sampling error, while sampling fails.
    pub fn error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|e| e.clone())
    }

    /// The window over the newest `n` samples, as text (for the live views).
    pub fn view(&self, n: usize, tolerance: f64) -> String {
        if let Some(e) = self.error() {
            return format!("redis: {e}\n");
        }
        match backlog::window(&self.newest(n), tolerance) {
            Some(w) => w.table(),
            None => "redis: sampling…\n".to_string(),
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `vtox-coord score`.
pub async fn score(a: ScoreArgs) -> Result<std::process::ExitCode> {
    if a.redis.redis.is_none() {
        eprintln!("error: score needs --redis URL: the backend's Redis to read the diagnoses from");
        return Ok(std::process::ExitCode::from(2));
    }
    let mut redis = BackendRedis::connect(&a.redis)
        .await?
        .ok_or_else(|| anyhow!("no --redis"))?;
    let from = match a.since {
        Some(d) => Some(
            redis
                .server_ms()
                .await?
                .saturating_sub(d.as_millis() as u64),
        ),
        None => None,
    };
    let card = redis.score(from).await?;
    if a.json {
        println!("{}", card.json());
    } else {
        print!("{}", card.table());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_xrange_replies() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            b("5-1"),
            Value::Array(vec![b("status"), b("fault"), b("metadata"), b("{}")]),
        ])]);
        assert_eq!(
            entries(&reply),
            vec![(
                "5-1".to_string(),
                vec![
                    ("status".to_string(), "fault".to_string()),
                    ("metadata".to_string(), "{}".to_string())
                ]
            )]
        );
        assert!(entries(&Value::Nil).is_empty());
    }
}
