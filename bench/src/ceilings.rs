//! The components' own ceilings, measured in the same run as the pipeline: RabbitMQ (persistent messages,
//! confirms, prefetch, multi-ack), postfix `smtp-source` against the same sink, and a PostgreSQL batched
//! `SKIP LOCKED` claim loop.

use std::collections::VecDeque;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use tokio::time::Instant;

/// Persistent delivery mode.
const PERSISTENT: u8 = 2;

/// Publishes `bodies` on `channel` (in confirm mode) with at most `window` unconfirmed messages in flight; fails
/// on the first nack. Returns how many were published.
pub async fn publish_window(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    bodies: impl Iterator<Item = Vec<u8>>,
    properties: &BasicProperties,
    window: usize,
) -> anyhow::Result<u64> {
    let mut in_flight = VecDeque::with_capacity(window);
    let mut published = 0u64;
    for body in bodies {
        if in_flight.len() >= window.max(1) {
            if let Some(confirm) = in_flight.pop_front() {
                check(confirm).await?;
            }
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                properties.clone(),
            )
            .await
            .with_context(|| format!("failed to publish to {exchange:?}"))?;
        in_flight.push_back(confirm);
        published += 1;
    }
    for confirm in in_flight {
        check(confirm).await?;
    }
    Ok(published)
}

async fn check(confirm: lapin::PublisherConfirm) -> anyhow::Result<()> {
    let confirmation = confirm.await.context("lost a publisher confirm")?;
    if !confirmation.is_ack() {
        anyhow::bail!("the broker refused a message (nack)");
    }
    Ok(())
}

/// A channel in confirm mode.
pub async fn confirm_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await.context("failed to open a channel")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .context("failed to enable confirms")?;
    Ok(channel)
}

/// Persistent properties for a content type.
pub fn persistent(content_type: &str) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type(content_type.into())
}

/// Consumes `n` messages from `queue` with `prefetch`, acknowledging with `multiple` every `ack_every`.
pub async fn consume_n(
    connection: &Connection,
    queue: &str,
    n: u64,
    prefetch: u16,
    ack_every: u64,
) -> anyhow::Result<()> {
    let channel = connection.create_channel().await.context("failed to open a channel")?;
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let tag = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("failed to consume {queue}"))?;
    let (mut seen, mut unacked) = (0u64, 0u64);
    while seen < n {
        let next = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .with_context(|| format!("no message from {queue} for 30 s after {seen} of {n}"))?;
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => return Err(anyhow::Error::new(e).context("the consumer failed")),
            None => anyhow::bail!("the broker cancelled the consumer"),
        };
        seen += 1;
        unacked += 1;
        if unacked >= ack_every || seen == n {
            delivery.ack(BasicAckOptions { multiple: true }).await?;
            unacked = 0;
        }
    }
    let _ = channel
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    let _ = channel.close(200, "done".into()).await;
    Ok(())
}

/// Declares the scratch queue (durable, classic version 2 like the services' queues) and returns its name.
pub async fn scratch_queue(channel: &Channel, name: &str) -> anyhow::Result<()> {
    let mut args = FieldTable::default();
    args.insert("x-queue-version".into(), AMQPValue::LongInt(2));
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .with_context(|| format!("failed to declare {name}"))?;
    Ok(())
}

/// RabbitMQ ceilings (messages per second).
#[derive(Debug, Clone, Copy, Default)]
pub struct AmqpCeiling {
    pub publish: f64,
    pub consume: f64,
    /// Publishing and consuming at once through one queue: what one hop of the pipeline can carry.
    pub hop: f64,
}

/// Publish, then consume, then both at once, `n` messages of `size` bytes each, on a scratch queue.
pub async fn amqp(
    connection: &Connection,
    queue: &str,
    n: u64,
    size: usize,
    window: usize,
) -> anyhow::Result<AmqpCeiling> {
    let channel = confirm_channel(connection).await?;
    scratch_queue(&channel, queue).await?;
    let body = vec![b'x'; size];
    let props = persistent("application/octet-stream");

    let started = Instant::now();
    publish_window(&channel, "", queue, (0..n).map(|_| body.clone()), &props, window).await?;
    let publish = crate::stats::rate(n, started.elapsed());

    let started = Instant::now();
    consume_n(connection, queue, n, 512, 128).await?;
    let consume = crate::stats::rate(n, started.elapsed());

    let started = Instant::now();
    let consumer = consume_n(connection, queue, n, 512, 128);
    let producer = publish_window(&channel, "", queue, (0..n).map(|_| body.clone()), &props, window);
    let (c, p) = tokio::join!(consumer, producer);
    c?;
    p?;
    let hop = crate::stats::rate(n, started.elapsed());

    let _ = channel.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
    let _ = channel.close(200, "done".into()).await;
    Ok(AmqpCeiling { publish, consume, hop })
}

/// Runs postfix `smtp-source` (`sessions` connections kept open, `n` messages with `size` bytes of payload)
/// against `addr`; returns messages per second.
pub async fn smtp_source(addr: &str, sessions: u32, n: u64, size: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let output = tokio::process::Command::new("smtp-source")
        .args([
            // -A: a refused message does not stop it (the sink counts what it got; the caller compares).
            "-A",
            "-d",
            "-s",
            &sessions.to_string(),
            "-m",
            &n.to_string(),
            "-l",
            &size.to_string(),
            "-f",
            "bench@leadflow.localhost",
            "-t",
            "sink@leadflow.localhost",
            addr,
        ])
        .output()
        .await
        .context("cannot run smtp-source (apt-get install postfix)")?;
    let elapsed = started.elapsed();
    if !output.status.success() {
        anyhow::bail!(
            "smtp-source failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(crate::stats::rate(n, elapsed))
}

/// PostgreSQL: `clients` connections each claiming `batch` due rows per transaction (`FOR UPDATE SKIP LOCKED`,
/// marking them claimed) from a scratch table of `n` rows until none is left; rows per second.
pub async fn postgres_claims(url: &str, n: u64, clients: usize, batch: i64) -> anyhow::Result<f64> {
    let setup = crate::db::connect(url).await?;
    setup
        .batch_execute(
            "DROP TABLE IF EXISTS bench_claims;
             CREATE TABLE bench_claims (id BIGSERIAL PRIMARY KEY, due_at TIMESTAMPTZ NOT NULL,
                                        state TEXT NOT NULL DEFAULT 'pending');
             CREATE INDEX bench_claims_due ON bench_claims (due_at) WHERE state = 'pending';",
        )
        .await?;
    setup
        .execute(
            "INSERT INTO bench_claims (due_at) SELECT now() - make_interval(secs => g) FROM generate_series(1, $1::bigint) g",
            &[&(n as i64)],
        )
        .await?;
    setup.batch_execute("VACUUM ANALYZE bench_claims").await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients.max(1) {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = crate::db::connect(&url).await?;
            let mut claimed = 0u64;
            loop {
                let tx = client.transaction().await?;
                let rows = tx
                    .query(
                        "UPDATE bench_claims SET state = 'claimed'
                         WHERE id IN (SELECT id FROM bench_claims WHERE state = 'pending' AND due_at <= now()
                                      ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                         RETURNING id",
                        &[&batch],
                    )
                    .await?;
                tx.commit().await?;
                if rows.is_empty() {
                    return anyhow::Ok(claimed);
                }
                claimed += rows.len() as u64;
            }
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.context("a claim client panicked")??;
    }
    let elapsed = started.elapsed();
    setup.batch_execute("DROP TABLE IF EXISTS bench_claims").await?;
    if total != n {
        anyhow::bail!("the claim loop claimed {total} of {n} rows");
    }
    Ok(crate::stats::rate(n, elapsed))
}
