//! RabbitMQ: connecting, publishing with confirms, consuming with manual acks, dead-lettering poison messages.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt as _, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::config::AmqpConfig;
use crate::messages::WorkMessage;
use crate::topology::{Topology, WorkQueue};

/// The header a dead-lettered message carries with the reason it was refused.
pub const ERROR_HEADER: &str = "x-leadflow-error";

/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

pub async fn connect(config: &AmqpConfig, name: &str) -> anyhow::Result<Connection> {
    let mut url = config.url.expose_secret().to_string();
    if !url.contains("heartbeat=") {
        // Heartbeats notice a half-open connection within a minute.
        url.push_str(if url.contains('?') {
            "&heartbeat=30"
        } else {
            "?heartbeat=30"
        });
    }
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(&url, props)
        .await
        .context("failed to connect to RabbitMQ (LEADFLOW_AMQP_URL)")
}

/// Publishes work messages on a channel in confirm mode: a publish returns once the broker has the message.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    topology: Topology,
}

impl Publisher {
    pub async fn new(connection: &Connection, topology: Topology) -> anyhow::Result<Self> {
        let channel = connection.create_channel().await.context("failed to open a channel")?;
        // Without confirm_select lapin's confirms resolve to NotRequested: durability would be a guess.
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("failed to enable publisher confirms")?;
        Ok(Self { channel, topology })
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Publishes one work message and waits for the broker's confirm.
    pub async fn publish(&self, message: &WorkMessage) -> anyhow::Result<()> {
        self.publish_all(std::slice::from_ref(message)).await
    }

    /// Publishes every message, then waits for all confirms together (one round trip, not one per message).
    pub async fn publish_all(&self, messages: &[WorkMessage]) -> anyhow::Result<()> {
        let mut confirms = Vec::with_capacity(messages.len());
        for message in messages {
            let body = serde_json::to_vec(message).context("failed to encode a work message")?;
            let props = envelope(message.kind());
            confirms.push(
                self.raw_publish(&self.topology.work_exchange(), message.queue().suffix(), &body, props)
                    .await?,
            );
        }
        for confirm in confirms {
            check_confirm(confirm.await.context("lost the publisher confirm")?)?;
        }
        Ok(())
    }

    /// Publishes an upstream event to the events exchange (what an upstream system does; used by tests and tools).
    pub async fn publish_event(&self, event_type: &str, body: &[u8]) -> anyhow::Result<()> {
        let props = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/cloudevents+json".into());
        let confirm = self
            .raw_publish(&self.topology.events_exchange(), event_type, body, props)
            .await?;
        check_confirm(confirm.await.context("lost the publisher confirm")?)
    }

    /// Moves a refused delivery to the dead-letter queue of `queue`, with the reason in [`ERROR_HEADER`].
    pub async fn dead_letter(&self, queue: WorkQueue, delivery: &Delivery, reason: &str) -> anyhow::Result<()> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let reason: String = reason.chars().take(1000).collect();
        headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(reason.into()));
        headers.insert(
            "x-leadflow-queue".into(),
            AMQPValue::LongString(self.topology.queue(queue).into()),
        );
        let props = delivery
            .properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(PERSISTENT);
        let confirm = self
            .raw_publish(
                &self.topology.dead_exchange(),
                &self.topology.queue(queue),
                &delivery.data,
                props,
            )
            .await?;
        check_confirm(confirm.await.context("lost the publisher confirm")?)
    }

    async fn raw_publish(
        &self,
        exchange: &str,
        key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> anyhow::Result<lapin::PublisherConfirm> {
        // mandatory: an unroutable message comes back instead of vanishing (a missing binding is an error).
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        self.channel
            .basic_publish(exchange.into(), key.into(), options, body, props)
            .await
            .with_context(|| format!("failed to publish to {exchange}"))
    }
}

fn envelope(kind: &str) -> BasicProperties {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type("application/json".into())
        .with_message_id(uuid::Uuid::new_v4().to_string().into())
        .with_type(kind.into())
        .with_timestamp(now)
}

fn check_confirm(confirmation: lapin::Confirmation) -> anyhow::Result<()> {
    if !confirmation.is_ack() {
        anyhow::bail!("the broker refused the message (nack)");
    }
    // An ack that carries a returned message means the message was unroutable: a failure, not a success.
    if let Some(returned) = confirmation.take_message() {
        anyhow::bail!(
            "the broker returned the message: {} {}",
            returned.reply_code,
            returned.reply_text
        );
    }
    Ok(())
}

/// What a handler decided about one delivery.
#[derive(Debug)]
pub enum Outcome {
    /// Done (or already done): acknowledge.
    Ack,
    /// The message can never be handled: move it to the dead-letter queue with the reason, then acknowledge.
    DeadLetter(String),
    /// A dependency failed (database down): put the message back after a pause, to be tried again.
    Retry(anyhow::Error),
}

/// Consumes `queue` one delivery at a time until `shutdown`; each delivery is acked only after `handle` returned.
pub async fn consume<F, Fut>(
    connection: &Connection,
    publisher: &Publisher,
    queue: WorkQueue,
    prefetch: u16,
    shutdown: CancellationToken,
    handle: F,
) -> anyhow::Result<()>
where
    F: FnMut(Delivery) -> Fut,
    Fut: Future<Output = (Delivery, Outcome)>,
{
    consume_concurrently(connection, publisher, queue, prefetch, 1, shutdown, handle).await
}

/// Opens a channel with a bounded prefetch and starts consuming `queue` on it: the queue's name, the channel (to
/// settle deliveries on and close) and the consumer.
async fn open_consumer(
    connection: &Connection,
    publisher: &Publisher,
    queue: WorkQueue,
    prefetch: u16,
) -> anyhow::Result<(String, lapin::Channel, lapin::Consumer)> {
    let name = publisher.topology().queue(queue);
    let channel = connection.create_channel().await.context("failed to open a channel")?;
    // Bounded prefetch: a consumer never holds more unacked work than it can finish during shutdown.
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .context("failed to set prefetch")?;
    let tag = format!("{}-{}", queue.suffix(), uuid::Uuid::new_v4());
    let consumer = channel
        .basic_consume(
            name.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("failed to consume {name}"))?;
    Ok((name, channel, consumer))
}

/// Consumes `queue` until `shutdown`, handling up to `parallel` deliveries at once (the handlers must not depend
/// on each other's order); each delivery is acked only after its `handle` returned. On shutdown no new delivery
/// is taken and the ones being handled are finished and settled first.
pub async fn consume_concurrently<F, Fut>(
    connection: &Connection,
    publisher: &Publisher,
    queue: WorkQueue,
    prefetch: u16,
    parallel: usize,
    shutdown: CancellationToken,
    mut handle: F,
) -> anyhow::Result<()>
where
    F: FnMut(Delivery) -> Fut,
    Fut: Future<Output = (Delivery, Outcome)>,
{
    let (name, channel, mut consumer) = open_consumer(connection, publisher, queue, prefetch).await?;
    tracing::info!(queue = %name, parallel, "consuming");
    let parallel = parallel.max(1);
    let mut handling = FuturesUnordered::new();
    let mut stopping = false;
    loop {
        if stopping && handling.is_empty() {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled(), if !stopping => stopping = true,
            next = consumer.next(), if !stopping && handling.len() < parallel => {
                let delivery = match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => return Err(anyhow::Error::new(e).context(format!("consumer of {name} failed"))),
                    None => anyhow::bail!("the broker cancelled the consumer of {name}"),
                };
                let handled = handle(delivery);
                let shutdown = shutdown.clone();
                handling.push(async move {
                    let (delivery, outcome) = handled.await;
                    if matches!(outcome, Outcome::Retry(_)) {
                        // A pause before the message comes back, so a dependency that is away is not hammered.
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                    (delivery, outcome)
                });
            }
            Some((delivery, outcome)) = handling.next(), if !handling.is_empty() => {
                settle(publisher, queue, &name, delivery, outcome).await?;
            }
        }
    }
    let _ = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    let _ = channel.close(200, "shutdown".into()).await;
    tracing::info!(queue = %name, "stopped consuming");
    Ok(())
}

/// Consumes `queue` until `shutdown`, handing `handle` every delivery that is ready at once (up to `max`, at
/// least one) and settling each with the outcome returned for it, in order: the deliveries of one call may be
/// handled in one transaction. Batches are handled one after the other, so the order messages arrive in is
/// kept. When every delivery of a batch is acked, one `multiple` ack settles them all.
pub async fn consume_batches<F, Fut>(
    connection: &Connection,
    publisher: &Publisher,
    queue: WorkQueue,
    prefetch: u16,
    max: usize,
    shutdown: CancellationToken,
    mut handle: F,
) -> anyhow::Result<()>
where
    F: FnMut(Vec<Delivery>) -> Fut,
    Fut: Future<Output = Vec<(Delivery, Outcome)>>,
{
    let (name, channel, mut consumer) = open_consumer(connection, publisher, queue, prefetch).await?;
    tracing::info!(queue = %name, max, "consuming in batches");
    let delivered = |next: Option<Result<Delivery, lapin::Error>>| -> anyhow::Result<Delivery> {
        match next {
            Some(Ok(delivery)) => Ok(delivery),
            Some(Err(e)) => Err(anyhow::Error::new(e).context(format!("consumer of {name} failed"))),
            None => anyhow::bail!("the broker cancelled the consumer of {name}"),
        }
    };
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = consumer.next() => next,
        };
        let mut batch = vec![delivered(next)?];
        while batch.len() < max.max(1) {
            match consumer.next().now_or_never() {
                Some(next) => batch.push(delivered(next)?),
                None => break,
            }
        }
        let handled = handle(batch).await;
        if handled.iter().all(|(_, outcome)| matches!(outcome, Outcome::Ack)) {
            // Every earlier delivery of this channel is settled: one ack with `multiple` settles the batch.
            if let Some((last, _)) = handled.iter().max_by_key(|(d, _)| d.delivery_tag) {
                last.ack(BasicAckOptions { multiple: true })
                    .await
                    .context("failed to ack")?;
            }
            continue;
        }
        if handled.iter().any(|(_, outcome)| matches!(outcome, Outcome::Retry(_))) {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        for (delivery, outcome) in handled {
            settle(publisher, queue, &name, delivery, outcome).await?;
        }
    }
    let _ = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    let _ = channel.close(200, "shutdown".into()).await;
    tracing::info!(queue = %name, "stopped consuming");
    Ok(())
}

/// Acks, dead-letters or puts back one handled delivery.
async fn settle(
    publisher: &Publisher,
    queue: WorkQueue,
    name: &str,
    delivery: Delivery,
    outcome: Outcome,
) -> anyhow::Result<()> {
    match outcome {
        Outcome::Ack => {
            delivery
                .ack(BasicAckOptions::default())
                .await
                .context("failed to ack")?;
        }
        Outcome::DeadLetter(reason) => {
            tracing::warn!(queue = %name, reason = %reason, "dead-lettering a message");
            metrics::counter!("leadflow_dead_lettered_total", "queue" => queue.suffix()).increment(1);
            publisher.dead_letter(queue, &delivery, &reason).await?;
            delivery
                .ack(BasicAckOptions::default())
                .await
                .context("failed to ack")?;
        }
        Outcome::Retry(error) => {
            tracing::warn!(queue = %name, error = format!("{error:#}"), "will retry a message");
            let requeue = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            delivery.nack(requeue).await.context("failed to nack")?;
        }
    }
    Ok(())
}
