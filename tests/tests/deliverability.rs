//! Deliverability end to end, against the real SMTP test server: each SMTP reply class, the exactly-once
//! guarantee (a lost reply is `uncertain`, never resent; a sender killed with SIGKILL mid-batch sends nothing
//! twice), kept-open connections that break, and send-rate limits that defer instead of dropping.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use leadflow::Component;
use leadflow_shared::topology::WorkQueue;
use leadflow_tests::smtp::Transaction;
use leadflow_tests::{event, wait_until, DeliveryRow, Rule, TestApp, DEADLINE};

/// The leadflow command, built for the tests to run services as separate processes.
const LEADFLOW: &str = env!("CARGO_BIN_EXE_leadflow-under-test");

fn terminal(state: &str) -> bool {
    matches!(state, "sent" | "failed" | "cancelled")
}

async fn metrics_text(app: &TestApp) -> String {
    app.get("/metrics").await.text().await.unwrap_or_default()
}

/// The value of a counter without labels on /metrics (0 when absent).
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn suppressions_of(app: &TestApp, email: &str) -> Vec<(String, String)> {
    app.db()
        .await
        .query(
            "SELECT reason, source FROM suppressions WHERE email = $1 ORDER BY id",
            &[&email],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to read suppressions: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Posts the event and waits until the scheduler has handled it.
async fn post_and_wait_handled(app: &TestApp, body: &Value) {
    app.post_event(body).await;
    let event_id = body["id"].as_str().unwrap_or_default().to_string();
    wait_until("the event is handled", DEADLINE, || async {
        app.db()
            .await
            .query_opt(
                "SELECT 1 FROM events WHERE event_id = $1 AND handled_at IS NOT NULL",
                &[&event_id],
            )
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
}

#[tokio::test]
async fn an_accepted_email_is_recorded_sent_with_the_message_id_it_carried() {
    let app = TestApp::spawn().await;
    app.post_event(&event("checkout.abandoned", "amy@example.com")).await;
    let rows = app
        .wait_for_deliveries("amy@example.com", "step one is sent", |d| {
            !d.is_empty() && d[0].state == "sent"
        })
        .await;
    let messages: Vec<_> = app
        .smtp
        .messages_to("amy@example.com")
        .into_iter()
        .filter(|m| m.delivery_id() == Some(rows[0].id))
        .collect();
    assert_eq!(messages.len(), 1, "{}", app.smtp.summary());
    let header = messages[0]
        .header("Message-ID")
        .unwrap_or_else(|| panic!("no Message-ID: {}", messages[0].data));
    let recorded: Option<String> = app
        .db()
        .await
        .query_one("SELECT message_id FROM deliveries WHERE id = $1", &[&rows[0].id])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .get(0);
    assert_eq!(
        recorded.as_deref(),
        Some(header.trim()),
        "the recorded id is the one sent"
    );
    assert!(
        header.contains('@') && header.contains(&rows[0].id.to_string()),
        "{header}"
    );
    assert_eq!(rows[0].attempts, 1);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM deliveries WHERE id = {} AND smtp_started_at IS NOT NULL",
            rows[0].id
        ))
        .await,
        1,
        "the SMTP start was recorded before the data went out"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_hard_bounce_suppresses_the_address_cancels_its_later_steps_and_it_is_not_enrolled_again() {
    let app = TestApp::spawn().await;
    let gone = "gone@example.com";
    app.smtp.set_rule(
        gone,
        Rule::always(
            550,
            "5.1.1 <gone@example.com>: Recipient address rejected: User unknown",
        ),
    );
    app.post_event(&event("checkout.abandoned", gone)).await;
    let rows = app
        .wait_for_deliveries(gone, "step one bounced and the rest were cancelled", |d| {
            d.len() == 3 && d[0].state == "failed" && d[1..].iter().all(|r| r.state == "cancelled")
        })
        .await;
    let reason = rows[0].reason.clone().unwrap_or_default();
    assert!(reason.starts_with("bounced: 550 5.1.1"), "{reason}");
    assert_eq!(rows[0].attempts, 1, "a hard bounce is not retried");
    for r in &rows[1..] {
        assert_eq!(r.reason.as_deref(), Some("bounced"), "{r:?}");
    }
    assert_eq!(
        suppressions_of(&app, gone).await,
        vec![("bounced".to_string(), "smtp".to_string())]
    );
    assert_eq!(app.smtp.attempts(gone), 1);

    // A new cart for the same address: handled, but no new sequence.
    post_and_wait_handled(&app, &event("checkout.abandoned", gone)).await;
    assert_eq!(
        app.deliveries(gone).await.len(),
        3,
        "no new follow-ups for a bounced address"
    );
    assert_eq!(app.smtp.attempts(gone), 1);
    app.stop().await;
}

#[tokio::test]
async fn transient_replies_are_retried_then_sent_and_a_run_of_them_suppresses_the_address() {
    let app = TestApp::spawn().await;
    let db = app.db().await;
    leadflow_shared::settings::set(&db, "soft_bounce_limit", "2")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    drop(db);
    let busy = "busy@example.com";
    let full = "full@example.com";
    app.smtp
        .set_rule(busy, Rule::fail_first(1, 451, "4.2.0 mailbox busy, try again"));
    app.smtp
        .set_rule(full, Rule::always(451, "4.2.0 mailbox busy, try again"));
    app.post_event(&event("checkout.abandoned", busy)).await;
    app.post_event(&event("checkout.abandoned", full)).await;

    let rows = app
        .wait_for_deliveries(busy, "step one is sent after a retry", |d| {
            !d.is_empty() && d[0].state == "sent"
        })
        .await;
    assert_eq!(rows[0].attempts, 2, "{:?}", rows[0]);
    assert_eq!(
        app.smtp
            .messages_to(busy)
            .iter()
            .filter(|m| m.delivery_id() == Some(rows[0].id))
            .count(),
        1
    );
    // The success cleared the address's run.
    wait_until("the soft-bounce run of busy@ is cleared", DEADLINE, || async {
        app.count(&format!(
            "SELECT count(*) FROM soft_bounces WHERE email_hash = encode(sha256('{busy}'::bytea), 'hex')"
        ))
        .await
            == 0
    })
    .await;

    let rows = app
        .wait_for_deliveries(full, "two soft bounces suppressed full@", |d| {
            d.len() == 3
                && d.iter().all(|r| r.state == "failed" || r.state == "cancelled")
                && d.iter().any(|r| r.state == "failed")
        })
        .await;
    // Step one's retry and step two both meet the busy mailbox: the second soft bounce in a row, whichever
    // delivery it was, suppresses the address and ends every other open step as `bounced`.
    for r in &rows {
        let reason = r.reason.clone().unwrap_or_default();
        if r.state == "failed" {
            assert!(
                reason.starts_with("bounced: 2 transient failures in a row") && reason.contains("451 4.2.0"),
                "{r:?}"
            );
        } else {
            assert_eq!(reason, "bounced", "{r:?}");
        }
    }
    assert!(app.smtp.attempts(full) >= 2);
    assert_eq!(
        suppressions_of(&app, full).await,
        vec![("bounced".to_string(), "soft-bounces".to_string())]
    );
    assert!(suppressions_of(&app, busy).await.is_empty());
    assert!(app.smtp.messages_to(full).is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_policy_refusal_fails_without_suppressing_and_the_next_lead_still_receives() {
    let app = TestApp::spawn().await;
    let blocked = "blocked@example.com";
    app.smtp.set_rule(
        blocked,
        Rule::always(554, "5.7.1 Message rejected due to sender reputation"),
    );
    app.post_event(&event("checkout.abandoned", blocked)).await;
    let rows = app
        .wait_for_deliveries(blocked, "step one failed for policy", |d| {
            !d.is_empty() && d[0].state == "failed"
        })
        .await;
    let reason = rows[0].reason.clone().unwrap_or_default();
    assert!(reason.starts_with("policy: 554 5.7.1"), "{reason}");
    assert_eq!(rows[0].attempts, 1);
    assert!(
        suppressions_of(&app, blocked).await.is_empty(),
        "a policy block never suppresses"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM leads WHERE suppressed_reason IS NOT NULL")
            .await,
        0
    );

    app.post_event(&event("checkout.abandoned", "next@example.com")).await;
    app.smtp.wait_for_to("next@example.com", 1, DEADLINE).await;
    // The blocked lead's sequence goes on too (its address is fine): step two is tried as well.
    app.wait_for_deliveries(blocked, "step two was tried", |d| {
        d.len() == 3 && d[1].state == "failed"
    })
    .await;
    assert!(counter(&metrics_text(&app).await, "leadflow_sender_policy_blocks_total") >= 1.0);
    app.stop().await;
}

#[tokio::test]
async fn a_connection_dropped_after_the_data_is_uncertain_at_once_and_never_resent() {
    let app = TestApp::spawn().await;
    let lost = "lost@example.com";
    app.smtp.set_rule(lost, Rule::drop_after_data());
    app.post_event(&event("checkout.abandoned", lost)).await;
    let rows = app
        .wait_for_deliveries(lost, "step one is uncertain", |d| {
            !d.is_empty() && d[0].state == "uncertain"
        })
        .await;
    let reason = rows[0].reason.clone().unwrap_or_default();
    assert!(reason.starts_with("uncertain: "), "{reason}");
    // The later steps go their own way (each uncertain too); step one is never tried again.
    app.wait_for_deliveries(lost, "every step is uncertain", |d| {
        d.len() == 3 && d.iter().all(|r| r.state == "uncertain")
    })
    .await;
    let of_step_one: Vec<Transaction> = app
        .smtp
        .transactions()
        .into_iter()
        .filter(|t| t.delivery_id == Some(rows[0].id))
        .collect();
    assert_eq!(of_step_one.len(), 1, "{of_step_one:#?}");
    assert!(of_step_one[0].data_complete && of_step_one[0].reply.is_none());
    assert_eq!(app.smtp.attempts(lost), 3, "one transaction per step");
    assert!(counter(&metrics_text(&app).await, "leadflow_sender_uncertain_total") >= 3.0);

    // Another lead is unaffected: the dropped connections were not reused.
    app.post_event(&event("checkout.abandoned", "fine@example.com")).await;
    app.smtp.wait_for_to("fine@example.com", 1, DEADLINE).await;
    app.stop().await;
}

#[tokio::test]
async fn a_reply_delayed_within_the_timeout_is_sent_once() {
    let app = TestApp::spawn_with(&[Component::All], &[("LEADFLOW_SMTP_TIMEOUT", "10s")]).await;
    let slow = "slow@example.com";
    app.smtp.delay_data_reply_to(slow, Duration::from_millis(1500));
    app.post_event(&event("checkout.abandoned", slow)).await;
    let rows = app
        .wait_for_deliveries(slow, "step one is sent", |d| !d.is_empty() && d[0].state == "sent")
        .await;
    assert_eq!(rows[0].attempts, 1);
    let of_step_one: Vec<Transaction> = app
        .smtp
        .transactions()
        .into_iter()
        .filter(|t| t.delivery_id == Some(rows[0].id))
        .collect();
    assert_eq!(of_step_one.len(), 1, "{of_step_one:#?}");
    assert!(of_step_one[0].accepted());
    app.stop().await;
}

#[tokio::test]
async fn a_kept_connection_the_server_closed_is_not_reused_and_the_next_email_succeeds() {
    let app = TestApp::spawn().await;
    app.post_event(&event("checkout.abandoned", "first@example.com")).await;
    app.wait_for_deliveries("first@example.com", "step one is sent", |d| {
        !d.is_empty() && d[0].state == "sent"
    })
    .await;
    let before = app.smtp.connections();
    app.smtp.close_idle_sessions();
    app.post_event(&event("checkout.abandoned", "second@example.com")).await;
    let rows = app
        .wait_for_deliveries("second@example.com", "step one is sent", |d| {
            !d.is_empty() && d[0].state == "sent"
        })
        .await;
    assert_eq!(
        rows[0].attempts, 1,
        "the stale connection cost no attempt: {:?}",
        rows[0]
    );
    assert!(app.smtp.connections() > before, "a new connection was opened");
    assert!(
        app.smtp.unexpected_commands().is_empty(),
        "{:?}",
        app.smtp.unexpected_commands()
    );
    app.stop().await;
}

#[tokio::test]
async fn a_domain_rate_limit_defers_emails_in_turn_and_drops_none() {
    let app = TestApp::spawn_with(&[Component::All], &[("LEADFLOW_DOMAIN_RATES", "slow.test=1/s")]).await;
    let leads = ["a@slow.test", "b@slow.test", "c@slow.test"];
    let batch: Vec<Value> = leads.iter().map(|l| event("checkout.abandoned", l)).collect();
    app.post_event(&Value::Array(batch)).await;
    app.post_event(&event("checkout.abandoned", "quick@fast.test")).await;

    // Watch the deferred deliveries while they wait.
    let mut deferred: BTreeSet<i64> = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let rows = app
            .db()
            .await
            .query(
                "SELECT id FROM deliveries WHERE state = 'retrying' AND reason LIKE 'deferred:%'",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        deferred.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
        let sent = app
            .count("SELECT count(*) FROM deliveries d JOIN leads l ON l.id = d.lead_id WHERE l.email LIKE '%@slow.test' AND d.state = 'sent'")
            .await;
        if sent == 9 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {sent} of 9 emails to slow.test were sent; SMTP:\n{}",
            app.smtp.summary()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !deferred.is_empty(),
        "nine emails at one per second: some must have been deferred"
    );

    let mut all: Vec<DeliveryRow> = Vec::new();
    for lead in leads {
        all.extend(app.deliveries(lead).await);
    }
    assert_eq!(all.len(), 9);
    for row in &all {
        assert_eq!(row.state, "sent", "{row:?}");
        assert_eq!(row.attempts, 1, "a deferral is not an attempt: {row:?}");
    }
    // The deferred ones were given turns one second apart.
    let mut due: Vec<DateTime<Utc>> = all
        .iter()
        .filter(|r| deferred.contains(&r.id))
        .map(|r| r.due_at)
        .collect();
    due.sort();
    for pair in due.windows(2) {
        assert!(
            pair[1] - pair[0] >= chrono::TimeDelta::milliseconds(950),
            "deferred turns closer than the rate allows: {due:?}"
        );
    }
    // At the server: each exactly once, and no more than one per second overall.
    let mut arrivals: Vec<tokio::time::Instant> = Vec::new();
    let mut per_delivery: BTreeMap<i64, usize> = BTreeMap::new();
    for t in app.smtp.transactions() {
        if t.rcpt_to.iter().any(|r| r.ends_with("@slow.test")) && t.accepted() {
            *per_delivery.entry(t.delivery_id.unwrap_or_default()).or_default() += 1;
            arrivals.extend(t.completed_at);
        }
    }
    assert_eq!(per_delivery.len(), 9, "{per_delivery:?}");
    assert!(per_delivery.values().all(|n| *n == 1), "{per_delivery:?}");
    arrivals.sort();
    let span = *arrivals.last().unwrap_or(&arrivals[0]) - arrivals[0];
    assert!(
        span >= Duration::from_millis(7000),
        "nine emails at one per second cannot arrive within {span:?}"
    );
    // The other domain was not held back.
    assert!(!app.smtp.messages_to("quick@fast.test").is_empty());
    app.stop().await;
}

/// THE guarantee: a sender killed with SIGKILL in the middle of a busy batch, then restarted, sends nothing twice;
/// every delivery ends sent, failed, cancelled, or `uncertain` after the lease, and the uncertain ones are
/// exactly those whose message data the SMTP server received without the sender recording a 250.
#[tokio::test]
async fn a_sender_killed_mid_batch_sends_nothing_twice_and_marks_exactly_the_ambiguous_deliveries_uncertain() {
    const LEADS: usize = 150;
    let app = TestApp::builder()
        .components(&[Component::Ingest, Component::Scheduler, Component::Renderer])
        .env("LEADFLOW_LEASE", "2s")
        .env("LEADFLOW_SWEEP_AFTER", "2s")
        .spawn()
        .await;
    app.smtp
        .delay_data_replies(Duration::from_millis(20), Duration::from_millis(50));
    let sender = app.spawn_process(LEADFLOW, &["run", "sender"]);
    app.wait_for_consumers(WorkQueue::Sender, 1).await;

    let emails: Vec<String> = (0..LEADS).map(|i| format!("load{i:03}@example.com")).collect();
    let batch: Vec<Value> = emails.iter().map(|e| event("checkout.abandoned", e)).collect();
    app.post_event(&Value::Array(batch)).await;
    let total = (LEADS * 3) as i64;

    // Mid-batch: some emails are through, many are not.
    let deadline = Duration::from_secs(60);
    wait_until("a third of the step-one emails arrived", deadline, || async {
        app.smtp.transactions().iter().filter(|t| t.data_complete).count() >= LEADS / 3
    })
    .await;
    sender.kill().await;
    let at_kill = app.smtp.transactions().len();
    wait_until("the killed sender's consumer is gone", DEADLINE, || async {
        app.queue_state(WorkQueue::Sender).await.1 == 0
    })
    .await;

    let sender = app.spawn_process(LEADFLOW, &["run", "sender"]);
    wait_until(
        "every delivery is sent, failed, cancelled or uncertain",
        Duration::from_secs(90),
        || async {
            app.count("SELECT count(*) FROM deliveries WHERE state IN ('sent', 'failed', 'cancelled', 'uncertain')")
                .await
                == total
                && app.count("SELECT count(*) FROM deliveries").await == total
        },
    )
    .await;
    sender.kill().await;

    let rows = app
        .db()
        .await
        .query(
            "SELECT d.id, d.state, l.email FROM deliveries d JOIN leads l ON l.id = d.lead_id",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let state: BTreeMap<i64, (String, String)> = rows
        .iter()
        .map(|r| (r.get::<_, i64>(0), (r.get::<_, String>(1), r.get::<_, String>(2))))
        .collect();
    let in_state =
        |s: &str| -> BTreeSet<i64> { state.iter().filter(|(_, (st, _))| st == s).map(|(id, _)| *id).collect() };
    let sent = in_state("sent");
    let uncertain = in_state("uncertain");
    assert!(
        state.values().all(|(s, _)| terminal(s) || s == "uncertain"),
        "{state:?}"
    );

    let transactions = app.smtp.transactions();
    // Zero duplicates: at most one transaction per delivery ever carried message data, at most one was accepted.
    let mut with_data: BTreeMap<i64, usize> = BTreeMap::new();
    let mut accepted: BTreeMap<i64, usize> = BTreeMap::new();
    for t in &transactions {
        if let (true, Some(id)) = (t.data_started(), t.delivery_id) {
            *with_data.entry(id).or_default() += 1;
            if t.accepted() {
                *accepted.entry(id).or_default() += 1;
            }
        }
    }
    let twice: Vec<_> = with_data.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "deliveries whose data went out twice: {twice:?}");
    let mut per_header: BTreeMap<i64, usize> = BTreeMap::new();
    for m in app.smtp.messages() {
        *per_header
            .entry(m.delivery_id().unwrap_or_else(|| panic!("no X-Leadflow-Delivery: {m}")))
            .or_default() += 1;
    }
    assert!(per_header.values().all(|n| *n == 1), "a delivery arrived twice");

    // Every `sent` delivery was accepted by the server.
    let not_accepted: Vec<_> = sent.iter().filter(|id| !accepted.contains_key(id)).collect();
    assert!(
        not_accepted.is_empty(),
        "recorded sent, never accepted: {not_accepted:?}"
    );

    // What the server can prove was ambiguous: its data arrived, and the sender never recorded it sent (the 250
    // never reached it, or it was killed before recording it).
    let provable: BTreeSet<i64> = with_data.keys().filter(|id| !sent.contains(id)).copied().collect();
    // The one window the server cannot see into: the sender committed its start mark and was killed before its
    // first byte of data left (the server saw the 354, then the connection closed with no data).
    // (Data cut before its headers arrived cannot be told apart from that either.)
    let cut_at_354: BTreeSet<String> = transactions
        .iter()
        .filter(|t| !t.data_started() || t.delivery_id.is_none())
        .flat_map(|t| t.rcpt_to.iter().map(|r| r.to_lowercase()))
        .collect();
    let missing: Vec<_> = provable.difference(&uncertain).collect();
    assert!(
        missing.is_empty(),
        "ambiguous at the server but not uncertain: {missing:?}"
    );
    let unexplained: Vec<_> = uncertain
        .difference(&provable)
        .filter(|id| !state.get(id).is_some_and(|(_, email)| cut_at_354.contains(email)))
        .collect();
    assert!(
        unexplained.is_empty(),
        "uncertain without the server having received anything: {unexplained:?}"
    );
    eprintln!(
        "killed after {at_kill} transactions: {} sent, {} uncertain ({} proven by the server), {} in total",
        sent.len(),
        uncertain.len(),
        provable.len(),
        state.len()
    );
    app.stop().await;
}
