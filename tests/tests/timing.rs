//! Send windows and the frequency cap against the real services: a follow-up outside its window waits for the
//! next window start in the lead's time zone, a capped lead's next follow-up waits about a period, and nothing
//! that waits is dropped.

use std::path::PathBuf;

use chrono::{DateTime, FixedOffset, SubsecRound, TimeDelta, Timelike, Utc};
use serde_json::{json, Value};

use leadflow_shared::settings::{self, FrequencyCap};
use leadflow_tests::{event, DeliveryRow, TestApp, DEADLINE};

/// Asia/Tokyo has kept UTC+9 without daylight saving since 1951: expected times can be worked out by hand.
const TOKYO: &str = "Asia/Tokyo";

fn tokyo() -> FixedOffset {
    FixedOffset::east_opt(9 * 3600).unwrap_or_else(|| panic!("UTC+9 is a valid offset"))
}

/// `t` cut to the whole minute: window bounds are `HH:MM`.
fn minute(t: DateTime<Utc>) -> DateTime<Utc> {
    let t = t.trunc_subsecs(0);
    t - TimeDelta::seconds(i64::from(t.second()))
}

/// The clock `HH:MM` at `t` in `offset`.
fn clock(t: DateTime<Utc>, offset: FixedOffset) -> String {
    t.with_timezone(&offset).format("%H:%M").to_string()
}

/// Writes `yaml` to a fresh folder and applies it to the app's database.
async fn apply_yaml(app: &TestApp, yaml: &str) {
    let dir = std::env::temp_dir().join(format!("leadflow-timing-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let file: PathBuf = dir.join("campaign.yaml");
    std::fs::write(&file, yaml).unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
    let pool = leadflow_shared::db::pool(&app.config.database).unwrap_or_else(|e| panic!("pool: {e:#}"));
    let applied = leadflow::apply::apply_path(&pool, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    applied.unwrap_or_else(|e| panic!("failed to apply {yaml}: {e:#}"));
}

/// The base campaign (three steps one second apart) with a send window.
async fn cart_recovery_with_window(app: &TestApp, start: &str, end: &str, timezone: Option<&str>) {
    let zone = timezone.map(|z| format!(", timezone: {z}")).unwrap_or_default();
    apply_yaml(
        app,
        &format!(
            "
name: cart-recovery
lead_source: checkout.abandoned
language: en
send_window: {{ start: '{start}', end: '{end}'{zone} }}
steps:
  - {{ delay: 1s, discount: 0, template: cart-reminder }}
  - {{ delay: 1s, discount: 10, template: cart-discount }}
  - {{ delay: 1s, discount: 15, template: cart-discount }}
"
        ),
    )
    .await;
}

fn checkout_in(email: &str, timezone: Option<&str>) -> Value {
    let mut e = event("checkout.abandoned", email);
    if let Some(tz) = timezone {
        e["data"]["timezone"] = json!(tz);
    }
    e
}

fn all_deferred(rows: &[DeliveryRow], n: usize, reason: &str) -> bool {
    rows.len() == n
        && rows
            .iter()
            .all(|r| r.state == "pending" && r.reason.as_deref() == Some(reason))
}

fn all_sent(rows: &[DeliveryRow], n: usize) -> bool {
    rows.len() == n && rows.iter().all(|r| r.state == "sent")
}

#[tokio::test]
async fn a_step_outside_its_window_waits_for_the_next_window_start_in_the_leads_time_zone() {
    let app = TestApp::spawn().await;
    // Opens two hours from now and closes two hours later, Tokyo time.
    let now = Utc::now();
    let start = minute(now + TimeDelta::hours(2));
    let end = start + TimeDelta::hours(2);
    cart_recovery_with_window(&app, &clock(start, tokyo()), &clock(end, tokyo()), Some(TOKYO)).await;
    app.post_event(&checkout_in("kenji@example.jp", Some(TOKYO))).await;

    let rows = app
        .wait_for_deliveries("kenji@example.jp", "all three steps wait for the window", |d| {
            all_deferred(d, 3, "deferred: send window")
        })
        .await;
    for row in &rows {
        assert_eq!(
            row.due_at, start,
            "step {} should wait for the window start: {rows:#?}",
            row.step
        );
        assert_eq!(row.sent_at, None, "{row:?}");
    }
    assert!(
        app.smtp.messages().is_empty(),
        "sent outside the window:\n{}",
        app.smtp.summary()
    );
    let active = app
        .count("SELECT count(*) FROM enrollments WHERE status = 'active'")
        .await;
    assert_eq!(active, 1, "the sequence must stay active while it waits");
    app.stop().await;
}

#[tokio::test]
async fn the_leads_own_time_zone_wins_over_the_campaigns() {
    let app = TestApp::spawn().await;
    // Open now in the campaign's zone (UTC): from an hour ago to an hour from now.
    let now = Utc::now();
    let start = minute(now - TimeDelta::hours(1));
    let end = minute(now + TimeDelta::hours(1));
    let utc = FixedOffset::east_opt(0).unwrap_or_else(|| panic!("UTC is a valid offset"));
    cart_recovery_with_window(&app, &clock(start, utc), &clock(end, utc), Some("UTC")).await;
    app.post_event(&checkout_in("kenji@example.jp", Some(TOKYO))).await;
    app.post_event(&checkout_in("ann@example.com", None)).await;
    app.post_event(&checkout_in("zed@example.com", Some("Mars/Olympus")))
        .await;

    // In Tokyo the clock is nine hours ahead: the window opens when it shows `start`, 15 hours after `start`.
    let rows = app
        .wait_for_deliveries("kenji@example.jp", "the Tokyo lead's steps wait", |d| {
            all_deferred(d, 3, "deferred: send window")
        })
        .await;
    let expected = start + TimeDelta::hours(15);
    for row in &rows {
        assert_eq!(row.due_at, expected, "Tokyo's window start: {rows:#?}");
    }
    // A lead without a zone, or with one that does not exist, gets the campaign's zone: open, sent.
    for email in ["ann@example.com", "zed@example.com"] {
        let rows = app
            .wait_for_deliveries(email, "the steps are sent in the campaign's window", |d| all_sent(d, 3))
            .await;
        assert!(rows.iter().all(|r| r.reason.is_none()), "{rows:#?}");
    }
    assert!(
        app.smtp.messages_to("kenji@example.jp").is_empty(),
        "{}",
        app.smtp.summary()
    );
    app.stop().await;
}

#[tokio::test]
async fn a_window_containing_now_sends_normally() {
    let app = TestApp::spawn().await;
    // Open now in Tokyo, the lead's zone; the campaign's own zone (UTC) would be closed.
    let now = Utc::now();
    let start = minute(now - TimeDelta::hours(1));
    let end = minute(now + TimeDelta::hours(1));
    cart_recovery_with_window(&app, &clock(start, tokyo()), &clock(end, tokyo()), None).await;
    app.post_event(&checkout_in("kenji@example.jp", Some(TOKYO))).await;

    app.smtp.wait_for_to("kenji@example.jp", 3, DEADLINE).await;
    let rows = app
        .wait_for_deliveries("kenji@example.jp", "all three steps are sent", |d| all_sent(d, 3))
        .await;
    for row in &rows {
        assert!(row.reason.is_none(), "{row:?}");
        let sent = row.sent_at.unwrap_or_else(|| panic!("sent without sent_at: {row:?}"));
        assert!(sent >= row.due_at, "{row:?}");
        assert!(sent - row.due_at < TimeDelta::seconds(20), "sent late: {row:?}");
    }
    app.stop().await;
}

const ONE_STEP_CAMPAIGNS: &str = "
campaigns:
  - name: cart-recovery
    lead_source: checkout.abandoned
    steps:
      - { delay: 1s, template: cart-reminder }
  - name: cart-second-look
    lead_source: checkout.abandoned
    steps:
      - { delay: 2s, discount: 10, template: cart-discount }
";

#[tokio::test]
async fn a_frequency_cap_of_one_a_day_lets_the_first_email_out_and_defers_the_other_by_a_day() {
    let app = TestApp::spawn().await;
    apply_yaml(&app, ONE_STEP_CAMPAIGNS).await;
    settings::set(&app.db().await, settings::FREQUENCY_CAP, "1/1d")
        .await
        .unwrap_or_else(|e| panic!("set frequency_cap: {e:#}"));
    app.post_event(&checkout_in("ann@example.com", None)).await;

    app.smtp.wait_for_to("ann@example.com", 1, DEADLINE).await;
    let rows = app
        .wait_for_deliveries(
            "ann@example.com",
            "one is sent and the other deferred by the cap",
            |d| {
                d.len() == 2
                    && d.iter().any(|r| r.state == "sent")
                    && d.iter()
                        .any(|r| r.state == "pending" && r.reason.as_deref() == Some("deferred: frequency cap"))
            },
        )
        .await;
    let first = rows
        .iter()
        .find(|r| r.state == "sent")
        .unwrap_or_else(|| panic!("{rows:#?}"));
    let other = rows
        .iter()
        .find(|r| r.state == "pending")
        .unwrap_or_else(|| panic!("{rows:#?}"));
    assert_eq!(first.campaign, "cart-recovery", "the earlier due goes first: {rows:#?}");
    assert_eq!(first.reason, None, "{rows:#?}");
    assert_eq!(other.campaign, "cart-second-look", "{rows:#?}");
    // Counted from when the first was claimed (in flight) or sent: a day after that.
    let sent = first
        .sent_at
        .unwrap_or_else(|| panic!("sent without sent_at: {first:?}"));
    let day = TimeDelta::days(1);
    assert!(
        other.due_at >= first.due_at + day && other.due_at <= sent + day,
        "the other should wait a day after the first: {rows:#?}"
    );
    assert_eq!(
        app.smtp.messages_to("ann@example.com").len(),
        1,
        "{}",
        app.smtp.summary()
    );
    let cancelled = app
        .count("SELECT count(*) FROM deliveries WHERE state = 'cancelled'")
        .await;
    assert_eq!(cancelled, 0, "a capped follow-up waits, it is never cancelled");
    app.stop().await;
}

#[tokio::test]
async fn frequency_cap_values_are_set_like_any_setting() {
    let app = TestApp::spawn().await;
    let client = app.db().await;
    assert_eq!(
        settings::frequency_cap(&client).await.ok(),
        Some(None),
        "off by default"
    );
    let listed = settings::all(&client)
        .await
        .unwrap_or_else(|e| panic!("settings: {e:#}"));
    assert!(
        listed.contains(&(settings::FREQUENCY_CAP.to_string(), json!("off"))),
        "{listed:?}"
    );

    let stored = settings::set(&client, "frequency_cap", "2/1d")
        .await
        .unwrap_or_else(|e| panic!("set 2/1d: {e:#}"));
    assert_eq!(stored, json!("2/1d"));
    let cap = settings::frequency_cap(&client)
        .await
        .unwrap_or_else(|e| panic!("read the cap: {e:#}"));
    assert_eq!(
        cap,
        Some(FrequencyCap {
            max: 2,
            per: std::time::Duration::from_secs(86_400)
        })
    );
    assert_eq!(
        settings::set(&client, "frequency_cap", "3/48h").await.ok(),
        Some(json!("3/2d"))
    );
    for bad in ["2", "0/1d", "2/soon", "on"] {
        let err = settings::set(&client, "frequency_cap", bad)
            .await
            .err()
            .unwrap_or_else(|| panic!("{bad:?} was accepted"));
        assert!(format!("{err:#}").contains("frequency_cap"), "{bad:?}: {err:#}");
    }
    assert_eq!(
        settings::frequency_cap(&client)
            .await
            .ok()
            .flatten()
            .map(|c| c.to_string()),
        Some("3/2d".to_string()),
        "a refused value leaves the cap as it was"
    );
    assert_eq!(
        settings::set(&client, "frequency_cap", "off").await.ok(),
        Some(json!("off"))
    );
    assert_eq!(settings::frequency_cap(&client).await.ok(), Some(None));
    drop(client);
    app.stop().await;
}
