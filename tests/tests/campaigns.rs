//! Campaign rules against the real services: targeting filters, the step limit, minimum delays, the global
//! switch and expiry, enrollment per checkout, which purchase ends which sequence, opt-outs, deactivation, the
//! attribution window, the built-in campaigns and the results table.

use std::path::PathBuf;

use chrono::{TimeDelta, Utc};
use serde_json::json;

use leadflow_tests::{event, wait_until, TestApp, DEADLINE};

/// Writes `yaml` to a fresh folder and applies it to the app's database.
async fn apply_yaml(app: &TestApp, yaml: &str) -> anyhow::Result<leadflow::apply::ApplyReport> {
    let dir = std::env::temp_dir().join(format!("leadflow-campaign-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let file: PathBuf = dir.join("campaign.yaml");
    std::fs::write(&file, yaml)?;
    let pool = leadflow_shared::db::pool(&app.config.database)?;
    let result = leadflow::apply::apply_path(&pool, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Stops the base fixture campaign, so only the campaign under test enrolls.
async fn only_the_campaign_under_test(app: &TestApp) {
    let client = app.db().await;
    leadflow_scheduler::campaigns::set_status(&client, "cart-recovery", false)
        .await
        .expect("deactivate cart-recovery");
}

async fn set(app: &TestApp, key: &str, value: &str) {
    let client = app.db().await;
    leadflow_shared::settings::set(&client, key, value)
        .await
        .unwrap_or_else(|e| panic!("setting {key}={value}: {e:#}"));
}

fn checkout(email: &str, checkout_id: &str, sku: &str) -> serde_json::Value {
    let mut e = event("checkout.abandoned", email);
    e["data"]["checkout_id"] = json!(checkout_id);
    e["data"]["product"]["sku"] = json!(sku);
    e
}

async fn enrollments_of(app: &TestApp, email: &str) -> i64 {
    let client = app.db().await;
    client
        .query_one(
            "SELECT count(*) FROM enrollments e JOIN leads l ON l.id = e.lead_id WHERE l.email = $1",
            &[&email],
        )
        .await
        .expect("count enrollments")
        .get(0)
}

async fn wait_handled(app: &TestApp, events: i64) {
    wait_until("the scheduler handled every event", DEADLINE, || async {
        app.count("SELECT count(*) FROM events WHERE handled_at IS NOT NULL")
            .await
            >= events
    })
    .await;
}

const FILTERED: &str = "
name: german-trail-runners
lead_source: checkout.abandoned
products: [TR-2]
languages: [de]
countries: [DE, AT]
steps:
  - { delay: 1s, template: cart-reminder }
";

#[tokio::test]
async fn filters_narrow_the_audience_by_product_language_and_country() {
    let app = TestApp::spawn().await;
    only_the_campaign_under_test(&app).await;
    apply_yaml(&app, FILTERED).await.expect("apply");

    let mut matching = event("checkout.abandoned", "jonas@example.de");
    matching["data"]["language"] = json!("de-AT");
    matching["data"]["country"] = json!("AT");
    let mut wrong_language = event("checkout.abandoned", "ann@example.co.uk");
    wrong_language["data"]["country"] = json!("DE");
    let mut wrong_country = event("checkout.abandoned", "lea@example.fr");
    wrong_country["data"]["language"] = json!("de");
    wrong_country["data"]["country"] = json!("FR");
    let mut wrong_product = event("checkout.abandoned", "max@example.de");
    wrong_product["data"]["language"] = json!("de");
    wrong_product["data"]["country"] = json!("DE");
    wrong_product["data"]["product"]["sku"] = json!("OTHER-1");
    for e in [&matching, &wrong_language, &wrong_country, &wrong_product] {
        app.post_event(e).await;
    }
    wait_handled(&app, 4).await;

    assert_eq!(enrollments_of(&app, "jonas@example.de").await, 1);
    for outsider in ["ann@example.co.uk", "lea@example.fr", "max@example.de"] {
        assert_eq!(
            enrollments_of(&app, outsider).await,
            0,
            "{outsider} is outside the audience"
        );
    }
    let sent = app.smtp.wait_for_to("jonas@example.de", 1, DEADLINE).await;
    let subject = sent[0].subject().unwrap_or_default();
    assert!(subject.contains("Trail Runner 2"), "{subject}");
    app.stop().await;
}

#[tokio::test]
async fn a_fourth_step_is_refused_and_nothing_is_applied() {
    let app = TestApp::spawn().await;
    let yaml = "
name: too-long
lead_source: all
steps:
  - { delay: 1h, template: cart-reminder }
  - { delay: 1h, template: cart-reminder }
  - { delay: 1h, template: cart-reminder }
  - { delay: 1h, template: cart-reminder }
";
    let err = format!(
        "{:#}",
        apply_yaml(&app, yaml).await.expect_err("four steps must be refused")
    );
    assert!(err.contains("steps") && err.contains("1 to 3"), "{err}");
    assert_eq!(
        app.count("SELECT count(*) FROM campaigns WHERE name = 'too-long'")
            .await,
        0
    );

    let missing_template = FILTERED.replace("cart-reminder", "no-such-template");
    let err = format!("{:#}", apply_yaml(&app, &missing_template).await.unwrap_err());
    assert!(err.contains("no-such-template"), "{err}");
    app.stop().await;
}

#[tokio::test]
async fn the_minimum_delay_per_lead_source_holds_back_the_first_follow_up() {
    let app = TestApp::spawn().await;
    set(&app, "min_delay.checkout.abandoned", "1h").await;
    app.post_event(&event("checkout.abandoned", "ann@example.com")).await;
    let rows = app
        .wait_for_deliveries("ann@example.com", "three steps scheduled", |r| r.len() == 3)
        .await;
    let first = rows[0].due_at - rows[0].enrolled_at;
    assert!(
        first >= TimeDelta::minutes(59),
        "step 1 due after {first:?}, expected at least 1h"
    );
    // Later steps keep their own delays after the (delayed) first one.
    let gap = rows[1].due_at - rows[0].due_at;
    assert!(
        gap >= TimeDelta::milliseconds(900) && gap <= TimeDelta::seconds(2),
        "{gap:?}"
    );

    // Another source is not held back.
    let mut trial = event("trial.started", "bob@example.com");
    trial["data"]["product"]["sku"] = json!("APP-1");
    apply_yaml(
        &app,
        "name: trials\nlead_source: trial.started\nsteps: [{ delay: 1s, template: cart-reminder }]\n",
    )
    .await
    .expect("apply");
    app.post_event(&trial).await;
    app.smtp.wait_for_to("bob@example.com", 1, DEADLINE).await;
    assert!(app.smtp.messages_to("ann@example.com").is_empty());
    app.stop().await;
}

#[tokio::test]
async fn with_sending_switched_off_due_steps_wait_and_resume_when_switched_on() {
    let app = TestApp::spawn().await;
    set(&app, "sending_enabled", "false").await;
    app.post_event(&event("checkout.abandoned", "ann@example.com")).await;
    let rows = app
        .wait_for_deliveries("ann@example.com", "three steps scheduled", |r| r.len() == 3)
        .await;
    // Wait until every step is overdue by a second: ten scheduler ticks went by with the switch off.
    let overdue = rows[2].due_at + TimeDelta::seconds(1);
    wait_until("every step is overdue", DEADLINE, || async { Utc::now() > overdue }).await;
    let rows = app.deliveries("ann@example.com").await;
    assert!(rows.iter().all(|r| r.state == "pending"), "{rows:#?}");
    assert!(app.smtp.messages().is_empty(), "nothing may be sent while switched off");

    set(&app, "sending_enabled", "true").await;
    app.smtp.wait_for_to("ann@example.com", 3, DEADLINE).await;
    app.stop().await;
}

#[tokio::test]
async fn steps_older_than_the_staleness_limit_expire_instead_of_going_out_late() {
    let app = TestApp::spawn().await;
    set(&app, "sending_enabled", "off").await;
    set(&app, "stale_after", "2s").await;
    app.post_event(&event("checkout.abandoned", "ann@example.com")).await;
    let rows = app
        .wait_for_deliveries("ann@example.com", "three steps scheduled", |r| r.len() == 3)
        .await;
    // Step 1 becomes stale (due more than 2 s ago); step 3 is due 2 s after step 1 and is not stale yet.
    let stale = rows[0].due_at + TimeDelta::milliseconds(2500);
    wait_until("step 1 is stale", DEADLINE, || async { Utc::now() > stale }).await;
    set(&app, "sending_enabled", "on").await;
    let rows = app
        .wait_for_deliveries("ann@example.com", "step 1 expired, step 3 sent", |r| {
            r.len() == 3 && r[0].state == "cancelled" && r[2].state == "sent"
        })
        .await;
    assert_eq!(rows[0].reason.as_deref(), Some("expired"), "{rows:#?}");
    assert!(
        app.smtp
            .messages_to("ann@example.com")
            .iter()
            .all(|m| m.delivery_id() != Some(rows[0].id)),
        "an expired step was sent"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_new_checkout_is_a_new_enrollment_and_a_repeat_of_the_same_checkout_is_not() {
    let app = TestApp::spawn().await;
    app.post_event(&checkout("ann@example.com", "co-1", "TR-2")).await;
    // Same checkout, new event id: the upstream system sent it again later.
    app.post_event(&checkout("ann@example.com", "co-1", "TR-2")).await;
    // Another checkout, another product: a new sequence.
    app.post_event(&checkout("ann@example.com", "co-2", "KET-1")).await;
    wait_handled(&app, 3).await;
    assert_eq!(enrollments_of(&app, "ann@example.com").await, 2);
    app.smtp.wait_for_to("ann@example.com", 6, DEADLINE).await;
    app.stop().await;
}

#[tokio::test]
async fn a_purchase_ends_only_the_sequences_it_concerns() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    app.post_event(&checkout("ann@example.com", "co-1", "TR-2")).await;
    app.post_event(&checkout("ann@example.com", "co-2", "KET-1")).await;
    wait_handled(&app, 2).await;

    let mut order = event("order.completed", "ann@example.com");
    order["data"]["checkout_id"] = json!("co-1");
    order["data"]["product"]["sku"] = json!("TR-2");
    app.post_event(&order).await;

    app.wait_for_deliveries("ann@example.com", "the co-1 sequence is cancelled", |r| {
        r.iter().filter(|d| d.reason.as_deref() == Some("converted")).count() >= 2
    })
    .await;
    let client = app.db().await;
    let open: i64 = client
        .query_one(
            "SELECT count(*) FROM deliveries d JOIN enrollments e ON e.id = d.enrollment_id
             WHERE e.checkout_id = 'co-2' AND d.state <> 'cancelled'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let cancelled_co1: i64 = client
        .query_one(
            "SELECT count(*) FROM deliveries d JOIN enrollments e ON e.id = d.enrollment_id
             WHERE e.checkout_id = 'co-1' AND d.state = 'cancelled' AND d.reason = 'converted'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(cancelled_co1 >= 2, "the purchased checkout's open steps end");
    assert_eq!(open, 3, "the other checkout's sequence goes on");
    app.stop().await;
}

#[tokio::test]
async fn an_unsubscribe_ends_every_sequence_and_keeps_the_lead_out() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    app.post_event(&event("checkout.abandoned", "ann@example.com")).await;
    app.smtp.wait_for_to("ann@example.com", 1, DEADLINE).await;
    app.post_event(&event("lead.unsubscribed", "ann@example.com")).await;
    let rows = app
        .wait_for_deliveries("ann@example.com", "open steps cancelled", |r| {
            r.len() == 3 && r[1].state == "cancelled" && r[2].state == "cancelled"
        })
        .await;
    assert_eq!(rows[1].reason.as_deref(), Some("unsubscribed"));
    app.post_event(&checkout("ann@example.com", "co-9", "KET-1")).await;
    wait_handled(&app, 3).await;
    assert_eq!(
        enrollments_of(&app, "ann@example.com").await,
        1,
        "a suppressed lead is not enrolled again"
    );
    app.stop().await;
}

#[tokio::test]
async fn deactivating_a_campaign_cancels_its_open_follow_ups() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    app.post_event(&event("checkout.abandoned", "ann@example.com")).await;
    app.smtp.wait_for_to("ann@example.com", 1, DEADLINE).await;
    let client = app.db().await;
    let cancelled = leadflow_scheduler::campaigns::set_status(&client, "cart-recovery", false)
        .await
        .unwrap();
    assert_eq!(cancelled, 2);
    let rows = app.deliveries("ann@example.com").await;
    assert_eq!(rows[0].state, "sent");
    for r in &rows[1..] {
        assert_eq!(
            (r.state.as_str(), r.reason.as_deref()),
            ("cancelled", Some("campaign stopped"))
        );
    }
    // Inactive: a new lead is not enrolled.
    app.post_event(&event("checkout.abandoned", "bob@example.com")).await;
    wait_handled(&app, 2).await;
    assert_eq!(enrollments_of(&app, "bob@example.com").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn a_purchase_outside_the_attribution_window_is_not_credited_to_a_follow_up() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    set(&app, "attribution_window", "1s").await;
    app.post_event(&event("checkout.abandoned", "ann@example.com")).await;
    let rows = app
        .wait_for_deliveries("ann@example.com", "step 1 sent", |r| {
            r.len() == 3 && r[0].state == "sent"
        })
        .await;
    let sent = rows[0].sent_at.expect("sent_at");
    wait_until("the window has passed", DEADLINE, || async {
        Utc::now() > sent + TimeDelta::milliseconds(1500)
    })
    .await;
    app.post_event(&event("order.completed", "ann@example.com")).await;
    wait_until("the conversion is recorded", DEADLINE, || async {
        app.count("SELECT count(*) FROM conversions").await == 1
    })
    .await;
    assert_eq!(
        app.count("SELECT count(*) FROM conversions WHERE delivery_id IS NULL")
            .await,
        1
    );
    // The purchase still ends the sequence.
    let rows = app.deliveries("ann@example.com").await;
    assert_eq!(rows[1].reason.as_deref(), Some("converted"));
    app.stop().await;
}

#[tokio::test]
async fn built_in_campaigns_are_installed_inactive_once_and_never_overwrite_edits() {
    let app = TestApp::spawn().await;
    let pool = leadflow_shared::db::pool(&app.config.database).unwrap();
    let first = leadflow::defaults::install(&pool).await.unwrap();
    assert_eq!(first.campaigns.len(), 3);
    assert_eq!(first.templates.len(), 6);
    assert_eq!(
        app.count("SELECT count(*) FROM campaigns WHERE name LIKE 'default-%' AND status = 'inactive'")
            .await,
        3
    );
    let client = app.db().await;
    client
        .execute(
            "UPDATE templates SET subject = 'Edited', version = version + 1
             WHERE name = 'default-checkout-abandoned' AND language = 'en'",
            &[],
        )
        .await
        .unwrap();
    let again = leadflow::defaults::install(&pool).await.unwrap();
    assert!(again.campaigns.is_empty() && again.templates.is_empty());
    let subject: String = client
        .query_one(
            "SELECT subject FROM templates WHERE name = 'default-checkout-abandoned' AND language = 'en'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(subject, "Edited");

    // Switched on (with short delays for the test), a German lead gets the German default template.
    only_the_campaign_under_test(&app).await;
    apply_yaml(
        &app,
        "name: default-checkout-abandoned\nlead_source: checkout.abandoned\nuse_default_template: true\n\
         steps: [{ delay: 1s }, { delay: 1s, discount: 10 }]\n",
    )
    .await
    .unwrap();
    let mut german = event("checkout.abandoned", "jonas@example.de");
    german["data"]["language"] = json!("de");
    app.post_event(&german).await;
    let mails = app.smtp.wait_for_to("jonas@example.de", 2, DEADLINE).await;
    let subjects: Vec<String> = mails.iter().map(|m| m.subject().unwrap_or_default()).collect();
    assert!(subjects.iter().any(|s| s.contains("10 % Rabatt")), "{subjects:?}");
    app.stop().await;
}

#[tokio::test]
async fn stats_show_targeted_sent_converted_and_value_per_step() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    app.post_event(&event("checkout.abandoned", "ann@example.com")).await;
    app.post_event(&event("checkout.abandoned", "bob@example.com")).await;
    app.smtp.wait_for_to("ann@example.com", 1, DEADLINE).await;
    app.smtp.wait_for_to("bob@example.com", 1, DEADLINE).await;
    let mut order = event("order.completed", "ann@example.com");
    order["data"]["amount"] = json!(120.5);
    order["data"]["currency"] = json!("EUR");
    app.post_event(&order).await;
    wait_until("the conversion is recorded", DEADLINE, || async {
        app.count("SELECT count(*) FROM conversions").await == 1
    })
    .await;

    let client = app.db().await;
    let stats = leadflow_scheduler::stats::campaign_stats(&client).await.unwrap();
    let overall = stats
        .iter()
        .find(|s| s.campaign == "cart-recovery" && s.step.is_none())
        .expect("an overall line");
    assert_eq!(overall.targeted, 2);
    assert_eq!(overall.conversions, 1);
    assert!((overall.conversion_rate - 0.5).abs() < 1e-9);
    assert_eq!(overall.value, vec!["EUR 120.50".to_string()]);
    let step1 = stats
        .iter()
        .find(|s| s.campaign == "cart-recovery" && s.step == Some(1))
        .unwrap();
    assert_eq!((step1.targeted, step1.sent, step1.conversions), (2, 2, 1));
    let step2 = stats
        .iter()
        .find(|s| s.campaign == "cart-recovery" && s.step == Some(2))
        .unwrap();
    assert_eq!(step2.cancelled, 1, "ann's step 2 ended with her purchase");
    let table = leadflow_scheduler::stats::table(&stats);
    assert!(table.contains("EUR 120.50"), "{table}");
    app.stop().await;
}

#[tokio::test]
async fn each_outside_exit_ends_the_sequence_with_its_reason() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    let exits = [
        ("lead.unsubscribed", "unsubscribed", "u@example.com"),
        ("email.bounced", "bounced", "b@example.com"),
        ("email.complained", "complained", "c@example.com"),
        ("lead.suspended", "suspended", "s@example.com"),
    ];
    for (_, _, email) in exits {
        app.post_event(&event("checkout.abandoned", email)).await;
    }
    for (_, _, email) in exits {
        app.smtp.wait_for_to(email, 1, DEADLINE).await;
    }
    for (event_type, _, email) in exits {
        app.post_event(&event(event_type, email)).await;
    }
    for (_, reason, email) in exits {
        let rows = app
            .wait_for_deliveries(email, "the open steps are cancelled", |r| {
                r.len() == 3 && r[1].state == "cancelled" && r[2].state == "cancelled"
            })
            .await;
        assert_eq!(rows[1].reason.as_deref(), Some(reason), "{email}: {rows:#?}");
        let client = app.db().await;
        let suppressed: Option<String> = client
            .query_one("SELECT suppressed_reason FROM leads WHERE email = $1", &[&email])
            .await
            .unwrap()
            .get(0);
        assert_eq!(suppressed.as_deref(), Some(reason));
        // On the suppression list too, like an unsubscribe from the page or a bounce report.
        let listed: i64 = client
            .query_one(
                "SELECT count(*) FROM suppressions WHERE email = $1 AND reason = $2 AND campaign_id IS NULL",
                &[&email, &reason],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(listed, 1, "{email} is not on the suppression list");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_lead_suppressed_after_rendering_is_checked_again_right_before_send() {
    use leadflow::Component;
    let app = TestApp::spawn_with(&[Component::Ingest, Component::Scheduler, Component::Renderer], &[]).await;
    app.post_event(&event("checkout.abandoned", "ann@example.com")).await;
    app.wait_for_deliveries("ann@example.com", "step 1 rendered", |r| {
        r.len() == 3 && r[0].state == "rendered"
    })
    .await;
    // Suppressed without the sequence being ended: only the sender's own check stands between the lead and SMTP.
    app.db()
        .await
        .execute(
            "UPDATE leads SET suppressed_reason = 'suspended', suppressed_at = now() WHERE email = 'ann@example.com'",
            &[],
        )
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let sender = leadflow::start(app.config.clone(), &[Component::Sender], listener, shutdown)
        .await
        .expect("start a sender");
    let rows = app
        .wait_for_deliveries("ann@example.com", "step 1 cancelled by the sender", |r| {
            r[0].state == "cancelled"
        })
        .await;
    assert_eq!(rows[0].reason.as_deref(), Some("suspended"), "{rows:#?}");
    assert!(app.smtp.messages().is_empty(), "a suppressed lead must not be mailed");
    sender.stop().await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn campaign_results_are_exported_as_prometheus_metrics() {
    let app = TestApp::spawn().await;
    app.post_event(&event("checkout.abandoned", "ann@example.com")).await;
    app.smtp.wait_for_to("ann@example.com", 1, DEADLINE).await;
    // The scheduler refreshes the gauges every 15 s; refresh now instead of waiting.
    let ctx = leadflow_shared::service::Context::connect(app.config.clone(), "test")
        .await
        .unwrap();
    leadflow_scheduler::results::refresh(&ctx).await.unwrap();
    let body = app.get("/metrics").await.text().await.unwrap();
    let line = body
        .lines()
        .find(|l| {
            l.starts_with("leadflow_campaign_sent{")
                && l.contains("campaign=\"cart-recovery\"")
                && l.contains("step=\"1\"")
        })
        .unwrap_or_else(|| panic!("no sent gauge for cart-recovery step 1 in:\n{body}"));
    let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value >= 1.0, "{line}");
    assert!(body.contains("leadflow_campaign_targeted{"), "{body}");
    assert!(
        !body.contains("leadflow_variant_sent{campaign=\"cart-recovery\""),
        "a campaign without a test has no variant lines"
    );

    // A campaign running an A/B test reports per variant.
    apply_yaml(
        &app,
        "name: split\nlead_source: trial.started\nvariants:\n  - { name: A, steps: [{ delay: 1s, template: cart-reminder }] }\n  - { name: B, steps: [{ delay: 1s, template: cart-reminder }] }\n",
    )
    .await
    .expect("apply");
    app.post_event(&event("trial.started", "bob@example.com")).await;
    app.smtp.wait_for_to("bob@example.com", 1, DEADLINE).await;
    leadflow_scheduler::results::refresh(&ctx).await.unwrap();
    let body = app.get("/metrics").await.text().await.unwrap();
    let variant_lines: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with("leadflow_variant_targeted{") && l.contains("campaign=\"split\""))
        .collect();
    assert_eq!(variant_lines.len(), 2, "one line per variant of split in:\n{body}");
    app.stop().await;
}

#[tokio::test]
async fn a_campaign_bcc_receives_a_copy_without_the_lead_seeing_it() {
    let app = TestApp::spawn().await;
    only_the_campaign_under_test(&app).await;
    apply_yaml(
        &app,
        "name: with-bcc\nlead_source: checkout.abandoned\nbcc: sales@shop.example\n\
         steps: [{ delay: 1s, template: cart-reminder }]\n",
    )
    .await
    .expect("apply");
    app.post_event(&event("checkout.abandoned", "ann@example.com")).await;
    let mails = app.smtp.wait_for(1, DEADLINE).await;
    let mut rcpt: Vec<String> = mails[0].rcpt_to.iter().map(|r| r.to_lowercase()).collect();
    rcpt.sort();
    assert_eq!(rcpt, vec!["ann@example.com", "sales@shop.example"]);
    assert!(mails[0].header("bcc").is_none(), "the BCC must not be a visible header");
    app.stop().await;
}
