//! Events arriving together: ingest stores a batch with one statement per table and the scheduler enrolls runs of
//! a batch's events together. The result must be what handling the events one by one, in order, gives.

use serde_json::{json, Value};

use leadflow_shared::topology::WorkQueue;
use leadflow_tests::{event, wait_until, TestApp, DEADLINE};

/// A checkout.abandoned event about checkout `checkout` (the base campaign enrolls it).
fn checkout(email: &str, checkout: &str) -> Value {
    let mut e = event("checkout.abandoned", email);
    e["data"]["checkout_id"] = json!(checkout);
    e
}

async fn post_batch(app: &TestApp, batch: &[Value]) -> Value {
    let response = app.post_events(&Value::Array(batch.to_vec())).await;
    assert_eq!(response.status(), 202, "the batch should be accepted");
    response
        .json()
        .await
        .unwrap_or_else(|e| panic!("the answer is not JSON: {e}"))
}

async fn wait_all_handled(app: &TestApp) {
    wait_until("every event is handled", DEADLINE, || async {
        app.count("SELECT count(*) FROM events WHERE handled_at IS NULL").await == 0
    })
    .await;
}

#[tokio::test]
async fn a_batch_repeating_a_lead_an_event_and_a_checkout_stores_what_the_events_one_by_one_would() {
    let app = TestApp::spawn().await;
    let mut first = checkout("ann@example.com", "c-1");
    first["data"]["phone"] = json!("+44 20 1111");
    first["data"]["first_name"] = json!("Ann");
    let repeat = first.clone();
    let mut update = event("lead.updated", "ann@example.com");
    update["data"]["first_name"] = json!("Anna");
    update["data"]["phone"] = json!("+44 20 2222");
    if let Some(data) = update["data"].as_object_mut() {
        data.remove("last_name");
        data.remove("product");
    }
    // The same checkout again, without a name: the stored one stays.
    let mut again = checkout("ann@example.com", "c-1");
    if let Some(data) = again["data"].as_object_mut() {
        data.remove("first_name");
        data.remove("last_name");
    }
    let other = checkout("bob@example.com", "c-2");

    let answer = post_batch(
        &app,
        &[first.clone(), repeat, update.clone(), again.clone(), other.clone()],
    )
    .await;
    assert_eq!(answer, json!({"accepted": 4, "duplicates": 1}));

    let client = app.db().await;
    let leads = client
        .query(
            "SELECT email, first_name, last_name, phones FROM leads ORDER BY email",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to read leads: {e}"));
    assert_eq!(leads.len(), 2, "one lead per email");
    assert_eq!(leads[0].get::<_, String>(0), "ann@example.com");
    assert_eq!(
        leads[0].get::<_, Option<String>>(1).as_deref(),
        Some("Anna"),
        "the later name wins"
    );
    assert_eq!(
        leads[0].get::<_, Option<String>>(2).as_deref(),
        Some("Lee"),
        "an absent value leaves the stored one"
    );
    assert_eq!(
        leads[0].get::<_, Vec<String>>(3),
        vec!["+44 20 1111".to_string(), "+44 20 2222".to_string()],
        "phones accumulate in order"
    );

    // Event rows are numbered in the batch's order, the repeat left out.
    let stored: Vec<String> = client
        .query("SELECT event_id FROM events ORDER BY id", &[])
        .await
        .unwrap_or_else(|e| panic!("failed to read events: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    let ids = |events: &[&Value]| -> Vec<String> {
        events
            .iter()
            .map(|e| e["id"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(stored, ids(&[&first, &update, &again, &other]));

    // The checkout touched twice: opened by the first event, started by the second.
    let inquiries = client
        .query(
            "SELECT l.email, i.subject, i.status FROM inquiries i JOIN leads l ON l.id = i.lead_id ORDER BY l.email",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to read inquiries: {e}"));
    let inquiries: Vec<(String, String, String)> = inquiries.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        inquiries,
        vec![
            ("ann@example.com".into(), "checkout:c-1".into(), "Started".into()),
            ("bob@example.com".into(), "checkout:c-2".into(), "New".into()),
        ]
    );

    // The same checkout enrolls once; each lead's sequence is three steps.
    app.wait_for_deliveries("ann@example.com", "ann is enrolled", |d| d.len() == 3)
        .await;
    app.wait_for_deliveries("bob@example.com", "bob is enrolled", |d| d.len() == 3)
        .await;
    wait_all_handled(&app).await;
    assert_eq!(app.count("SELECT count(*) FROM enrollments").await, 2);

    // Sent again, the whole batch is a repeat and changes nothing.
    let answer = post_batch(&app, &[first, update, again, other]).await;
    assert_eq!(answer, json!({"accepted": 0, "duplicates": 4}));
    assert_eq!(app.count("SELECT count(*) FROM events").await, 4);
    app.stop().await;
}

/// Leads besides the named ones in [`events_of_one_batch_act_in_their_order`].
const OTHERS: usize = 130;

#[tokio::test]
async fn events_of_one_batch_act_in_their_order() {
    let app = TestApp::spawn().await;
    // Already unsubscribed before the batch.
    app.post_event(&event("lead.unsubscribed", "carol@example.com")).await;
    wait_all_handled(&app).await;

    let mut bought = event("order.completed", "gina@example.com");
    bought["data"]["checkout_id"] = json!("g-1");
    let mut batch = vec![
        checkout("carol@example.com", "k-1"),
        // Unsubscribes, then abandons a checkout: not enrolled.
        event("lead.unsubscribed", "frank@example.com"),
        checkout("frank@example.com", "f-1"),
        // Abandons a checkout, then buys it: enrolled, then the sequence ends as converted.
        checkout("gina@example.com", "g-1"),
        bought,
        // Two checkouts of one lead in a row: two sequences.
        checkout("hal@example.com", "h-1"),
        checkout("hal@example.com", "h-2"),
    ];
    // Enough other leads for the scheduler to split the batch over its lanes (64 events or more each).
    for i in 0..OTHERS {
        batch.push(checkout(&format!("lead{i}@example.com"), &format!("l-{i}")));
    }
    let answer = post_batch(&app, &batch).await;
    assert_eq!(answer, json!({"accepted": batch.len(), "duplicates": 0}));
    wait_all_handled(&app).await;

    assert!(
        app.deliveries_of("carol@example.com").await.is_empty(),
        "a suppressed lead is not enrolled"
    );
    assert!(
        app.deliveries_of("frank@example.com").await.is_empty(),
        "the unsubscribe before the checkout keeps the lead out"
    );
    let gina = app.deliveries_of("gina@example.com").await;
    assert_eq!(gina.len(), 3, "gina is enrolled: {gina:?}");
    for (_, state, reason) in &gina {
        assert_eq!(
            (state.as_str(), reason.as_deref()),
            ("cancelled", Some("converted")),
            "{gina:?}"
        );
    }
    assert_eq!(app.count("SELECT count(*) FROM conversions").await, 1);
    app.wait_for_deliveries("hal@example.com", "both of hal's checkouts are followed up", |d| {
        d.len() == 6
    })
    .await;
    assert_eq!(
        app.count(
            "SELECT count(*) FROM (SELECT e.lead_id FROM enrollments e JOIN leads l ON l.id = e.lead_id
              WHERE l.email LIKE 'lead%' GROUP BY e.lead_id HAVING count(*) = 1) one_each"
        )
        .await,
        OTHERS as i64,
        "every other lead is enrolled once"
    );
    // Everything open goes out, and nothing to the leads kept out or converted.
    let expected = 3 * (OTHERS as i64 + 2);
    wait_until("every follow-up is sent", DEADLINE, || async {
        app.count("SELECT count(*) FROM deliveries WHERE state = 'sent'").await == expected
    })
    .await;
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE state NOT IN ('sent', 'cancelled')")
            .await,
        0,
        "every follow-up is final"
    );
    assert_eq!(app.smtp.messages().len() as i64, expected, "{}", app.smtp.summary());
    for email in ["carol@example.com", "frank@example.com", "gina@example.com"] {
        assert!(
            app.smtp.messages_to(email).is_empty(),
            "{email}: {}",
            app.smtp.summary()
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn two_amqp_consumers_in_one_ingest_store_every_published_event_exactly_once() {
    let app = TestApp::builder()
        .env("LEADFLOW_AMQP_EVENTS_CONSUMERS", "2")
        .spawn()
        .await;
    wait_until("two consumers on the events queue", DEADLINE, || async {
        app.queue_state(WorkQueue::IngestEvents).await.1 == 2
    })
    .await;
    let n = 60;
    for i in 0..n {
        let e = checkout(&format!("buyer{i}@example.com"), &format!("c-{i}"));
        app.publish_event("checkout.abandoned", e.to_string().as_bytes()).await;
    }
    wait_until("every published event is stored and handled", DEADLINE, || async {
        app.count("SELECT count(*) FROM events WHERE handled_at IS NOT NULL")
            .await
            == n
    })
    .await;
    assert_eq!(
        app.count("SELECT count(*) FROM events").await,
        n,
        "each event stored once"
    );
    assert_eq!(app.count("SELECT count(*) FROM leads").await, n, "one lead per address");
    assert_eq!(
        app.count("SELECT count(DISTINCT lead_id) FROM enrollments").await,
        n,
        "every lead enrolled once"
    );
    assert_eq!(app.count("SELECT count(*) FROM enrollments").await, n);
    assert!(app.dead_letters(WorkQueue::IngestEvents).await.is_empty());
}
