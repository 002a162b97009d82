//! The pipeline end to end: events in over HTTP and AMQP, follow-up emails out over SMTP, against real PostgreSQL
//! and RabbitMQ. Every test has its own database, AMQP namespace and SMTP server; every wait has a deadline.

use std::collections::BTreeMap;

use chrono::TimeDelta;
use serde_json::{json, Value};

use leadflow::Component;
use leadflow_shared::topology::WorkQueue;
use leadflow_tests::{event, wait_until, Captured, DeliveryRow, Rule, TestApp, DEADLINE};

/// The leadflow command, built for the tests to run services as separate processes.
const LEADFLOW: &str = env!("CARGO_BIN_EXE_leadflow-under-test");

fn all_in_state(rows: &[DeliveryRow], n: usize, state: &str) -> bool {
    rows.len() == n && rows.iter().all(|r| r.state == state)
}

fn ms(n: i64) -> TimeDelta {
    TimeDelta::milliseconds(n)
}

/// The step each message was sent for, through its `X-Leadflow-Delivery` header.
fn step_of(message: &Captured, rows: &[DeliveryRow]) -> i16 {
    let id = message
        .delivery_id()
        .unwrap_or_else(|| panic!("a message without an X-Leadflow-Delivery header: {message}"));
    rows.iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("a message for delivery {id}, which is not one of {rows:#?}"))
        .step
}

fn text_of(message: &Captured) -> String {
    message
        .text_body()
        .unwrap_or_else(|| panic!("no text/plain part in {message}:\n{}", message.data))
}

fn html_of(message: &Captured) -> String {
    message
        .html_body()
        .unwrap_or_else(|| panic!("no text/html part in {message}:\n{}", message.data))
}

/// Messages sorted by the step they were sent for.
fn by_step(messages: &[Captured], rows: &[DeliveryRow]) -> BTreeMap<i16, Captured> {
    let mut out = BTreeMap::new();
    for m in messages {
        let step = step_of(m, rows);
        assert!(out.insert(step, m.clone()).is_none(), "step {step} was sent twice");
    }
    out
}

async fn problem(response: reqwest::Response) -> (reqwest::StatusCode, Option<String>, Value) {
    let status = response.status();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, content_type, body)
}

async fn assert_refused(app: &TestApp, body: &Value, field: &str) {
    let (status, content_type, problem) = problem(app.post_events(body).await).await;
    assert_eq!(status, 400, "expected 400 naming {field}, got {status}: {problem}");
    assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{problem}");
    let named = problem["field"].as_str().unwrap_or_default();
    assert!(
        named.ends_with(field),
        "expected the problem to name {field}, got {problem}"
    );
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(!detail.trim().is_empty(), "the problem has no detail: {problem}");
}

#[tokio::test]
async fn an_abandoned_checkout_receives_three_personal_emails_at_the_configured_delays() {
    let app = TestApp::spawn().await;
    app.post_event(&event("checkout.abandoned", "ann@example.com")).await;

    let messages = app.smtp.wait_for_to("ann@example.com", 3, DEADLINE).await;
    let rows = app
        .wait_for_deliveries("ann@example.com", "all three steps are sent", |d| {
            all_in_state(d, 3, "sent")
        })
        .await;
    assert_eq!(
        app.smtp.messages_to("ann@example.com").len(),
        3,
        "{}",
        app.smtp.summary()
    );

    // Timing from the rows, not from the test's clock: step one a delay after enrollment, each next step a delay
    // after the previous one, nothing sent before it was due (two steps due within one scheduler tick may arrive
    // in either order, so arrival order is not checked).
    assert!(
        rows[0].due_at - rows[0].enrolled_at >= ms(900),
        "step one is due too early: {rows:#?}"
    );
    for pair in rows.windows(2) {
        let gap = pair[1].due_at - pair[0].due_at;
        assert!(
            gap >= ms(900) && gap <= ms(1500),
            "steps are not one second apart: {rows:#?}"
        );
    }
    for row in &rows {
        let sent = row
            .sent_at
            .unwrap_or_else(|| panic!("a sent delivery without sent_at: {row:?}"));
        assert!(
            sent >= row.due_at,
            "step {} was sent before it was due: {row:?}",
            row.step
        );
        assert!(sent - row.due_at < ms(5000), "step {} was sent late: {row:?}", row.step);
    }

    let steps = by_step(&messages, &rows);
    for (step, m) in &steps {
        assert_eq!(
            m.media_type().as_deref(),
            Some("multipart/alternative"),
            "step {step}: {}",
            m.data
        );
        assert_eq!(m.rcpt_to, vec!["ann@example.com".to_string()]);
        assert!(
            m.header("To").unwrap_or_default().contains("ann@example.com"),
            "step {step}"
        );
        assert!(m.header("From").is_some(), "step {step} has no From");
        for part in m.parts() {
            assert_eq!(part.transfer_encoding, "quoted-printable", "step {step}: {part:?}");
        }
        let (text, html) = (text_of(m), html_of(m));
        assert!(text.contains("Hi Ann,"), "step {step} text: {text}");
        assert!(text.contains("Trail Runner 2"), "step {step} text: {text}");
        assert!(html.contains("<p>Hi Ann,</p>"), "step {step} html: {html}");
        assert!(html.contains("Trail Runner 2"), "step {step} html: {html}");
    }
    let subject = steps[&1].subject().unwrap_or_default();
    assert_eq!(subject, "Ann, you left Trail Runner 2 in your cart");
    assert!(!text_of(&steps[&1]).contains("% off"));
    assert!(
        text_of(&steps[&2]).contains("here is 10% off Trail Runner 2"),
        "{}",
        text_of(&steps[&2])
    );
    assert!(html_of(&steps[&2]).contains("10% off"));
    assert_eq!(steps[&2].subject().unwrap_or_default(), "10% off Trail Runner 2, Ann");
    assert!(
        text_of(&steps[&3]).contains("here is 15% off Trail Runner 2"),
        "{}",
        text_of(&steps[&3])
    );
    assert!(html_of(&steps[&3]).contains("15% off"));
    app.stop().await;
}

#[tokio::test]
async fn a_german_lead_receives_the_german_templates() {
    let app = TestApp::spawn().await;
    let mut e = event("checkout.abandoned", "jonas@example.de");
    e["data"]["first_name"] = json!("Jonas");
    e["data"]["language"] = json!("de");
    e["data"]["country"] = json!("DE");
    app.post_event(&e).await;

    let messages = app.smtp.wait_for_to("jonas@example.de", 3, DEADLINE).await;
    let rows = app
        .wait_for_deliveries("jonas@example.de", "all three steps are sent", |d| {
            all_in_state(d, 3, "sent")
        })
        .await;
    let steps = by_step(&messages, &rows);
    assert_eq!(
        steps[&1].subject().unwrap_or_default(),
        "Jonas, Ihr Warenkorb wartet: Trail Runner 2"
    );
    let text = text_of(&steps[&1]);
    assert!(
        text.contains("Hallo Jonas,") && text.contains("Schöne Grüße!"),
        "{text}"
    );
    assert!(html_of(&steps[&1]).contains("<p>Hallo Jonas,</p>"));
    assert_eq!(
        steps[&2].subject().unwrap_or_default(),
        "10 % Rabatt für Sie, Jonas: Trail Runner 2"
    );
    assert!(text_of(&steps[&2]).contains("erhalten Sie jetzt 10 % Rabatt"));
    assert!(text_of(&steps[&3]).contains("erhalten Sie jetzt 15 % Rabatt"));
    for m in steps.values() {
        assert!(
            !text_of(m).contains("Hi "),
            "an English text reached a German lead: {}",
            text_of(m)
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn an_order_after_the_first_email_stops_the_sequence_and_is_attributed_to_step_one() {
    // Step two is due 30 s after step one: the order surely arrives in between.
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    app.post_event(&event("checkout.abandoned", "carl@example.com")).await;
    app.smtp.wait_for_to("carl@example.com", 1, DEADLINE).await;
    let rows = app
        .wait_for_deliveries("carl@example.com", "step one is sent", |d| {
            d.len() == 3 && d[0].state == "sent"
        })
        .await;
    assert_eq!(rows[1].state, "pending", "step two should still wait: {rows:#?}");

    let mut order = event("order.completed", "carl@example.com");
    order["data"]["order_id"] = json!("o-1001");
    order["data"]["amount"] = json!(123.45);
    order["data"]["currency"] = json!("EUR");
    app.post_event(&order).await;

    let rows = app
        .wait_for_deliveries("carl@example.com", "steps two and three are cancelled", |d| {
            d.len() == 3 && d[1].state == "cancelled" && d[2].state == "cancelled"
        })
        .await;
    assert_eq!(rows[0].state, "sent");
    for row in &rows[1..] {
        assert_eq!(row.reason.as_deref(), Some("converted"), "{row:?}");
        assert!(row.sent_at.is_none(), "{row:?}");
    }

    wait_until("the conversion is recorded", DEADLINE, || async {
        app.count("SELECT count(*) FROM conversions").await > 0
    })
    .await;
    let conversions = app
        .db()
        .await
        .query(
            "SELECT delivery_id, amount::float8, currency, order_id, step FROM conversions",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to read conversions: {e}"));
    assert_eq!(conversions.len(), 1, "one order, one conversion");
    let c = &conversions[0];
    assert_eq!(
        c.get::<_, Option<i64>>(0),
        Some(rows[0].id),
        "attributed to the wrong delivery"
    );
    assert_eq!(c.get::<_, Option<f64>>(1), Some(123.45));
    assert_eq!(c.get::<_, Option<String>>(2).as_deref(), Some("EUR"));
    assert_eq!(c.get::<_, Option<String>>(3).as_deref(), Some("o-1001"));
    assert_eq!(c.get::<_, Option<i16>>(4), Some(1));
    assert_eq!(
        app.count("SELECT count(*) FROM enrollments WHERE status = 'active'")
            .await,
        0,
        "the enrollment should have ended"
    );
    assert_eq!(
        app.smtp.messages_to("carl@example.com").len(),
        1,
        "{}",
        app.smtp.summary()
    );
    app.stop().await;
}

#[tokio::test]
async fn the_same_event_sent_twice_over_http_and_amqp_makes_one_lead_one_enrollment_and_three_emails() {
    let app = TestApp::spawn().await;
    let e = event("checkout.abandoned", "dana@example.com");
    app.post_event(&e).await;
    app.post_event(&e).await;
    let bytes = e.to_string().into_bytes();
    app.publish_event("checkout.abandoned", &bytes).await;
    app.publish_event("checkout.abandoned", &bytes).await;
    // Published after the copies: once it is stored, the copies before it have been handled.
    app.publish_event(
        "lead.captured",
        event("lead.captured", "marker@example.com").to_string().as_bytes(),
    )
    .await;
    wait_until("the marker event behind the copies is stored", DEADLINE, || async {
        app.count("SELECT count(*) FROM leads WHERE email = 'marker@example.com'")
            .await
            == 1
    })
    .await;

    app.smtp.wait_for_to("dana@example.com", 3, DEADLINE).await;
    app.wait_for_deliveries("dana@example.com", "all three steps are sent", |d| {
        all_in_state(d, 3, "sent")
    })
    .await;
    let id = e["id"].as_str().unwrap_or_default().to_string();
    assert_eq!(
        app.count(&format!("SELECT count(*) FROM events WHERE event_id = '{id}'"))
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM leads WHERE email = 'dana@example.com'")
            .await,
        1
    );
    assert_eq!(app.count("SELECT count(*) FROM enrollments").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM deliveries").await, 3);
    assert_eq!(
        app.smtp.messages_to("dana@example.com").len(),
        3,
        "{}",
        app.smtp.summary()
    );
    app.stop().await;
}

#[tokio::test]
async fn a_batch_of_events_is_accepted() {
    let app = TestApp::spawn().await;
    let batch = json!([
        event("lead.captured", "eve@example.com"),
        event("engagement.page_viewed", "eve@example.com"),
        event("checkout.abandoned", "finn@example.com"),
    ]);
    let response = app.post_events(&batch).await;
    assert_eq!(response.status(), 202, "{:?}", response.text().await);

    wait_until("the three events are stored", DEADLINE, || async {
        app.count("SELECT count(*) FROM events").await == 3
    })
    .await;
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 2);
    app.wait_for_deliveries("finn@example.com", "finn is enrolled", |d| d.len() == 3)
        .await;
    assert!(
        app.deliveries_of("eve@example.com").await.is_empty(),
        "lead.captured enrolls in no cart campaign"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_event_is_refused_naming_the_field_and_nothing_is_stored() {
    let app = TestApp::spawn().await;

    let mut bad_email = event("checkout.abandoned", "gus@example.com");
    bad_email["data"]["email"] = json!("not-an-email");
    assert_refused(&app, &bad_email, "/data/email").await;

    let mut unknown_type = event("checkout.abandoned", "gus@example.com");
    unknown_type["type"] = json!("checkout.abandonned");
    assert_refused(&app, &unknown_type, "/type").await;

    let mut no_id = event("checkout.abandoned", "gus@example.com");
    if let Some(obj) = no_id.as_object_mut() {
        obj.remove("id");
    }
    assert_refused(&app, &no_id, "/id").await;

    // One bad event in a batch refuses the whole batch.
    let batch = json!([event("checkout.abandoned", "hana@example.com"), bad_email]);
    assert_refused(&app, &batch, "/data/email").await;

    let response = app
        .post_raw("application/cloudevents+json", "{\"specversion\": \"1.0\", ")
        .await;
    assert_eq!(response.status(), 400, "truncated JSON");

    let response = app
        .post_raw("text/plain", event("checkout.abandoned", "gus@example.com").to_string())
        .await;
    assert_eq!(response.status(), 415, "a wrong content type");

    assert_eq!(app.count("SELECT count(*) FROM events").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_amqp_message_is_dead_lettered_with_the_reason_and_later_events_still_flow() {
    let app = TestApp::spawn().await;
    app.publish_event("checkout.abandoned", b"{this is not json").await;
    let mut bad_email = event("checkout.abandoned", "x@example.com");
    bad_email["data"]["email"] = json!("not-an-email");
    let bad_email = bad_email.to_string();
    app.publish_event("checkout.abandoned", bad_email.as_bytes()).await;
    app.publish_event(
        "checkout.abandoned",
        event("checkout.abandoned", "ida@example.com").to_string().as_bytes(),
    )
    .await;

    let dead = app.wait_for_dead_letters(WorkQueue::IngestEvents, 2).await;
    assert_eq!(dead.len(), 2, "{dead:?}");
    let not_json = dead
        .iter()
        .find(|(body, _)| body == "{this is not json")
        .unwrap_or_else(|| panic!("the non-JSON message is not dead-lettered: {dead:?}"));
    assert!(
        not_json.1.as_deref().is_some_and(|r| !r.trim().is_empty()),
        "no reason header: {not_json:?}"
    );
    let invalid = dead
        .iter()
        .find(|(body, _)| *body == bad_email)
        .unwrap_or_else(|| panic!("the invalid event is not dead-lettered: {dead:?}"));
    assert!(
        invalid.1.as_deref().is_some_and(|r| r.contains("email")),
        "the reason should name the email field: {invalid:?}"
    );

    app.smtp.wait_for_to("ida@example.com", 1, DEADLINE).await;
    assert_eq!(app.count("SELECT count(*) FROM events").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_sender_killed_between_steps_sends_the_remaining_steps_exactly_once_after_a_restart() {
    // Step two comes three seconds after step one: room to kill the sender in between.
    let app = TestApp::builder()
        .variant("paced")
        .components(&[Component::Ingest, Component::Scheduler, Component::Renderer])
        .spawn()
        .await;
    let sender = app.spawn_process(LEADFLOW, &["run", "sender"]);
    app.wait_for_consumers(WorkQueue::Sender, 1).await;

    app.post_event(&event("checkout.abandoned", "holly@example.com")).await;
    let rows = app
        .wait_for_deliveries("holly@example.com", "step one is sent", |d| {
            d.len() == 3 && d[0].state == "sent"
        })
        .await;
    assert!(
        rows[1..].iter().all(|r| r.state == "pending"),
        "the later steps should still wait: {rows:#?}"
    );
    sender.kill().await;
    wait_until("the killed sender's consumer is gone", DEADLINE, || async {
        app.queue_state(WorkQueue::Sender).await.1 == 0
    })
    .await;

    // Step two comes due with no sender running: it is rendered and waits in the sender's queue.
    app.wait_for_deliveries("holly@example.com", "step two is rendered", |d| {
        d.len() == 3 && d[1].state == "rendered"
    })
    .await;
    let sender = app.spawn_process(LEADFLOW, &["run", "sender"]);
    let rows = app
        .wait_for_deliveries("holly@example.com", "all three steps are sent", |d| {
            all_in_state(d, 3, "sent")
        })
        .await;
    sender.kill().await;

    let messages = app.smtp.messages_to("holly@example.com");
    let mut per_delivery: BTreeMap<i64, usize> = BTreeMap::new();
    for m in &messages {
        let id = m
            .delivery_id()
            .unwrap_or_else(|| panic!("a message without X-Leadflow-Delivery: {m}"));
        *per_delivery.entry(id).or_default() += 1;
    }
    let expected: BTreeMap<i64, usize> = rows.iter().map(|r| (r.id, 1)).collect();
    assert_eq!(
        per_delivery,
        expected,
        "each step exactly once:\n{}",
        app.smtp.summary()
    );
    app.stop().await;
}

#[tokio::test]
async fn a_transient_smtp_failure_is_retried_and_then_sent() {
    let app = TestApp::spawn().await;
    app.smtp.set_rule(
        "ivan@example.com",
        Rule::fail_first(1, 451, "4.7.1 greylisted, try again later"),
    );
    app.post_event(&event("checkout.abandoned", "ivan@example.com")).await;

    let rows = app
        .wait_for_deliveries("ivan@example.com", "step one is sent after a retry", |d| {
            !d.is_empty() && d[0].state == "sent"
        })
        .await;
    assert!(
        rows[0].attempts >= 2,
        "step one should have needed two attempts: {:?}",
        rows[0]
    );
    assert!(app.smtp.attempts("ivan@example.com") >= 2);
    let step_one: Vec<Captured> = app
        .smtp
        .messages_to("ivan@example.com")
        .into_iter()
        .filter(|m| m.delivery_id() == Some(rows[0].id))
        .collect();
    assert_eq!(step_one.len(), 1, "step one once:\n{}", app.smtp.summary());
    app.stop().await;
}

#[tokio::test]
async fn a_permanent_smtp_failure_ends_as_failed_with_the_reason_and_other_leads_are_unaffected() {
    let app = TestApp::spawn().await;
    app.smtp.set_rule(
        "jack@example.com",
        Rule::always(
            550,
            "5.1.1 <jack@example.com>: recipient address rejected: user unknown",
        ),
    );
    app.post_event(&event("checkout.abandoned", "jack@example.com")).await;
    app.post_event(&event("checkout.abandoned", "kate@example.com")).await;

    let rows = app
        .wait_for_deliveries("jack@example.com", "step one has failed", |d| {
            !d.is_empty() && d[0].state == "failed"
        })
        .await;
    let reason = rows[0].reason.clone().unwrap_or_default();
    assert!(
        reason.contains("550") || reason.contains("user unknown"),
        "the reason should carry the server's answer: {:?}",
        rows[0]
    );
    assert_eq!(rows[0].attempts, 1, "a permanent failure is not retried: {:?}", rows[0]);
    assert!(rows[0].sent_at.is_none());

    app.smtp.wait_for_to("kate@example.com", 3, DEADLINE).await;
    app.wait_for_deliveries("kate@example.com", "kate's three steps are sent", |d| {
        all_in_state(d, 3, "sent")
    })
    .await;
    app.wait_for_deliveries("jack@example.com", "every step of jack's has ended", |d| {
        d.len() == 3 && d.iter().all(|r| r.state == "failed" || r.state == "cancelled")
    })
    .await;
    assert!(app.smtp.messages_to("jack@example.com").is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_body_with_a_lone_dot_line_arrives_as_one_intact_message() {
    // The English reminder's text and HTML bodies hold a line with a single "." (and one with "..").
    let app = TestApp::builder().variant("lone-dot").spawn().await;
    app.post_event(&event("checkout.abandoned", "lena@example.com")).await;
    let rows = app
        .wait_for_deliveries("lena@example.com", "step one is sent", |d| {
            !d.is_empty() && d[0].state == "sent"
        })
        .await;

    let step_one: Vec<Captured> = app
        .smtp
        .messages_to("lena@example.com")
        .into_iter()
        .filter(|m| m.delivery_id() == Some(rows[0].id))
        .collect();
    assert_eq!(step_one.len(), 1, "{}", app.smtp.summary());
    let m = &step_one[0];
    let text = text_of(m);
    assert!(
        text.contains(
            "Hi Ann,\n.\nThe line above holds a single dot; this one follows it.\n..\nAnd the one above holds two."
        ),
        "{text:?}"
    );
    assert!(
        html_of(m).contains("<p>Hi Ann,</p>\n.\n<p>The line above holds a single dot; this one follows it.</p>"),
        "{}",
        html_of(m)
    );
    assert_eq!(m.parts().len(), 2, "both parts arrived: {}", m.data);
    assert!(
        app.smtp.unexpected_commands().is_empty(),
        "part of a message arrived as SMTP commands: {:?}",
        app.smtp.unexpected_commands()
    );
    app.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let app = TestApp::spawn().await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);

    app.post_event(&event("checkout.abandoned", "mia@example.com")).await;
    app.smtp.wait_for_to("mia@example.com", 1, DEADLINE).await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap_or_default();
    // Counted before this first scrape: the recorder must be installed when the services start, not lazily.
    for counter in ["leadflow_ingest_events_total", "leadflow_sender_emails_total"] {
        assert!(
            text.lines().any(|l| l.starts_with(counter)),
            "{counter} is missing from /metrics:\n{text}"
        );
    }
    app.stop().await;
}
