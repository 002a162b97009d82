//! Asynchronous bounces, complaints and mailto unsubscribes end to end: a follow-up goes out over SMTP with its
//! VERP return path, then a report about it arrives over HTTP (`POST /v1/bounces`) or AMQP (`<ns>.bounces`), in
//! the formats real MTAs write (the samples in shared/tests/dsn), and changes exactly what it should.

use std::path::PathBuf;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::BasicProperties;
use serde_json::Value;

use leadflow_shared::amqp;
use leadflow_shared::dsn::verp_token;
use leadflow_shared::settings;
use leadflow_shared::tokens::{Keyring, Purpose};
use leadflow_shared::topology::{Topology, WorkQueue};
use leadflow_tests::{event, wait_until, TestApp, DEADLINE, TEST_TOKEN_KEYS};

/// The placeholders of the samples: VERP token, unsubscribe token, recipient and delivery id.
const SAMPLE_TOKEN: &str = "t1.NDI.AAAAAAAAAAAAAAAAAAAAAA";
const SAMPLE_UNSUBSCRIBE: &str = "t1.ZDo0Mg.BBBBBBBBBBBBBBBBBBBBBB";
const SAMPLE_LEAD: &str = "ann.lee@example.net";
const SAMPLE_DELIVERY: &str = "X-Leadflow-Delivery: 42";

/// A follow-up that went out: its delivery and the tokens it carried.
struct Sent {
    email: String,
    delivery_id: i64,
    verp: String,
    unsubscribe: String,
}

fn keyring() -> Keyring {
    Keyring::parse(TEST_TOKEN_KEYS).unwrap_or_else(|e| panic!("the test keys do not parse: {e}"))
}

fn unique_email(prefix: &str) -> String {
    format!(
        "{prefix}-{}@example.net",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// Enrolls a new lead (steps 2 and 3 an hour away, so nothing races the report) and waits until step 1 is sent.
async fn send_step_one(app: &TestApp, prefix: &str) -> Sent {
    app.db()
        .await
        .execute("UPDATE campaign_steps SET delay_seconds = 3600 WHERE step > 1", &[])
        .await
        .unwrap_or_else(|e| panic!("cannot slow the later steps down: {e}"));
    let email = unique_email(prefix);
    app.post_event(&event("checkout.abandoned", &email)).await;
    let message = app.smtp.wait_for_to(&email, 1, DEADLINE).await.remove(0);
    let delivery_id = message
        .delivery_id()
        .unwrap_or_else(|| panic!("no X-Leadflow-Delivery header in {message}"));
    app.wait_for_deliveries(&email, "step 1 is recorded as sent", |rows| {
        rows.iter().any(|r| r.id == delivery_id && r.state == "sent")
    })
    .await;
    let ring = keyring();
    let expected = ring.sign(Purpose::Bounce, &delivery_id.to_string());
    // The sender's MAIL FROM is the VERP address; it is deterministic, so it equals what the test signs.
    let verp = match verp_token(&message.mail_from) {
        Some(token) => {
            assert_eq!(
                token, expected,
                "the return path {} carries another token",
                message.mail_from
            );
            token.to_string()
        }
        None => expected,
    };
    Sent {
        email,
        delivery_id,
        verp,
        unsubscribe: ring.sign(Purpose::Unsubscribe, &format!("d:{delivery_id}")),
    }
}

fn samples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("shared")
        .join("tests")
        .join("dsn")
}

/// A sample report rewritten to be about `sent` (its recipient, delivery and tokens).
fn report_about(sample: &str, sent: &Sent) -> String {
    let path = samples_dir().join(sample);
    let raw = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    raw.replace(SAMPLE_TOKEN, &sent.verp)
        .replace(SAMPLE_UNSUBSCRIBE, &sent.unsubscribe)
        .replace(SAMPLE_LEAD, &sent.email)
        .replace(SAMPLE_DELIVERY, &format!("X-Leadflow-Delivery: {}", sent.delivery_id))
}

async fn post_report(app: &TestApp, raw: impl Into<reqwest::Body>) -> (u16, Value) {
    post_report_as(app, "message/rfc822", raw).await
}

async fn post_report_as(app: &TestApp, content_type: &str, raw: impl Into<reqwest::Body>) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(app.url("/v1/bounces"))
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .body(raw)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /v1/bounces failed: {e}"));
    let status = response.status().as_u16();
    let is_problem = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "application/problem+json");
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status >= 400 {
        assert!(is_problem, "a refusal is a problem+json document: {status} {body}");
    }
    (status, body)
}

/// Posts a report that must be accepted; returns the answer.
async fn accepted(app: &TestApp, raw: String) -> Value {
    let (status, body) = post_report(app, raw).await;
    assert_eq!(status, 202, "expected 202 Accepted, got {status}: {body}");
    body
}

/// (reason, source) of every suppression of `email`.
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

/// (received_via, kind, outcome, detail) of every kept report, oldest first.
async fn inbound_reports(app: &TestApp) -> Vec<(String, Option<String>, String, Option<String>)> {
    app.db()
        .await
        .query(
            "SELECT received_via, kind, outcome, detail FROM inbound_reports ORDER BY id",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to read inbound reports: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

async fn soft_bounces(app: &TestApp) -> i64 {
    app.count("SELECT count(*) FROM soft_bounces").await
}

/// Steps 2 and 3 are still waiting: nothing was cancelled.
async fn assert_untouched(app: &TestApp, sent: &Sent) {
    let rows = app.deliveries_of(&sent.email).await;
    assert_eq!(
        rows,
        vec![
            (1, "sent".to_string(), None),
            (2, "pending".to_string(), None),
            (3, "pending".to_string(), None)
        ],
        "the lead's follow-ups changed"
    );
    assert!(
        suppressions_of(app, &sent.email).await.is_empty(),
        "the lead was suppressed"
    );
}

#[tokio::test]
async fn a_hard_bounce_posted_over_http_suppresses_the_lead_and_cancels_its_later_steps_as_bounced() {
    let app = TestApp::spawn().await;
    let sent = send_step_one(&app, "hard").await;

    let answer = accepted(&app, report_about("postfix-user-unknown.msg", &sent)).await;
    assert_eq!(answer["kind"], "dsn", "{answer}");
    assert_eq!(answer["class"], "hard", "{answer}");
    assert_eq!(answer["outcome"], "applied", "{answer}");
    assert_eq!(answer["status"], "5.1.1", "{answer}");
    assert_eq!(answer["delivery"], sent.delivery_id, "{answer}");
    assert_eq!(answer["suppressed"], true, "{answer}");
    assert_eq!(answer["cancelled_deliveries"], 2, "{answer}");

    assert_eq!(
        suppressions_of(&app, &sent.email).await,
        vec![("bounced".to_string(), "dsn".to_string())]
    );
    assert_eq!(
        app.deliveries_of(&sent.email).await,
        vec![
            (1, "failed".to_string(), Some("bounced: 5.1.1 (dsn)".to_string())),
            (2, "cancelled".to_string(), Some("bounced".to_string())),
            (3, "cancelled".to_string(), Some("bounced".to_string())),
        ]
    );
    let enrollment: (String, Option<String>) = {
        let row = app
            .db()
            .await
            .query_one(
                "SELECT e.status, e.reason FROM enrollments e JOIN leads l ON l.id = e.lead_id WHERE l.email = $1",
                &[&sent.email],
            )
            .await
            .unwrap_or_else(|e| panic!("failed to read the enrollment: {e}"));
        (row.get(0), row.get(1))
    };
    assert_eq!(enrollment, ("cancelled".to_string(), Some("bounced".to_string())));

    // The same report again (an MTA retrying its pipe) changes nothing more.
    let again = accepted(&app, report_about("postfix-user-unknown.msg", &sent)).await;
    assert_eq!(again["suppressed"], false, "{again}");
    assert_eq!(again["cancelled_deliveries"], 0, "{again}");

    let reports = inbound_reports(&app).await;
    assert_eq!(reports.len(), 2, "{reports:?}");
    for (via, kind, outcome, detail) in &reports {
        assert_eq!(
            (via.as_str(), kind.as_deref(), outcome.as_str()),
            ("http", Some("dsn"), "applied")
        );
        let detail = detail.as_deref().unwrap_or_default();
        assert!(detail.contains("hard bounce 5.1.1"), "{detail}");
        assert!(
            !detail.contains(&sent.email),
            "the detail names the address in full: {detail}"
        );
    }
    let raw: Vec<u8> = app
        .db()
        .await
        .query_one("SELECT raw FROM inbound_reports ORDER BY id LIMIT 1", &[])
        .await
        .unwrap_or_else(|e| panic!("failed to read the raw report: {e}"))
        .get(0);
    assert_eq!(raw, report_about("postfix-user-unknown.msg", &sent).into_bytes());
}

#[tokio::test]
async fn bounces_in_exim_gmail_and_exchange_formats_are_hard_too() {
    let app = TestApp::spawn().await;
    for sample in [
        "exim-dsn.msg",
        "exim-plain-text.msg",
        "gmail-account-disabled.msg",
        "exchange-recipient-not-found.msg",
    ] {
        let sent = send_step_one(&app, "format").await;
        let answer = accepted(&app, report_about(sample, &sent)).await;
        assert_eq!(answer["class"], "hard", "{sample}: {answer}");
        assert_eq!(answer["delivery"], sent.delivery_id, "{sample}: {answer}");
        assert_eq!(
            suppressions_of(&app, &sent.email).await,
            vec![("bounced".to_string(), "dsn".to_string())],
            "{sample}"
        );
    }
}

#[tokio::test]
async fn delayed_policy_and_other_recipient_reports_change_nothing_and_soft_bounces_suppress_only_at_the_limit() {
    let app = TestApp::spawn().await;
    settings::set(&app.db().await, settings::SOFT_BOUNCE_LIMIT, "2")
        .await
        .unwrap_or_else(|e| panic!("cannot set the soft-bounce limit: {e:#}"));
    let sent = send_step_one(&app, "soft").await;

    let delayed = accepted(&app, report_about("postfix-delayed.msg", &sent)).await;
    assert_eq!(
        (&delayed["class"], &delayed["outcome"]),
        (&"delay".into(), &"ignored".into()),
        "{delayed}"
    );
    let delivered = accepted(&app, report_about("postfix-delivered.msg", &sent)).await;
    assert_eq!(delivered["outcome"], "ignored", "{delivered}");
    assert_untouched(&app, &sent).await;
    assert_eq!(soft_bounces(&app).await, 0);

    // 5.7.1: the receiving server blocks the sender; the recipient is not to blame.
    let policy = accepted(&app, report_about("postfix-policy-5.7.1.msg", &sent)).await;
    assert_eq!(policy["class"], "policy", "{policy}");
    assert_eq!(policy["suppressed"], false, "{policy}");
    assert_untouched(&app, &sent).await;
    assert_eq!(soft_bounces(&app).await, 0);

    // A bounce of another recipient of the same message (the campaign's BCC copy) is not held against the lead.
    let bcc = report_about("postfix-user-unknown.msg", &sent).replace(&sent.email, "sales-copy@shop.example");
    let other = accepted(&app, bcc).await;
    assert_eq!(
        (&other["class"], &other["outcome"]),
        (&"other-recipient".into(), &"ignored".into()),
        "{other}"
    );
    assert_untouched(&app, &sent).await;

    // Mailbox full: soft, counted once however often the same report comes.
    for _ in 0..2 {
        let soft = accepted(&app, report_about("postfix-mailbox-full.msg", &sent)).await;
        assert_eq!(soft["class"], "soft", "{soft}");
        assert_eq!(soft["suppressed"], false, "{soft}");
    }
    assert_eq!(soft_bounces(&app).await, 1);
    assert_untouched(&app, &sent).await;

    // A second, different transient failure reaches the limit of 2: suppressed as bounced by the soft rule.
    let second = report_about("postfix-mailbox-full.msg", &sent).replace("5.2.2", "4.2.2");
    let soft = accepted(&app, second).await;
    assert_eq!(soft["class"], "soft", "{soft}");
    assert_eq!(soft["suppressed"], true, "{soft}");
    assert_eq!(soft_bounces(&app).await, 2);
    assert_eq!(
        suppressions_of(&app, &sent.email).await,
        vec![("bounced".to_string(), "soft-bounces".to_string())]
    );
    let rows = app.deliveries_of(&sent.email).await;
    assert_eq!(
        rows[1],
        (2, "cancelled".to_string(), Some("bounced".to_string())),
        "{rows:?}"
    );
    assert_eq!(
        rows[0].1, "sent",
        "a soft bounce leaves the sent step as it was: {rows:?}"
    );
}

#[tokio::test]
async fn an_abuse_report_suppresses_the_lead_as_complained() {
    let app = TestApp::spawn().await;
    let sent = send_step_one(&app, "abuse").await;

    let not_spam = accepted(&app, report_about("arf-not-spam.msg", &sent)).await;
    assert_eq!(
        (&not_spam["class"], &not_spam["outcome"]),
        (&"feedback".into(), &"ignored".into()),
        "{not_spam}"
    );
    assert_untouched(&app, &sent).await;

    let answer = accepted(&app, report_about("arf-abuse.msg", &sent)).await;
    assert_eq!(answer["kind"], "arf", "{answer}");
    assert_eq!(answer["class"], "complaint", "{answer}");
    assert_eq!(answer["suppressed"], true, "{answer}");
    assert_eq!(
        suppressions_of(&app, &sent.email).await,
        vec![("complained".to_string(), "arf".to_string())]
    );
    assert_eq!(
        app.deliveries_of(&sent.email).await,
        vec![
            (1, "sent".to_string(), None),
            (2, "cancelled".to_string(), Some("complained".to_string())),
            (3, "cancelled".to_string(), Some("complained".to_string())),
        ]
    );
}

#[tokio::test]
async fn forged_altered_and_mismatched_tokens_are_rejected_and_change_nothing() {
    let app = TestApp::spawn().await;
    let sent = send_step_one(&app, "forged").await;
    let ring = keyring();
    let parts: Vec<String> = sent.verp.split('.').map(str::to_string).collect();
    let other_payload = ring.sign(Purpose::Bounce, &(sent.delivery_id + 1).to_string());
    let other_payload = other_payload.split('.').nth(1).unwrap_or_default();
    let foreign = Keyring::parse("t1:another-installation-key-0123456789abcdef")
        .unwrap_or_else(|e| panic!("{e}"))
        .sign(Purpose::Bounce, &sent.delivery_id.to_string());

    // Exim's report carries the token in its envelope, its return path and the original; no List-Unsubscribe.
    let valid = report_about("exim-dsn.msg", &sent);
    let forgeries = [
        (
            "signed with a key leadflow does not have",
            valid.replace(&sent.verp, &foreign),
        ),
        (
            "the payload changed to another delivery, the MAC kept",
            valid.replace(&sent.verp, &format!("{}.{other_payload}.{}", parts[0], parts[2])),
        ),
        (
            "an unsubscribe token used as a return path",
            valid.replace(&sent.verp, &sent.unsubscribe),
        ),
        (
            "no token at all",
            valid.replace(&format!("bounces+{}", sent.verp), "bounces"),
        ),
        (
            "the original names another delivery",
            valid.replace(
                &format!("X-Leadflow-Delivery: {}", sent.delivery_id),
                &format!("X-Leadflow-Delivery: {}", sent.delivery_id + 1000),
            ),
        ),
    ];
    for (what, raw) in &forgeries {
        assert_ne!(raw, &valid, "{what}: the forgery is the valid report");
        let (status, problem) = post_report(&app, raw.clone()).await;
        assert_eq!(status, 400, "{what}: expected 400, got {status}: {problem}");
        let detail = problem["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("kept as inbound report"), "{what}: {detail}");
    }
    // Unparseable input: refused with a reason, never a crash.
    for (what, raw) in [
        ("garbage", b"\x00\x01\x02 not a message \xff".to_vec()),
        (
            "an ordinary reply",
            std::fs::read(samples_dir().join("not-a-report.msg")).unwrap_or_default(),
        ),
        (
            "a truncated report",
            std::fs::read(samples_dir().join("truncated-dsn.msg")).unwrap_or_default(),
        ),
        ("nothing", Vec::new()),
    ] {
        let (status, problem) = post_report(&app, raw).await;
        assert_eq!(status, 400, "{what}: expected 400, got {status}: {problem}");
    }
    let (status, problem) = post_report_as(&app, "application/json", valid.clone()).await;
    assert_eq!(status, 415, "{problem}");

    assert_untouched(&app, &sent).await;
    let reports = inbound_reports(&app).await;
    assert_eq!(reports.len(), forgeries.len() + 4, "{reports:#?}");
    assert!(
        reports.iter().all(|(via, _, outcome, detail)| via == "http"
            && outcome == "rejected"
            && detail.as_deref().is_some_and(|d| !d.is_empty())),
        "{reports:#?}"
    );
    assert_eq!(app.count("SELECT count(*) FROM suppressions").await, 0);

    // The genuine report still works afterwards.
    let answer = accepted(&app, valid).await;
    assert_eq!(answer["class"], "hard", "{answer}");
}

#[tokio::test]
async fn a_report_without_a_return_path_is_tied_to_its_delivery_by_the_original_unsubscribe_link() {
    let app = TestApp::spawn().await;
    let sent = send_step_one(&app, "norp").await;
    // An MTA that rewrote the envelope: no VERP address anywhere, but the original's headers are included.
    let raw = report_about("postfix-user-unknown.msg", &sent).replace(&format!("bounces+{}", sent.verp), "bounces");
    let answer = accepted(&app, raw.clone()).await;
    assert_eq!(answer["class"], "hard", "{answer}");
    assert_eq!(answer["delivery"], sent.delivery_id, "{answer}");

    // Without the X-Leadflow-Delivery cross-check, the unsubscribe link alone is not enough.
    let unchecked = raw.replace(&format!("X-Leadflow-Delivery: {}\n", sent.delivery_id), "");
    let (status, problem) = post_report(&app, unchecked).await;
    assert_eq!(status, 400, "{problem}");
}

/// Publishes a raw report to `<ns>.bounces` as an MTA pipe does, and waits for the broker's confirm.
async fn publish_report(app: &TestApp, raw: &[u8]) {
    let connection = amqp::connect(&app.config.amqp, "test-mta-pipe")
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the broker: {e:#}"));
    let channel = connection
        .create_channel()
        .await
        .unwrap_or_else(|e| panic!("cannot open a channel: {e}"));
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap_or_else(|e| panic!("cannot enable confirms: {e}"));
    let exchange = Topology::new(&app.config.amqp).bounces_exchange();
    let confirm = channel
        .basic_publish(
            exchange.as_str().into(),
            "".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            raw,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("message/rfc822".into()),
        )
        .await
        .unwrap_or_else(|e| panic!("failed to publish to {exchange}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("lost the confirm from {exchange}: {e}"));
    assert!(confirm.is_ack(), "the broker refused the report");
    assert!(confirm.take_message().is_none(), "{exchange} routed the report nowhere");
    let _ = connection.close(200, "published".into()).await;
}

#[tokio::test]
async fn reports_published_over_amqp_are_applied_and_a_garbage_one_is_dead_lettered_while_later_ones_flow() {
    let app = TestApp::spawn().await;
    let sent = send_step_one(&app, "amqp").await;

    publish_report(&app, b"this is not a bounce at all").await;
    publish_report(&app, report_about("postfix-user-unknown.msg", &sent).as_bytes()).await;

    let dead = app.wait_for_dead_letters(WorkQueue::IngestBounces, 1).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "this is not a bounce at all");
    let reason = dead[0].1.clone().unwrap_or_default();
    assert!(
        reason.contains("kept as inbound report"),
        "the dead letter says why: {reason:?}"
    );

    wait_until("the published bounce suppresses the lead", DEADLINE, || async {
        !suppressions_of(&app, &sent.email).await.is_empty()
    })
    .await;
    assert_eq!(
        suppressions_of(&app, &sent.email).await,
        vec![("bounced".to_string(), "dsn".to_string())]
    );
    assert_eq!(
        app.deliveries_of(&sent.email).await[1],
        (2, "cancelled".to_string(), Some("bounced".to_string()))
    );
    let reports = inbound_reports(&app).await;
    let summary: Vec<(&str, &str)> = reports
        .iter()
        .map(|(via, _, outcome, _)| (via.as_str(), outcome.as_str()))
        .collect();
    assert_eq!(summary, [("amqp", "rejected"), ("amqp", "applied")], "{reports:#?}");
}

#[tokio::test]
async fn the_mailto_unsubscribe_suppresses_the_lead_as_unsubscribed() {
    let app = TestApp::spawn().await;
    let sent = send_step_one(&app, "mailto").await;
    // The address in the email's List-Unsubscribe carries the same token the test signs.
    let message = app.smtp.messages_to(&sent.email).remove(0);
    if let Some(list) = message.header("List-Unsubscribe") {
        assert!(
            list.contains(&format!("subject=unsubscribe-{}", sent.unsubscribe)),
            "List-Unsubscribe {list:?} carries another token"
        );
    }

    // A forged subject token is refused.
    let forged = report_about("mailto-unsubscribe.msg", &sent).replace(
        &sent.unsubscribe,
        &keyring().sign(Purpose::Bounce, &format!("d:{}", sent.delivery_id)),
    );
    let (status, problem) = post_report(&app, forged).await;
    assert_eq!(status, 400, "{problem}");
    assert_untouched(&app, &sent).await;

    let answer = accepted(&app, report_about("mailto-unsubscribe.msg", &sent)).await;
    assert_eq!(answer["kind"], "mailto", "{answer}");
    assert_eq!(answer["class"], "unsubscribe", "{answer}");
    assert_eq!(answer["suppressed"], true, "{answer}");
    assert_eq!(
        suppressions_of(&app, &sent.email).await,
        vec![("unsubscribed".to_string(), "mailto".to_string())]
    );
    assert_eq!(
        app.deliveries_of(&sent.email).await,
        vec![
            (1, "sent".to_string(), None),
            (2, "cancelled".to_string(), Some("unsubscribed".to_string())),
            (3, "cancelled".to_string(), Some("unsubscribed".to_string())),
        ]
    );
}
