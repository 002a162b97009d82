//! AMQP topology: every exchange and queue name, declared idempotently at start-up.
//!
//! ```text
//! <ns>.events (topic, upstream publishes here, key = event type) --#--> <ns>.ingest.events
//! <ns>.work   (direct, between services)  --scheduler--> <ns>.scheduler
//!                                         --renderer---> <ns>.renderer
//!                                         --sender-----> <ns>.sender
//! <ns>.bounces (fanout, an MTA pipe publishes raw bounce/complaint reports) --> <ns>.ingest.bounces
//! <ns>.dead   (direct, poison messages)   --<queue>----> <queue>.dead
//! <ns>.lead-events (topic, outbound: what leadflow tells other systems, key = event type such as lead.hot)
//! ```
//! Nothing of leadflow consumes `<ns>.lead-events`: other systems bind their own queues to it.
//! Every work queue dead-letters to `<ns>.dead` with its own name as routing key, so a rejected message lands in
//! the dead-letter queue beside it.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::config::{AmqpConfig, QueueType};

/// The queues services consume from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkQueue {
    /// Events published by upstream systems to the events exchange, read by ingest.
    IngestEvents,
    /// Accepted events, read by the scheduler.
    Scheduler,
    /// Deliveries that came due, read by the renderer.
    Renderer,
    /// Rendered emails ready for SMTP, read by the sender.
    Sender,
    /// Raw bounce and complaint reports (message/rfc822) published to the bounces exchange, read by ingest.
    IngestBounces,
}

impl WorkQueue {
    pub const ALL: [WorkQueue; 5] = [
        Self::IngestEvents,
        Self::Scheduler,
        Self::Renderer,
        Self::Sender,
        Self::IngestBounces,
    ];

    /// The queue's name without the namespace; also its routing key on the work exchange.
    pub fn suffix(self) -> &'static str {
        match self {
            Self::IngestEvents => "ingest.events",
            Self::Scheduler => "scheduler",
            Self::Renderer => "renderer",
            Self::Sender => "sender",
            Self::IngestBounces => "ingest.bounces",
        }
    }
}

/// Names of everything in one namespace.
#[derive(Debug, Clone)]
pub struct Topology {
    namespace: String,
    queue_type: QueueType,
    queue_expires_ms: Option<u64>,
}

impl Topology {
    pub fn new(config: &AmqpConfig) -> Self {
        Self {
            namespace: config.namespace.clone(),
            queue_type: config.queue_type,
            queue_expires_ms: config.queue_expires.map(|d| d.as_millis() as u64),
        }
    }

    /// The topic exchange upstream systems publish events to (routing key = event type).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.namespace)
    }

    /// The direct exchange carrying work between services.
    pub fn work_exchange(&self) -> String {
        format!("{}.work", self.namespace)
    }

    /// The fanout exchange an MTA pipe publishes raw bounce and complaint reports to (any routing key).
    pub fn bounces_exchange(&self) -> String {
        format!("{}.bounces", self.namespace)
    }

    /// The topic exchange leadflow publishes lead events to (routing key = event type, e.g. `lead.hot`), for
    /// other systems to bind their queues to. Outbound only: ingest consumes [`Self::events_exchange`], never this.
    pub fn lead_events_exchange(&self) -> String {
        format!("{}.lead-events", self.namespace)
    }

    /// The direct exchange poison messages are published to.
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    pub fn queue(&self, q: WorkQueue) -> String {
        format!("{}.{}", self.namespace, q.suffix())
    }

    pub fn dead_queue(&self, q: WorkQueue) -> String {
        format!("{}.dead", self.queue(q))
    }

    /// Declares every exchange, queue and binding; declaring what exists with the same arguments is a no-op.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        // Durable exchanges survive a broker restart; the defaults (not auto-delete, not internal) are wanted.
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        for (name, kind) in [
            (self.events_exchange(), ExchangeKind::Topic),
            (self.work_exchange(), ExchangeKind::Direct),
            (self.dead_exchange(), ExchangeKind::Direct),
            (self.bounces_exchange(), ExchangeKind::Fanout),
            // Topic: a subscriber binds `lead.hot` or `lead.#` and gets only what it asked for.
            (self.lead_events_exchange(), ExchangeKind::Topic),
        ] {
            channel
                .exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
                .await?;
        }
        for q in WorkQueue::ALL {
            let name = self.queue(q);
            let dead = self.dead_queue(q);

            let mut dead_args = self.base_args();
            self.declare_queue(channel, &dead, &mut dead_args).await?;
            self.bind(channel, &dead, &self.dead_exchange(), &name).await?;

            let mut args = self.base_args();
            // A message rejected without requeue (or over the delivery limit) goes to the queue's dead-letter queue.
            args.insert("x-dead-letter-exchange".into(), string(&self.dead_exchange()));
            args.insert("x-dead-letter-routing-key".into(), string(&name));
            if self.queue_type == QueueType::Quorum {
                // Quorum queues count redeliveries: a message that keeps crashing consumers is isolated.
                args.insert("x-delivery-limit".into(), AMQPValue::LongInt(20));
            }
            self.declare_queue(channel, &name, &mut args).await?;
            match q {
                WorkQueue::IngestEvents => self.bind(channel, &name, &self.events_exchange(), "#").await?,
                WorkQueue::IngestBounces => self.bind(channel, &name, &self.bounces_exchange(), "").await?,
                _ => self.bind(channel, &name, &self.work_exchange(), q.suffix()).await?,
            }
        }
        Ok(())
    }

    fn base_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        match self.queue_type {
            // Version 2 classic queues keep memory flat with long backlogs (RabbitMQ 3.10+).
            QueueType::Classic => {
                args.insert("x-queue-version".into(), AMQPValue::LongInt(2));
            }
            QueueType::Quorum => {
                args.insert("x-queue-type".into(), string("quorum"));
            }
        }
        if let Some(ms) = self.queue_expires_ms {
            // Test installations only: queues nobody used for this long are deleted by the broker.
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ms as i64));
        }
        args
    }

    async fn declare_queue(&self, channel: &Channel, name: &str, args: &mut FieldTable) -> lapin::Result<()> {
        // Durable: queued work survives a broker restart (messages are published persistent).
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel.queue_declare(name.into(), options, args.clone()).await?;
        Ok(())
    }

    async fn bind(&self, channel: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Source};

    #[test]
    fn names_carry_the_namespace() {
        let mut config = Config::load(&Source::default()).unwrap().amqp;
        config.namespace = "shop1".into();
        let t = Topology::new(&config);
        assert_eq!(t.events_exchange(), "shop1.events");
        assert_eq!(t.queue(WorkQueue::Sender), "shop1.sender");
        assert_eq!(t.dead_queue(WorkQueue::Renderer), "shop1.renderer.dead");
        assert_eq!(t.bounces_exchange(), "shop1.bounces");
        assert_eq!(t.queue(WorkQueue::IngestBounces), "shop1.ingest.bounces");
        assert_eq!(t.lead_events_exchange(), "shop1.lead-events");
    }
}
