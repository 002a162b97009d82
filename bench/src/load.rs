//! Offered load: CloudEvents over HTTP batches (as fast as possible, or paced at a fixed rate) and over AMQP.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// The event type every benchmark event has; the benchmark campaign targets it.
pub const EVENT_TYPE: &str = "checkout.abandoned";

/// Event `i` of a run tagged `tag`: a new lead (unique email) abandoning a checkout, with every field the
/// benchmark template uses.
pub fn event(tag: &str, i: u64) -> Value {
    json!({
        "specversion": "1.0",
        "id": format!("{tag}-{i}"),
        "source": "/bench/shop",
        "type": EVENT_TYPE,
        "datacontenttype": "application/json",
        "data": {
            "email": format!("{tag}-{i}@bench.example.com"),
            "first_name": "Robin",
            "last_name": "Example",
            "country": "GB",
            "language": "en",
            "checkout_id": format!("{tag}-co-{i}"),
            "product": {
                "sku": "KET-1",
                "name": "Copper Kettle",
                "price": 49.5,
                "currency": "GBP",
                "url": "https://shop.example/p/ket-1"
            }
        }
    })
}

/// The JSON body of a batch of events `from..to`.
pub fn batch(tag: &str, from: u64, to: u64) -> Vec<u8> {
    let events: Vec<Value> = (from..to).map(|i| event(tag, i)).collect();
    serde_json::to_vec(&events).unwrap_or_default()
}

/// Posts one batch; returns how many events the service accepted (202 `accepted`).
pub async fn post_batch(http: &reqwest::Client, url: &str, body: Vec<u8>) -> anyhow::Result<u64> {
    let response = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/cloudevents-batch+json")
        .body(body)
        .send()
        .await
        .context("POST /v1/events failed")?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if status != reqwest::StatusCode::ACCEPTED {
        anyhow::bail!("POST /v1/events answered {status}: {text}");
    }
    let parsed: Value = serde_json::from_str(&text).context("the 202 body is not JSON")?;
    Ok(parsed.get("accepted").and_then(Value::as_u64).unwrap_or(0))
}

/// `total` events in batches of `batch_size` from `clients` concurrent clients, as fast as the service takes them.
/// Returns the events accepted.
pub async fn http_flood(
    http: &reqwest::Client,
    url: &str,
    tag: &str,
    total: u64,
    batch_size: u64,
    clients: usize,
) -> anyhow::Result<u64> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let (http, url, tag, next) = (http.clone(), url.to_string(), tag.to_string(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut accepted = 0;
            loop {
                let from = next.fetch_add(batch_size, Ordering::SeqCst);
                if from >= total {
                    return anyhow::Ok(accepted);
                }
                let to = (from + batch_size).min(total);
                accepted += post_batch(&http, &url, batch(&tag, from, to)).await?;
            }
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.context("an HTTP client panicked")??;
    }
    Ok(accepted)
}

/// What a paced offer did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Offered {
    /// Events sent.
    pub offered: u64,
    /// Events the service accepted.
    pub accepted: u64,
    /// Ticks at which the driver could not send on time because `max_in_flight` requests were outstanding.
    pub late_ticks: u64,
    /// The slowest request.
    pub slowest: Duration,
}

/// Offers `rate` events per second for `duration`: every `tick` the events due so far go out as one batch request
/// (split at `max_batch`), each request on its own task so a slow answer does not lower the offered rate.
pub async fn http_paced(
    http: &reqwest::Client,
    url: &str,
    tag: &str,
    rate: f64,
    duration: Duration,
    max_batch: u64,
) -> anyhow::Result<Offered> {
    const TICK: Duration = Duration::from_millis(50);
    let max_in_flight = 64;
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let started = Instant::now();
    let mut out = Offered::default();
    let mut tasks = Vec::new();
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        interval.tick().await;
        let elapsed = started.elapsed().min(duration);
        let due = (rate * elapsed.as_secs_f64()).floor() as u64;
        let mut from = out.offered;
        while from < due {
            let to = (from + max_batch).min(due);
            let permit = match permits.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    out.late_ticks += 1;
                    permits.clone().acquire_owned().await.context("semaphore closed")?
                }
            };
            let (http, url, body) = (http.clone(), url.to_string(), batch(tag, from, to));
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                let accepted = post_batch(&http, &url, body).await;
                drop(permit);
                accepted.map(|a| (a, sent.elapsed()))
            }));
            from = to;
        }
        out.offered = due;
        if elapsed >= duration {
            break;
        }
    }
    for task in tasks {
        let (accepted, took) = task.await.context("an HTTP request panicked")??;
        out.accepted += accepted;
        out.slowest = out.slowest.max(took);
    }
    Ok(out)
}
