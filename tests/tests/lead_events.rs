//! Outbound lead events on the `<ns>.lead-events` topic exchange: a subscriber's queue bound to it receives one
//! `lead.hot` CloudEvent when a lead becomes hot (through events scored by the scheduler), none when it stays hot,
//! and an event written while nothing publishes waits in the outbox until the publisher runs.

use std::time::Duration;

use chrono::Utc;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Value};

use leadflow::api::keys::Scope;
use leadflow::Component;
use leadflow_scheduler::lead_events;
use leadflow_shared::amqp;
use leadflow_shared::topology::Topology;
use leadflow_tests::{event, wait_until, ApiClient, TestApp, DEADLINE};

/// A system listening to lead events: its own exclusive queue bound to the exchange with `lead.#`.
struct Subscriber {
    _connection: Connection,
    channel: Channel,
    queue: String,
}

impl Subscriber {
    async fn bind(app: &TestApp) -> Self {
        let connection = amqp::connect(&app.config.amqp, "lead-events-subscriber")
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the broker: {e:#}"));
        let channel = connection
            .create_channel()
            .await
            .unwrap_or_else(|e| panic!("cannot open a channel: {e}"));
        let queue = format!("{}.test-crm", app.namespace);
        // Exclusive: the queue belongs to this connection and goes with it when the test ends.
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        };
        channel
            .queue_declare(queue.as_str().into(), exclusive, FieldTable::default())
            .await
            .unwrap_or_else(|e| panic!("cannot declare {queue}: {e}"));
        let exchange = Topology::new(&app.config.amqp).lead_events_exchange();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                "lead.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("cannot bind {queue} to {exchange} (declared at start-up?): {e}"));
        Self {
            _connection: connection,
            channel,
            queue,
        }
    }

    /// The next message in the queue, if any: (properties, body as JSON).
    async fn take(&self) -> Option<(BasicProperties, Value)> {
        let got = self
            .channel
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap_or_else(|e| panic!("basic.get from {} failed: {e}", self.queue))?;
        let delivery = got.delivery;
        let body = serde_json::from_slice(&delivery.data)
            .unwrap_or_else(|e| panic!("a lead event is not JSON: {e}: {:?}", delivery.data));
        Some((delivery.properties, body))
    }

    /// Waits for the next message.
    async fn next(&self, what: &str) -> (BasicProperties, Value) {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            if let Some(message) = self.take().await {
                return message;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no lead event for {what} within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn lead_id(app: &TestApp, email: &str) -> i64 {
    app.db()
        .await
        .query_one("SELECT id FROM leads WHERE email = $1", &[&email])
        .await
        .unwrap_or_else(|e| panic!("no lead {email}: {e}"))
        .get(0)
}

async fn wait_for_score(app: &TestApp, email: &str, score: f64) {
    wait_until(&format!("{email} scores {score}"), DEADLINE, || async {
        app.db()
            .await
            .query_opt("SELECT score FROM leads WHERE email = $1", &[&email])
            .await
            .ok()
            .flatten()
            .is_some_and(|r| (r.get::<_, f64>(0) - score).abs() < 1e-9)
    })
    .await;
}

/// Hot at 30, warm at 15; every `engagement.*` event gives 10 points.
async fn ten_points_per_engagement_hot_at_30(app: &TestApp) {
    let api = ApiClient::with_scope(app, Scope::Admin).await;
    api.put("/v1/scoring/settings", &json!({"hot": 30, "warm": 15}))
        .await
        .expect(200);
    api.post(
        "/v1/scoring/rules",
        &json!({"name": "engaged", "event_type": "engagement.*", "points": 10}),
    )
    .await
    .expect(201);
}

/// Checks a `lead.hot` message: its properties and the CloudEvent it carries.
fn assert_lead_hot(properties: &BasicProperties, body: &Value, lead_id: i64, email: &str, score: f64) {
    assert_eq!(body["specversion"], "1.0", "{body:#}");
    assert_eq!(body["type"], "lead.hot", "{body:#}");
    assert_eq!(body["source"], "leadflow", "{body:#}");
    assert_eq!(body["subject"], lead_id.to_string(), "{body:#}");
    assert_eq!(body["data"]["lead_id"], lead_id, "{body:#}");
    assert_eq!(body["data"]["email"], email, "{body:#}");
    assert_eq!(body["data"]["score"], json!(score), "{body:#}");
    assert_eq!(body["data"]["temperature"], "hot", "{body:#}");
    let id = body["id"].as_str().unwrap_or_default();
    assert!(!id.is_empty(), "{body:#}");
    assert_eq!(
        properties.message_id().as_ref().map(|m| m.as_str()),
        Some(id),
        "the message id is the event's id, for deduplication"
    );
    assert_eq!(
        properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/cloudevents+json")
    );
    assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
}

#[tokio::test]
async fn becoming_hot_publishes_one_lead_hot_event_and_staying_hot_publishes_none() {
    let app = TestApp::spawn().await;
    let subscriber = Subscriber::bind(&app).await;
    ten_points_per_engagement_hot_at_30(&app).await;

    let ann = "ann.hot@example.com";
    for n in 1..=3 {
        app.post_event(&event("engagement.page_viewed", ann)).await;
        wait_for_score(&app, ann, 10.0 * f64::from(n)).await;
    }
    let ann_id = lead_id(&app, ann).await;
    let (properties, body) = subscriber.next("Ann becoming hot").await;
    assert_lead_hot(&properties, &body, ann_id, ann, 30.0);
    assert_eq!(body["data"]["previous_temperature"], "warm");
    let timeline_event: String = app
        .db()
        .await
        .query_one(
            "SELECT event_id FROM events WHERE lead_id = $1 AND type = 'lead.hot'",
            &[&ann_id],
        )
        .await
        .unwrap_or_else(|e| panic!("no lead.hot event on the timeline: {e}"))
        .get(0);
    assert_eq!(body["id"], timeline_event, "the published event is the timeline's");

    // Staying hot is not becoming hot again.
    app.post_event(&event("engagement.email_clicked", ann)).await;
    wait_for_score(&app, ann, 40.0).await;

    // Another lead becoming hot afterwards: its event is published after anything Ann's last event queued (the
    // outbox is published in order), so once it arrives, a second Ann event would have arrived before it.
    let bob = "bob.hot@example.com";
    for n in 1..=3 {
        app.post_event(&event("engagement.page_viewed", bob)).await;
        wait_for_score(&app, bob, 10.0 * f64::from(n)).await;
    }
    let bob_id = lead_id(&app, bob).await;
    let (properties, body) = subscriber.next("Bob becoming hot").await;
    assert_lead_hot(&properties, &body, bob_id, bob, 30.0);
    assert!(
        subscriber.take().await.is_none(),
        "one lead.hot per lead that became hot"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM lead_event_outbox").await,
        0,
        "published events leave the outbox"
    );
}

#[tokio::test]
async fn a_lead_event_waits_in_the_outbox_until_a_publisher_runs_and_goes_out_once() {
    // The API alone: a lead made hot by an edit is queued in the edit's transaction, and no scheduler publishes.
    let app = TestApp::spawn_with(&[Component::Api], &[]).await;
    let subscriber = Subscriber::bind(&app).await;
    let admin = ApiClient::with_scope(&app, Scope::Admin).await;
    admin
        .put("/v1/scoring/settings", &json!({"hot": 30, "warm": 15}))
        .await
        .expect(200);
    admin
        .post(
            "/v1/scoring/rules",
            &json!({"name": "mid-size", "condition": {"field": "company_size", "op": "eq", "value": "51-200"},
                    "points": 35}),
        )
        .await
        .expect(201);
    let created = ApiClient::with_scope(&app, Scope::Write)
        .await
        .post(
            "/v1/leads",
            &json!({"email": "cora@example.com", "company_size": "51-200"}),
        )
        .await
        .expect(201);
    assert_eq!(created["lead"]["temperature"], "hot", "{created:#}");
    let cora_id = created["lead"]["id"].as_i64().expect("an id");

    assert_eq!(app.count("SELECT count(*) FROM lead_event_outbox").await, 1);
    assert!(
        subscriber.take().await.is_none(),
        "nothing is published without a publisher"
    );

    // The scheduler's publisher, stepped by the test.
    let pool = leadflow_shared::db::pool(&app.config.database).unwrap_or_else(|e| panic!("no pool: {e:#}"));
    let connection = amqp::connect(&app.config.amqp, "lead-events-publisher")
        .await
        .unwrap_or_else(|e| panic!("cannot connect: {e:#}"));
    let channel = lead_events::open_channel(&connection)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let exchange = Topology::new(&app.config.amqp).lead_events_exchange();
    let started = Utc::now();
    let published = lead_events::publish_once(&pool, &channel, &exchange)
        .await
        .unwrap_or_else(|e| panic!("publishing failed: {e:#}"));
    assert_eq!(published, 1);
    let (properties, body) = subscriber.next("Cora becoming hot").await;
    assert_lead_hot(&properties, &body, cora_id, "cora@example.com", 35.0);
    assert_eq!(body["data"]["previous_temperature"], "cold");
    let time = body["time"].as_str().unwrap_or_default();
    assert!(
        chrono::DateTime::parse_from_rfc3339(time)
            .is_ok_and(|t| t <= Utc::now() && t >= started - chrono::TimeDelta::minutes(1)),
        "{time}"
    );

    assert_eq!(
        lead_events::publish_once(&pool, &channel, &exchange)
            .await
            .unwrap_or_else(|e| panic!("{e:#}")),
        0,
        "a published event is not published again"
    );
    assert!(subscriber.take().await.is_none());
    assert_eq!(app.count("SELECT count(*) FROM lead_event_outbox").await, 0);
}
