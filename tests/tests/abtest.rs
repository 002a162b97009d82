//! A/B tests against the real services: deterministic assignment by weight, every end criterion (conversions,
//! conversion rate, revenue in a currency, leads reached, end time), keeping the best variant, and the holdout
//! group with its lift in the variant report.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use leadflow_tests::{event, wait_until, TestApp, DEADLINE};

/// The leadflow command, built for the tests to run as a separate process.
const LEADFLOW: &str = env!("CARGO_BIN_EXE_leadflow-under-test");

/// Subjects of the base fixture templates for the test lead "Ann" buying "Trail Runner 2".
const REMINDER_SUBJECT: &str = "Ann, you left Trail Runner 2 in your cart";

fn discount_subject(percent: u8) -> String {
    format!("{percent}% off Trail Runner 2, Ann")
}

/// Writes `yaml` to a fresh folder and applies it to the app's database.
async fn apply_yaml(app: &TestApp, yaml: &str) {
    let dir = std::env::temp_dir().join(format!("leadflow-abtest-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let file: PathBuf = dir.join("campaign.yaml");
    std::fs::write(&file, yaml).unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
    let pool = leadflow_shared::db::pool(&app.config.database).unwrap_or_else(|e| panic!("pool: {e:#}"));
    let result = leadflow::apply::apply_path(&pool, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result.unwrap_or_else(|e| panic!("applying the campaign failed: {e:#}\n{yaml}"));
}

/// A campaign with variants A (the reminder, no discount) and B (the discount template at 20%), one step each.
fn campaign(name: &str, extra: &str) -> String {
    format!(
        "
name: {name}
lead_source: checkout.abandoned
{extra}
variants:
  - name: A
    steps: [{{ delay: 1s, template: cart-reminder }}]
  - name: B
    steps: [{{ delay: 1s, discount: 20, template: cart-discount }}]
"
    )
}

/// Applies the campaign under test and stops the base fixture campaign, so only the campaign under test enrolls.
async fn start_campaign(app: &TestApp, yaml: &str) {
    apply_yaml(app, yaml).await;
    let client = app.db().await;
    leadflow_scheduler::campaigns::set_status(&client, "cart-recovery", false)
        .await
        .unwrap_or_else(|e| panic!("deactivating cart-recovery failed: {e:#}"));
}

/// `n` leads named `<prefix>-<i>@example.com` abandon a checkout each (one batch); waits until all are enrolled.
async fn enroll(app: &TestApp, campaign: &str, prefix: &str, n: usize) -> Vec<String> {
    let emails: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}@example.com")).collect();
    let events: Vec<Value> = emails
        .iter()
        .map(|email| {
            let mut e = event("checkout.abandoned", email);
            e["data"]["checkout_id"] = json!(format!("c-{email}"));
            e
        })
        .collect();
    app.post_event(&Value::Array(events)).await;
    let client = app.db().await;
    wait_until(&format!("{n} {prefix} leads are enrolled"), DEADLINE, || async {
        let row = client
            .query_one(
                "SELECT count(*) FROM enrollments e JOIN leads l ON l.id = e.lead_id
                   JOIN campaigns c ON c.id = e.campaign_id
                  WHERE c.name = $1 AND l.email LIKE $2",
                &[&campaign, &format!("{prefix}-%")],
            )
            .await
            .unwrap_or_else(|e| panic!("counting enrollments failed: {e}"));
        row.get::<_, i64>(0) >= n as i64
    })
    .await;
    emails
}

/// Each lead's variant in `campaign` (`None`: in the holdout group).
async fn assignments(app: &TestApp, campaign: &str, emails: &[String]) -> BTreeMap<String, Option<String>> {
    let rows = app
        .db()
        .await
        .query(
            "SELECT l.email, e.variant, e.holdout FROM enrollments e JOIN leads l ON l.id = e.lead_id
               JOIN campaigns c ON c.id = e.campaign_id
              WHERE c.name = $1 AND l.email = ANY ($2)",
            &[&campaign, &emails],
        )
        .await
        .unwrap_or_else(|e| panic!("reading assignments failed: {e}"));
    rows.iter()
        .map(|r| {
            let holdout: bool = r.get(2);
            let variant: Option<String> = r.get(1);
            assert_eq!(
                holdout,
                variant.is_none(),
                "holdout leads, and only they, have no variant"
            );
            (r.get(0), variant)
        })
        .collect()
}

fn with_variant(assigned: &BTreeMap<String, Option<String>>, variant: &str) -> Vec<String> {
    assigned
        .iter()
        .filter(|(_, v)| v.as_deref() == Some(variant))
        .map(|(email, _)| email.clone())
        .collect()
}

/// Waits until the lead's follow-up was sent, then posts a purchase and waits until it is recorded as a
/// conversion (attributed to the follow-up's variant).
async fn buy(app: &TestApp, email: &str, amount: f64, currency: &str) {
    app.wait_for_deliveries(email, "the follow-up is sent", |d| d.iter().any(|r| r.state == "sent"))
        .await;
    purchase(app, email, amount, currency).await;
}

/// Posts a purchase by the lead and waits until it is recorded.
async fn purchase(app: &TestApp, email: &str, amount: f64, currency: &str) {
    let mut order = event("order.completed", email);
    order["data"]["amount"] = json!(amount);
    order["data"]["currency"] = json!(currency);
    order["data"]["checkout_id"] = json!(format!("c-{email}"));
    let id = order["id"].as_str().unwrap_or_default().to_string();
    app.post_event(&order).await;
    let client = app.db().await;
    wait_until(&format!("the purchase of {email} is recorded"), DEADLINE, || async {
        client
            .query_opt(
                "SELECT 1 FROM conversions c JOIN events e ON e.id = c.event_id WHERE e.event_id = $1",
                &[&id],
            )
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await;
}

/// The winner of the campaign's A/B test, once decided.
async fn winner(app: &TestApp, campaign: &str) -> Option<String> {
    app.db()
        .await
        .query_one(
            "SELECT ab_winner FROM campaigns WHERE name = $1 AND (ab_winner IS NULL) = (ab_ended_at IS NULL)",
            &[&campaign],
        )
        .await
        .unwrap_or_else(|e| panic!("reading the winner failed (or the end time is missing): {e}"))
        .get(0)
}

async fn wait_for_winner(app: &TestApp, campaign: &str) -> String {
    wait_until(
        &format!("the A/B test of {campaign} has a winner"),
        DEADLINE,
        || async { winner(app, campaign).await.is_some() },
    )
    .await;
    winner(app, campaign).await.unwrap_or_default()
}

/// The subject of the one message sent to `email`.
async fn subject_to(app: &TestApp, email: &str) -> String {
    let messages = app.smtp.wait_for_to(email, 1, DEADLINE).await;
    messages[0].subject().unwrap_or_default()
}

async fn report(app: &TestApp, campaign: &str) -> Vec<leadflow_scheduler::abtest::VariantStats> {
    leadflow_scheduler::abtest::variant_stats(&app.db().await)
        .await
        .unwrap_or_else(|e| panic!("the variant report failed: {e:#}"))
        .into_iter()
        .filter(|r| r.campaign == campaign)
        .collect()
}

#[tokio::test]
async fn leads_are_assigned_variants_by_weight_and_each_variant_sends_its_own_follow_up() {
    let app = TestApp::spawn().await;
    let yaml = campaign("ab-weights", "").replace("  - name: A\n", "  - name: A\n    weight: 3\n");
    start_campaign(&app, &yaml).await;
    let emails = enroll(&app, "ab-weights", "w", 40).await;
    let assigned = assignments(&app, "ab-weights", &emails).await;
    let (a, b) = (with_variant(&assigned, "A"), with_variant(&assigned, "B"));
    assert_eq!(a.len() + b.len(), 40, "{assigned:?}");
    assert!(
        a.len() > b.len() && !b.is_empty(),
        "weights 3:1 gave A {} and B {}",
        a.len(),
        b.len()
    );

    // The assignment is the stable function of lead and campaign: the same lead always gets the same variant.
    let client = app.db().await;
    let rows = client
        .query(
            "SELECT e.lead_id, e.campaign_id, e.variant FROM enrollments e JOIN campaigns c ON c.id = e.campaign_id
              WHERE c.name = 'ab-weights'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let weights = vec![("A".to_string(), 3), ("B".to_string(), 1)];
    for r in &rows {
        let expected = leadflow_scheduler::enroll::pick_variant(r.get(0), r.get(1), &weights);
        assert_eq!(expected, r.get::<_, Option<String>>(2));
    }

    for email in &a {
        assert_eq!(
            subject_to(&app, email).await,
            REMINDER_SUBJECT,
            "variant A lead {email}"
        );
    }
    for email in &b {
        assert_eq!(
            subject_to(&app, email).await,
            discount_subject(20),
            "variant B lead {email}"
        );
    }
    wait_until("every follow-up is sent", DEADLINE, || async {
        app.count("SELECT count(*) FROM deliveries WHERE state = 'sent'").await == 40
    })
    .await;
    let lines = report(&app, "ab-weights").await;
    let line = |v: &str| lines.iter().find(|l| l.variant == v && !l.holdout).cloned();
    let (la, lb) = (
        line("A").unwrap_or_else(|| panic!("{lines:?}")),
        line("B").unwrap_or_else(|| panic!("{lines:?}")),
    );
    assert_eq!((la.targeted, la.sent), (a.len() as i64, a.len() as i64));
    assert_eq!((lb.targeted, lb.sent), (b.len() as i64, b.len() as i64));
    assert!(lines.iter().all(|l| !l.holdout && !l.winner && l.converted == 0));
    app.stop().await;
}

#[tokio::test]
async fn the_first_variant_to_reach_n_conversions_wins_and_later_leads_receive_only_it() {
    let app = TestApp::spawn().await;
    let yaml = campaign("ab-count", "ab_test: { end: { conversions: 2 }, keep_best: true }");
    start_campaign(&app, &yaml).await;
    let emails = enroll(&app, "ab-count", "n", 12).await;
    let assigned = assignments(&app, "ab-count", &emails).await;
    let (a, b) = (with_variant(&assigned, "A"), with_variant(&assigned, "B"));
    assert!(a.len() >= 2 && b.len() >= 2, "{assigned:?}");

    // A converts once, B twice: B is first to two.
    buy(&app, &a[0], 30.0, "EUR").await;
    assert_eq!(winner(&app, "ab-count").await, None, "one conversion ends nothing");
    buy(&app, &b[0], 30.0, "EUR").await;
    buy(&app, &b[1], 30.0, "EUR").await;
    assert_eq!(wait_for_winner(&app, "ab-count").await, "B");

    // Later leads get only the winner.
    let later = enroll(&app, "ab-count", "later", 10).await;
    let assigned = assignments(&app, "ab-count", &later).await;
    assert!(assigned.values().all(|v| v.as_deref() == Some("B")), "{assigned:?}");
    for email in &later {
        assert_eq!(
            subject_to(&app, email).await,
            discount_subject(20),
            "later lead {email}"
        );
    }
    let lines = report(&app, "ab-count").await;
    let b_line = lines
        .iter()
        .find(|l| l.variant == "B")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert!(b_line.winner && b_line.converted == 2, "{b_line:?}");
    assert!(lines.iter().filter(|l| l.winner).count() == 1, "{lines:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_target_conversion_rate_ends_the_test_and_without_keep_best_later_leads_still_split() {
    let app = TestApp::spawn().await;
    let yaml = campaign(
        "ab-rate",
        "ab_test: { end: { conversion_rate: 0.5, min_leads: 3 }, keep_best: false }",
    );
    start_campaign(&app, &yaml).await;
    let emails = enroll(&app, "ab-rate", "r", 16).await;
    let assigned = assignments(&app, "ab-rate", &emails).await;
    let (a, b) = (with_variant(&assigned, "A"), with_variant(&assigned, "B"));
    assert!(a.len() >= 3 && b.len() >= 3, "{assigned:?}");

    // B converts half its leads; A none.
    let needed = b.len().div_ceil(2);
    for email in &b[..needed - 1] {
        buy(&app, email, 10.0, "EUR").await;
    }
    assert_eq!(winner(&app, "ab-rate").await, None, "B is below the target rate yet");
    buy(&app, &b[needed - 1], 10.0, "EUR").await;
    assert_eq!(wait_for_winner(&app, "ab-rate").await, "B");

    // Without keep_best, later leads are still split between the variants.
    let later = enroll(&app, "ab-rate", "later", 16).await;
    let assigned = assignments(&app, "ab-rate", &later).await;
    let (la, lb) = (with_variant(&assigned, "A"), with_variant(&assigned, "B"));
    assert!(!la.is_empty() && !lb.is_empty(), "{assigned:?}");
    assert_eq!(subject_to(&app, &la[0]).await, REMINDER_SUBJECT);
    assert_eq!(subject_to(&app, &lb[0]).await, discount_subject(20));
    assert_eq!(
        winner(&app, "ab-rate").await.as_deref(),
        Some("B"),
        "the winner stays decided"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_first_variant_to_reach_the_revenue_target_in_its_currency_wins() {
    let app = TestApp::spawn().await;
    let yaml = campaign("ab-revenue", "ab_test: { end: { revenue: 100, currency: EUR } }");
    start_campaign(&app, &yaml).await;
    let emails = enroll(&app, "ab-revenue", "v", 12).await;
    let assigned = assignments(&app, "ab-revenue", &emails).await;
    let (a, b) = (with_variant(&assigned, "A"), with_variant(&assigned, "B"));
    assert!(a.len() >= 2 && b.len() >= 2, "{assigned:?}");

    // A sells first and more, but in dollars: only euros count towards the target.
    buy(&app, &a[0], 500.0, "USD").await;
    buy(&app, &a[1], 60.0, "EUR").await;
    buy(&app, &b[0], 70.0, "EUR").await;
    assert_eq!(winner(&app, "ab-revenue").await, None, "nobody has 100 EUR yet");
    buy(&app, &b[1], 40.0, "EUR").await;
    assert_eq!(wait_for_winner(&app, "ab-revenue").await, "B");
    let lines = report(&app, "ab-revenue").await;
    let a_line = lines
        .iter()
        .find(|l| l.variant == "A")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(a_line.value, vec!["EUR 60.00".to_string(), "USD 500.00".to_string()]);
    app.stop().await;
}

#[tokio::test]
async fn reaching_the_number_of_leads_ends_the_test_and_the_best_rate_wins() {
    let app = TestApp::spawn().await;
    let yaml = campaign("ab-leads", "ab_test: { end: { leads: 14 } }");
    start_campaign(&app, &yaml).await;
    let emails = enroll(&app, "ab-leads", "l", 8).await;
    let assigned = assignments(&app, "ab-leads", &emails).await;
    let (first, variant) = assigned
        .iter()
        .find_map(|(email, v)| v.clone().map(|v| (email.clone(), v)))
        .unwrap_or_else(|| panic!("nobody was assigned a variant: {assigned:?}"));

    buy(&app, &first, 25.0, "EUR").await;
    assert_eq!(winner(&app, "ab-leads").await, None, "8 of 14 leads end nothing");
    enroll(&app, "ab-leads", "more", 6).await;
    assert_eq!(
        wait_for_winner(&app, "ab-leads").await,
        variant,
        "the only variant with a conversion"
    );
    app.stop().await;
}

#[tokio::test]
async fn when_the_end_time_passes_the_best_rate_wins() {
    let app = TestApp::spawn().await;
    start_campaign(
        &app,
        &campaign("ab-until", "ab_test: { end: { until: '2999-01-01T00:00:00Z' } }"),
    )
    .await;
    let emails = enroll(&app, "ab-until", "u", 8).await;
    let assigned = assignments(&app, "ab-until", &emails).await;
    let (first, variant) = assigned
        .iter()
        .find_map(|(email, v)| v.clone().map(|v| (email.clone(), v)))
        .unwrap_or_else(|| panic!("nobody was assigned a variant: {assigned:?}"));
    buy(&app, &first, 25.0, "EUR").await;
    assert_eq!(winner(&app, "ab-until").await, None, "the end time is far away");

    // The end time is moved to the past: the test ends at once.
    let past = (chrono::Utc::now() - chrono::TimeDelta::seconds(1)).to_rfc3339();
    apply_yaml(
        &app,
        &campaign("ab-until", &format!("ab_test: {{ end: {{ until: '{past}' }} }}")),
    )
    .await;
    assert_eq!(wait_for_winner(&app, "ab-until").await, variant);
    app.stop().await;
}

#[tokio::test]
async fn holdout_leads_receive_nothing_and_the_report_shows_the_lift() {
    let app = TestApp::spawn().await;
    start_campaign(&app, &campaign("ab-holdout", "holdout_percent: 50")).await;
    let emails = enroll(&app, "ab-holdout", "h", 24).await;
    let assigned = assignments(&app, "ab-holdout", &emails).await;
    let held: Vec<String> = assigned
        .iter()
        .filter(|(_, v)| v.is_none())
        .map(|(e, _)| e.clone())
        .collect();
    let treated: Vec<String> = assigned
        .iter()
        .filter(|(_, v)| v.is_some())
        .map(|(e, _)| e.clone())
        .collect();
    assert!(held.len() >= 2 && treated.len() >= 3, "{assigned:?}");

    // Every treated lead gets its follow-up; by then the held-out leads' would have been due long ago.
    for email in &treated {
        app.smtp.wait_for_to(email, 1, DEADLINE).await;
    }
    wait_until("every follow-up is sent", DEADLINE, || async {
        app.count("SELECT count(*) FROM deliveries WHERE state = 'sent'").await == treated.len() as i64
    })
    .await;
    for email in &held {
        assert!(app.smtp.messages_to(email).is_empty(), "held-out lead {email} got mail");
        assert!(
            app.deliveries(email).await.is_empty(),
            "held-out lead {email} has follow-ups"
        );
    }

    // One held-out lead buys anyway; two treated leads buy after their follow-up.
    purchase(&app, &held[0], 40.0, "EUR").await;
    buy(&app, &treated[0], 40.0, "EUR").await;
    buy(&app, &treated[1], 40.0, "EUR").await;

    let lines = report(&app, "ab-holdout").await;
    let h = lines
        .iter()
        .find(|l| l.holdout)
        .unwrap_or_else(|| panic!("no holdout line: {lines:?}"));
    assert_eq!((h.targeted, h.converted, h.sent), (held.len() as i64, 1, 0), "{h:?}");
    assert_eq!(h.value, vec!["EUR 40.00".to_string()]);
    let variants: Vec<_> = lines.iter().filter(|l| !l.holdout).collect();
    assert_eq!(variants.iter().map(|l| l.targeted).sum::<i64>(), treated.len() as i64);
    assert_eq!(variants.iter().map(|l| l.converted).sum::<i64>(), 2);
    let treated_rate = 2.0 / treated.len() as f64;
    let holdout_rate = 1.0 / held.len() as f64;
    let lift = h.lift.unwrap_or_else(|| panic!("no lift: {h:?}"));
    assert!((lift - (treated_rate - holdout_rate)).abs() < 1e-9, "{h:?}");
    let relative = h.relative_lift.unwrap_or_else(|| panic!("no relative lift: {h:?}"));
    assert!((relative - lift / holdout_rate).abs() < 1e-9, "{h:?}");
    assert!(h.ci_low <= holdout_rate && holdout_rate <= h.ci_high, "{h:?}");
    assert!(h.p_value.is_some(), "{h:?}");

    // The command line shows the same report.
    let printed = command_output(&app, &["stats", "--variants", "--json"]).await;
    let json: Value = serde_json::from_str(&printed).unwrap_or_else(|e| panic!("not JSON ({e}): {printed}"));
    let holdout_json = json
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["campaign"] == "ab-holdout" && r["holdout"] == true)
        })
        .unwrap_or_else(|| panic!("no holdout line in {json}"));
    assert_eq!(holdout_json["converted"], 1);
    let table = command_output(&app, &["stats", "--variants"]).await;
    assert!(
        table.contains("(holdout)") && table.contains("ab-holdout") && table.contains("pts"),
        "{table}"
    );
    app.stop().await;
}

/// Runs `leadflow <args>` with the app's configuration and returns what it printed.
async fn command_output(app: &TestApp, args: &[&str]) -> String {
    let mut command = tokio::process::Command::new(LEADFLOW);
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("LEADFLOW_") {
            command.env_remove(key);
        }
    }
    for (key, value) in app.env() {
        command.env(key, value);
    }
    let output = command
        .output()
        .await
        .unwrap_or_else(|e| panic!("running leadflow {args:?} failed: {e}"));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}
