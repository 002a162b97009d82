//! Consent end to end: the unsubscribe link of a real email (a page on GET, an unsubscribe on POST, per campaign
//! or everywhere), forged and altered tokens, the suppression list over the admin API and the command line
//! (list, add, resubscribe with a reason, import), and a lead's export and erasure.

use std::path::PathBuf;

use reqwest::header::CONTENT_TYPE;
use reqwest::Method;
use serde_json::{json, Value};

use leadflow::api::keys::{self, ExposeSecret as _, Scope};
use leadflow::Component;
use leadflow_shared::domain::EmailAddress;
use leadflow_shared::suppression::email_hash;
use leadflow_shared::tokens::{Keyring, Purpose};
use leadflow_tests::{event, wait_until, Answer, ApiClient as Admin, Captured, TestApp, DEADLINE};

/// The leadflow command, built for the tests.
const LEADFLOW: &str = env!("CARGO_BIN_EXE_leadflow-under-test");

/// GET of a public page (no key).
async fn get_page(app: &TestApp, path: &str) -> Answer {
    let response = reqwest::Client::new()
        .get(app.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path} failed: {e}"));
    Answer::read(response).await
}

/// POST of a form to a public page (no key), as a mail client or the page's button does.
async fn post_form(app: &TestApp, path: &str, form: &str) -> Answer {
    let response = reqwest::Client::new()
        .post(app.url(path))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(form.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path} failed: {e}"));
    Answer::read(response).await
}

/// The token of an unsubscribe URL (`.../u/<token>`).
fn token_of(url: &str) -> String {
    let (_, rest) = url
        .split_once("/u/")
        .unwrap_or_else(|| panic!("{url} is not an unsubscribe link"));
    rest.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .collect()
}

/// The unsubscribe link of an email: from its `List-Unsubscribe` header when it has one (checked against the body),
/// else from the link in its text body. Both must be the link the token convention gives for the delivery.
fn unsubscribe_path(app: &TestApp, message: &Captured) -> String {
    let delivery = message
        .delivery_id()
        .unwrap_or_else(|| panic!("no X-Leadflow-Delivery header: {message}"));
    let expected = app
        .config
        .mail
        .keyring
        .sign(Purpose::Unsubscribe, &format!("d:{delivery}"));
    let text = message.text_body().unwrap_or_else(|| panic!("no text part: {message}"));
    let line = text
        .lines()
        .find(|l| l.contains("/u/"))
        .unwrap_or_else(|| panic!("the text body has no unsubscribe link:\n{text}"));
    assert_eq!(
        token_of(line),
        expected,
        "the body's link is not the delivery's: {line}"
    );
    assert!(
        line.contains(&format!("{}/u/", app.config.mail.public_url)),
        "the link is not under the public URL: {line}"
    );
    let html = message.html_body().unwrap_or_default();
    assert!(html.contains(&expected), "the HTML body lacks the link:\n{html}");
    if let Some(header) = message.header("List-Unsubscribe") {
        let https = header
            .split(',')
            .map(|p| p.trim().trim_start_matches('<').trim_end_matches('>'))
            .find(|p| p.starts_with("http"))
            .unwrap_or_else(|| panic!("List-Unsubscribe has no web link: {header}"));
        assert_eq!(token_of(https), expected, "List-Unsubscribe: {header}");
    }
    format!("/u/{expected}")
}

async fn wait_handled(app: &TestApp, events: i64) {
    wait_until("the scheduler handled every event", DEADLINE, || async {
        app.count("SELECT count(*) FROM events WHERE handled_at IS NOT NULL")
            .await
            >= events
    })
    .await;
}

async fn enrollments(app: &TestApp, email: &str, campaign: &str) -> i64 {
    app.db()
        .await
        .query_one(
            "SELECT count(*) FROM enrollments e JOIN leads l ON l.id = e.lead_id JOIN campaigns c ON c.id = e.campaign_id
              WHERE l.email = $1 AND c.name = $2",
            &[&email, &campaign],
        )
        .await
        .unwrap_or_else(|e| panic!("count enrollments: {e}"))
        .get(0)
}

/// (reason, source, email, campaign name) of every suppression of `email`, by hash.
async fn suppressions_of(app: &TestApp, email: &str) -> Vec<(String, String, Option<String>, Option<String>)> {
    let hash = hash_of(email);
    app.db()
        .await
        .query(
            "SELECT s.reason, s.source, s.email, c.name FROM suppressions s LEFT JOIN campaigns c ON c.id = s.campaign_id
              WHERE s.email_hash = $1 ORDER BY s.id",
            &[&hash],
        )
        .await
        .unwrap_or_else(|e| panic!("read suppressions: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

fn hash_of(email: &str) -> String {
    email_hash(&EmailAddress::parse(email).unwrap_or_else(|e| panic!("{email}: {e}")))
}

fn checkout(email: &str, checkout_id: &str) -> Value {
    let mut e = event("checkout.abandoned", email);
    e["data"]["checkout_id"] = json!(checkout_id);
    e
}

/// Writes a campaign file to a fresh folder and applies it.
async fn apply_yaml(app: &TestApp, yaml: &str) {
    let dir = std::env::temp_dir().join(format!("leadflow-consent-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let file: PathBuf = dir.join("campaign.yaml");
    std::fs::write(&file, yaml).unwrap_or_else(|e| panic!("write: {e}"));
    let pool = leadflow_shared::db::pool(&app.config.database).unwrap_or_else(|e| panic!("pool: {e:#}"));
    let result = leadflow::apply::apply_path(&pool, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result.unwrap_or_else(|e| panic!("apply: {e:#}"));
}

#[tokio::test]
async fn the_link_in_an_email_shows_a_page_on_get_and_unsubscribes_at_once_on_one_click_post() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    let lead = "ann@example.com";
    app.post_event(&event("checkout.abandoned", lead)).await;
    let first = app.smtp.wait_for_to(lead, 1, DEADLINE).await;
    let path = unsubscribe_path(&app, &first[0]);
    // Notifications of the campaign go to an endpoint from now on (nobody listens; they stay queued).
    app.db()
        .await
        .execute(
            "UPDATE campaigns SET notify_url = 'http://127.0.0.1:9/hooks' WHERE name = 'cart-recovery'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("set notify_url: {e}"));

    // GET shows the page, twice, and changes nothing.
    for _ in 0..2 {
        let page = get_page(&app, &path).await;
        assert_eq!(page.status, 200, "{page:#?}");
        assert!(page.content_type.starts_with("text/html"), "{page:#?}");
        assert!(
            page.text().contains("Unsubscribe from cart-recovery"),
            "{}",
            page.text()
        );
        assert!(page.text().contains("Unsubscribe from all emails"), "{}", page.text());
        assert!(
            page.text().contains("name=\"scope\" value=\"campaign\""),
            "{}",
            page.text()
        );
        assert!(!page.text().contains(lead), "the page shows the address masked only");
    }
    assert_eq!(app.count("SELECT count(*) FROM suppressions").await, 0);
    let rows = app.deliveries(lead).await;
    assert_eq!(rows.len(), 3);
    assert_eq!(
        (rows[1].state.as_str(), rows[2].state.as_str()),
        ("pending", "pending"),
        "{rows:#?}"
    );

    // The one-click POST of a mail client unsubscribes at once: no background work to wait for.
    let done = post_form(&app, &path, "List-Unsubscribe=One-Click").await;
    assert_eq!(done.status, 200, "{done:#?}");
    assert!(done.text().contains("unsubscribed from all"), "{}", done.text());
    assert_eq!(
        suppressions_of(&app, lead).await,
        vec![(
            "unsubscribed".to_string(),
            "one-click".to_string(),
            Some(lead.to_string()),
            None
        )]
    );
    let rows = app.deliveries(lead).await;
    assert_eq!(rows[0].state, "sent");
    for row in &rows[1..] {
        assert_eq!(
            (row.state.as_str(), row.reason.as_deref()),
            ("cancelled", Some("unsubscribed")),
            "{rows:#?}"
        );
    }
    let lead_row = app
        .db()
        .await
        .query_one("SELECT suppressed_reason FROM leads WHERE email = $1", &[&lead])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(lead_row.get::<_, Option<String>>(0).as_deref(), Some("unsubscribed"));
    assert_eq!(
        app.count("SELECT count(*) FROM enrollments WHERE status = 'cancelled' AND reason = 'unsubscribed'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM notifications WHERE kind = 'unsubscribed'")
            .await,
        1,
        "the campaign's endpoint hears of the unsubscribe"
    );

    // Again: idempotent.
    post_form(&app, &path, "List-Unsubscribe=One-Click").await.expect(200);
    assert_eq!(suppressions_of(&app, lead).await.len(), 1);
    assert_eq!(
        app.count("SELECT count(*) FROM notifications WHERE kind = 'unsubscribed'")
            .await,
        1
    );
    let page = get_page(&app, &path).await;
    assert!(page.text().contains("unsubscribed from all"), "{}", page.text());
    assert!(
        !page.text().contains("<form"),
        "nothing left to choose: {}",
        page.text()
    );

    let metrics = app.get("/metrics").await.text().await.unwrap_or_default();
    assert!(
        metrics.contains("leadflow_api_unsubscribes_total{scope=\"all\"}"),
        "no unsubscribe metric in:\n{metrics}"
    );
    assert_eq!(app.smtp.messages_to(lead).len(), 1, "nothing more was sent");
    app.stop().await;
}

const SECOND_CAMPAIGN: &str = "
name: welcome-back
lead_source: checkout.abandoned
steps:
  - { delay: 1s, template: cart-reminder }
  - { delay: 60s, template: cart-discount, discount: 5 }
";

#[tokio::test]
async fn choosing_one_campaign_on_the_page_leaves_the_other_campaigns_going() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    apply_yaml(&app, SECOND_CAMPAIGN).await;
    let lead = "bea@example.com";
    app.post_event(&checkout(lead, "c-1")).await;
    let sent = app.smtp.wait_for_to(lead, 2, DEADLINE).await;
    let rows = app.deliveries(lead).await;
    let cart_recovery = sent
        .iter()
        .find(|m| {
            let id = m.delivery_id();
            rows.iter().any(|r| Some(r.id) == id && r.campaign == "cart-recovery")
        })
        .unwrap_or_else(|| panic!("no cart-recovery email among {sent:#?}"));
    let path = unsubscribe_path(&app, cart_recovery);

    let page = get_page(&app, &path).await;
    assert!(
        page.text().contains("Unsubscribe from cart-recovery"),
        "{}",
        page.text()
    );
    let done = post_form(&app, &path, "scope=campaign").await;
    assert_eq!(done.status, 200, "{done:#?}");
    assert!(
        done.text().contains("unsubscribed from cart-recovery"),
        "{}",
        done.text()
    );
    assert_eq!(
        suppressions_of(&app, lead).await,
        vec![(
            "unsubscribed".to_string(),
            "unsubscribe-page".to_string(),
            Some(lead.to_string()),
            Some("cart-recovery".to_string())
        )]
    );
    let rows = app.deliveries(lead).await;
    for row in &rows {
        match (row.campaign.as_str(), row.step) {
            (_, 1) => assert_eq!(row.state, "sent", "{rows:#?}"),
            ("cart-recovery", _) => {
                assert_eq!(
                    (row.state.as_str(), row.reason.as_deref()),
                    ("cancelled", Some("unsubscribed")),
                    "{rows:#?}"
                )
            }
            _ => assert_eq!(row.state, "pending", "the other campaign goes on: {rows:#?}"),
        }
    }
    let suppressed: Option<String> = app
        .db()
        .await
        .query_one("SELECT suppressed_reason FROM leads WHERE email = $1", &[&lead])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .get(0);
    assert_eq!(suppressed, None, "a campaign unsubscribe is not a global one");
    let page = get_page(&app, &path).await;
    assert!(
        page.text().contains("unsubscribed from cart-recovery already"),
        "{}",
        page.text()
    );
    assert!(page.text().contains("Unsubscribe from all emails"), "{}", page.text());

    // Another abandoned checkout: enrolled in the other campaign only.
    app.post_event(&checkout(lead, "c-2")).await;
    wait_handled(&app, 2).await;
    assert_eq!(enrollments(&app, lead, "welcome-back").await, 2);
    assert_eq!(enrollments(&app, lead, "cart-recovery").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn forged_and_altered_tokens_get_a_404_page_and_change_nothing() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    let lead = "cyd@example.com";
    app.post_event(&event("checkout.abandoned", lead)).await;
    let rows = app
        .wait_for_deliveries(lead, "three deliveries exist", |r| r.len() == 3)
        .await;
    let ring = &app.config.mail.keyring;
    let valid = ring.sign(Purpose::Unsubscribe, &format!("d:{}", rows[0].id));
    let other = ring.sign(Purpose::Unsubscribe, &format!("d:{}", rows[1].id));
    let parts: Vec<&str> = valid.split('.').collect();
    let other_parts: Vec<&str> = other.split('.').collect();
    let mut flipped = valid.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    let foreign = Keyring::parse("t1:another-key-0123456789abcdef0123456789abcdef")
        .unwrap_or_else(|e| panic!("{e}"))
        .sign(Purpose::Unsubscribe, &format!("d:{}", rows[0].id));
    let tokens = [
        // Another delivery's payload with this one's MAC.
        format!("{}.{}.{}", parts[0], other_parts[1], parts[2]),
        String::from_utf8(flipped).unwrap_or_default(),
        foreign,
        ring.sign(Purpose::Bounce, &format!("d:{}", rows[0].id)),
        ring.sign(Purpose::Unsubscribe, "d:999999"),
        "t1.ZDox.AAAAAAAAAAAAAAAAAAAAAA".to_string(),
        "nonsense".to_string(),
    ];
    for token in &tokens {
        let path = format!("/u/{token}");
        for answer in [
            get_page(&app, &path).await,
            post_form(&app, &path, "List-Unsubscribe=One-Click").await,
        ] {
            assert_eq!(answer.status, 404, "{token}: {answer:#?}");
            assert!(answer.content_type.starts_with("text/html"), "{answer:#?}");
            assert!(
                !answer.text().contains("cyd"),
                "a refused token reveals nothing: {}",
                answer.text()
            );
            assert!(!answer.text().contains("cart-recovery"), "{}", answer.text());
        }
        post_form(&app, &path, "scope=campaign").await.expect(404);
    }
    assert_eq!(app.count("SELECT count(*) FROM suppressions").await, 0);
    assert_eq!(
        app.count("SELECT count(*) FROM deliveries WHERE state = 'cancelled'")
            .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM leads WHERE suppressed_reason IS NOT NULL")
            .await,
        0
    );
    // The genuine token still works.
    let path = format!("/u/{valid}");
    get_page(&app, &path).await.expect(200);
    app.stop().await;
}

#[tokio::test]
async fn a_suppressed_address_that_is_not_a_lead_is_never_enrolled() {
    let app = TestApp::spawn().await;
    let writer = Admin::named(&app, "crm-sync", Scope::Write).await;
    let reader = Admin::named(&app, "dashboard", Scope::Read).await;
    let ghost = "ghost@example.com";

    reader
        .post("/v1/admin/suppressions", &json!({"email": ghost, "reason": "manual"}))
        .await
        .expect(403);
    writer
        .post("/v1/admin/suppressions", &json!({"email": "nope", "reason": "manual"}))
        .await
        .problem(400, "email");
    writer
        .post("/v1/admin/suppressions", &json!({"email": ghost, "reason": "erased"}))
        .await
        .problem(400, "reason");
    writer
        .post("/v1/admin/suppressions", &json!({"email": ghost}))
        .await
        .problem(400, "reason");
    writer
        .post("/v1/admin/suppressions", &json!({"reason": "manual"}))
        .await
        .problem(400, "email");
    writer
        .post(
            "/v1/admin/suppressions",
            &json!({"email": ghost, "reason": "manual", "campaign": "no-such"}),
        )
        .await
        .problem(400, "campaign");
    writer
        .post(
            "/v1/admin/suppressions",
            &json!({"email": ghost, "reason": "manual", "colour": 1}),
        )
        .await
        .problem(400, "colour");

    let added = writer
        .post(
            "/v1/admin/suppressions",
            &json!({"email": "Ghost@Example.com", "reason": "complained", "note": "asked by phone"}),
        )
        .await
        .expect(201);
    assert_eq!(added["new"], json!(true));
    assert_eq!(added["entry"]["email"], json!(ghost));
    assert_eq!(added["entry"]["reason"], json!("complained"));
    assert_eq!(added["entry"]["source"], json!("api"));
    let again = writer
        .post("/v1/admin/suppressions", &json!({"email": ghost, "reason": "manual"}))
        .await
        .expect(200);
    assert_eq!(again["new"], json!(false));
    assert_eq!(
        app.count("SELECT count(*) FROM leads").await,
        0,
        "suppressing makes nobody a lead"
    );

    let listed = reader
        .get(&format!("/v1/admin/suppressions?email={ghost}"))
        .await
        .expect(200);
    let items = listed["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{listed}");
    assert_eq!(items[0]["email"], json!(ghost));
    assert_eq!(items[0]["email_hash"], json!(hash_of(ghost)));
    assert_eq!(items[0]["note"], json!("asked by phone"));

    app.post_event(&event("checkout.abandoned", ghost)).await;
    app.post_event(&event("trial.started", ghost)).await;
    wait_handled(&app, 2).await;
    assert_eq!(app.count("SELECT count(*) FROM enrollments").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM deliveries").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn resubscribing_needs_a_reason_is_logged_and_lets_the_lead_be_enrolled_again() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    let writer = Admin::named(&app, "crm-sync", Scope::Write).await;
    let admin = Admin::named(&app, "privacy-officer", Scope::Admin).await;
    let lead = "dora@example.com";

    // Unsubscribed through the page of her first email.
    app.post_event(&checkout(lead, "c-1")).await;
    let first = app.smtp.wait_for_to(lead, 1, DEADLINE).await;
    let path = unsubscribe_path(&app, &first[0]);
    post_form(&app, &path, "scope=all").await.expect(200);
    app.post_event(&checkout(lead, "c-2")).await;
    wait_handled(&app, 2).await;
    assert_eq!(
        enrollments(&app, lead, "cart-recovery").await,
        1,
        "a suppressed lead is not enrolled"
    );

    let target = format!("/v1/admin/suppressions/{lead}");
    admin.delete(&target).await.problem(400, "reason");
    admin
        .delete_with(&target, &json!({"reason": "  "}))
        .await
        .problem(400, "reason");
    writer
        .delete_with(&target, &json!({"reason": "she asked"}))
        .await
        .expect(403);
    admin
        .delete_with("/v1/admin/suppressions/nobody@example.com", &json!({"reason": "x"}))
        .await
        .expect(404);
    let done = admin
        .delete_with(
            &target,
            &json!({"reason": "asked to resubscribe by email on 2024-05-02"}),
        )
        .await
        .expect(200);
    assert_eq!(done["resubscribed"], json!(true));
    assert!(suppressions_of(&app, lead).await.is_empty());
    let log = app
        .db()
        .await
        .query(
            "SELECT action, reason, actor FROM suppression_log WHERE email_hash = $1 ORDER BY id",
            &[&hash_of(lead)],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let log: Vec<(String, String, String)> = log.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(
        log,
        vec![
            ("suppressed".into(), "unsubscribed".into(), "unsubscribe-page".into()),
            (
                "resubscribed".into(),
                "asked to resubscribe by email on 2024-05-02".into(),
                "privacy-officer".into()
            ),
        ]
    );
    admin
        .delete_with(&target, &json!({"reason": "again"}))
        .await
        .expect(404);

    app.post_event(&checkout(lead, "c-3")).await;
    wait_handled(&app, 3).await;
    assert_eq!(enrollments(&app, lead, "cart-recovery").await, 2, "enrolled again");
    app.smtp.wait_for_to(lead, 2, DEADLINE).await;
    app.stop().await;
}

#[tokio::test]
async fn an_import_reports_bad_lines_by_number_and_applies_the_good_ones() {
    let app = TestApp::spawn_with(&[Component::Api], &[]).await;
    let writer = Admin::named(&app, "importer", Scope::Write).await;
    let csv = "email,reason,note\n\
               a@example.com\n\
               b@example.com,bounced,from the old system\n\
               not-an-address\n\
               c@example.com,whatever\n\
               \n\
               # a comment\n\
               d@example.com,complained,\"note, with a comma\"\n";
    let report = writer
        .send(
            Method::POST,
            "/v1/admin/suppressions/import",
            Some("text/csv"),
            Some(csv.to_string().into_bytes()),
        )
        .await
        .expect(200);
    assert_eq!(report["added"], json!(3), "{report}");
    let rejected: Vec<i64> = report["rejected"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|r| r["line"].as_i64())
        .collect();
    assert_eq!(rejected, vec![4, 5], "{report}");
    assert!(
        report["rejected"][1]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("reason"),
        "{report}"
    );
    assert_eq!(
        suppressions_of(&app, "d@example.com").await,
        vec![("complained".into(), "import".into(), Some("d@example.com".into()), None)]
    );
    let again = writer
        .send(
            Method::POST,
            "/v1/admin/suppressions/import",
            Some("text/csv"),
            Some("a@example.com\n".into()),
        )
        .await
        .expect(200);
    assert_eq!((again["added"].clone(), again["already"].clone()), (json!(0), json!(1)));
    let wrong_type = writer
        .send(
            Method::POST,
            "/v1/admin/suppressions/import",
            Some("application/json"),
            Some("[]".into()),
        )
        .await;
    assert_eq!(wrong_type.status, 415, "{wrong_type:#?}");

    // Listing: newest first, by reason, page by page.
    let all = writer.get("/v1/admin/suppressions").await.expect(200);
    assert_eq!(all["items"].as_array().map(Vec::len), Some(3), "{all}");
    assert_eq!(all["items"][0]["email"], json!("d@example.com"));
    let bounced = writer.get("/v1/admin/suppressions?reason=bounced").await.expect(200);
    assert_eq!(bounced["items"].as_array().map(Vec::len), Some(1), "{bounced}");
    let page = writer.get("/v1/admin/suppressions?limit=2").await.expect(200);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2), "{page}");
    let next = page["next_after"]
        .as_i64()
        .unwrap_or_else(|| panic!("no next page: {page}"));
    let rest = writer
        .get(&format!("/v1/admin/suppressions?limit=2&after={next}"))
        .await
        .expect(200);
    assert_eq!(rest["items"].as_array().map(Vec::len), Some(1), "{rest}");
    assert_eq!(rest["next_after"], Value::Null);
    writer.get("/v1/admin/suppressions?limit=0").await.problem(400, "limit");
    writer.get("/v1/admin/suppressions?limit=x").await.problem(400, "limit");
    writer
        .get("/v1/admin/suppressions?reason=nope")
        .await
        .problem(400, "reason");
    writer
        .get("/v1/admin/suppressions?email=nope")
        .await
        .problem(400, "email");
    writer
        .get("/v1/admin/suppressions?colour=red")
        .await
        .problem(400, "colour");
    app.stop().await;
}

#[tokio::test]
async fn export_returns_the_lead_data_and_erasure_keeps_only_a_hashed_suppression() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    let admin = Admin::named(&app, "privacy-officer", Scope::Admin).await;
    let writer = Admin::named(&app, "crm-sync", Scope::Write).await;
    let lead = "erin@example.com";
    app.post_event(&event("checkout.abandoned", lead)).await;
    let first = app.smtp.wait_for_to(lead, 1, DEADLINE).await;
    let subject = first[0].subject().unwrap_or_default();
    app.wait_for_deliveries(lead, "step one is recorded sent", |r| {
        r.first().is_some_and(|d| d.state == "sent")
    })
    .await;

    writer.get(&format!("/v1/admin/leads/{lead}")).await.expect(403);
    admin.get("/v1/admin/leads/nobody@example.com").await.expect(404);
    admin.get("/v1/admin/leads/not-an-address").await.problem(400, "email");
    let data = admin.get(&format!("/v1/admin/leads/{lead}")).await.expect(200);
    assert_eq!(data["email"], json!(lead));
    assert_eq!(data["lead"]["email"], json!(lead));
    assert_eq!(data["lead"]["first_name"], json!("Ann"));
    assert_eq!(data["events"].as_array().map(Vec::len), Some(1), "{data}");
    assert_eq!(data["events"][0]["type"], json!("checkout.abandoned"));
    assert_eq!(data["enrollments"][0]["campaign"], json!("cart-recovery"));
    let deliveries = data["deliveries"].as_array().cloned().unwrap_or_default();
    assert_eq!(deliveries.len(), 3, "{data}");
    assert_eq!(deliveries[0]["state"], json!("sent"));
    assert_eq!(deliveries[0]["message"]["subject"], json!(subject));
    assert_eq!(data["suppressions"], json!([]));

    let erased = admin.delete(&format!("/v1/admin/leads/{lead}")).await.expect(200);
    assert_eq!(erased["lead_deleted"], json!(true), "{erased}");
    assert_eq!(erased["events"], json!(1));
    assert_eq!(erased["deliveries"], json!(3));
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 0);
    for table in ["events", "enrollments", "deliveries", "rendered_messages"] {
        assert_eq!(
            app.count(&format!("SELECT count(*) FROM {table}")).await,
            0,
            "{table} is emptied"
        );
    }
    assert_eq!(
        suppressions_of(&app, lead).await,
        vec![("erased".into(), "erasure".into(), None, None)]
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM suppressions WHERE email IS NOT NULL OR note LIKE '%{lead}%'"
        ))
        .await,
        0
    );
    let listed = admin
        .get(&format!("/v1/admin/suppressions?email={lead}"))
        .await
        .expect(200);
    assert_eq!(listed["items"][0]["email"], Value::Null, "{listed}");
    assert_eq!(listed["items"][0]["email_hash"], json!(hash_of(lead)));
    let export = admin.get(&format!("/v1/admin/leads/{lead}")).await.expect(200);
    assert_eq!(export["lead"], Value::Null, "{export}");

    // The address comes back in a new event: it is a lead again, but never enrolled or mailed.
    app.post_event(&event("checkout.abandoned", lead)).await;
    wait_handled(&app, 1).await;
    assert_eq!(app.count("SELECT count(*) FROM enrollments").await, 0);
    assert_eq!(
        app.smtp.messages_to(lead).len(),
        1,
        "only the email from before the erasure"
    );
    app.stop().await;
}

/// Runs `leadflow <args>` with the app's configuration; returns (success, stdout, stderr).
async fn leadflow(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    leadflow_as(app, None, args).await
}

/// Runs the `leadflow` command against the test's API, presenting `key` (the `leads` commands go through the API).
async fn leadflow_as(app: &TestApp, key: Option<&str>, args: &[&str]) -> (bool, String, String) {
    app.run_leadflow(LEADFLOW, key, args).await
}

#[tokio::test]
async fn the_command_line_adds_lists_imports_resubscribes_exports_and_erases() {
    let app = TestApp::spawn_with(&[Component::Api], &[]).await;
    let (ok, out, err) = leadflow(&app, &["suppressions", "add", "Fay@Example.com", "--reason", "bounced"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("suppressed fay@example.com"), "{out}");

    let file = std::env::temp_dir().join(format!("leadflow-import-{}.csv", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, "gil@example.com,unsubscribed\nbroken line\n").unwrap_or_else(|e| panic!("{e}"));
    let (ok, out, err) = leadflow(&app, &["suppressions", "import", &file.to_string_lossy()]).await;
    let _ = std::fs::remove_file(&file);
    assert!(!ok, "a rejected line fails the command: {out}{err}");
    assert!(out.contains("line 2:"), "{out}");
    assert!(out.contains("1 added"), "{out}");

    let (ok, out, err) = leadflow(&app, &["suppressions", "list", "--json"]).await;
    assert!(ok, "{err}");
    let page: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2), "{page}");

    let (ok, _, err) = leadflow(&app, &["suppressions", "remove", "fay@example.com"]).await;
    assert!(!ok && err.contains("--reason"), "a reason is required: {err}");
    let (ok, out, err) = leadflow(
        &app,
        &["suppressions", "remove", "fay@example.com", "--reason", "mailbox fixed"],
    )
    .await;
    assert!(ok, "{out}{err}");
    let actor: String = app
        .db()
        .await
        .query_one("SELECT actor FROM suppression_log WHERE action = 'resubscribed'", &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .get(0);
    assert!(actor.starts_with("cli"), "{actor}");

    let (ok, _, err) = leadflow(&app, &["leads", "export-data", "gil@example.com"]).await;
    assert!(!ok && err.contains("LEADFLOW_API_KEY"), "the API needs a key: {err}");
    let reader = keys::create(&app.db().await, "cli-reader", &[Scope::Read])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (ok, _, err) = leadflow_as(
        &app,
        Some(reader.key.expose_secret()),
        &["leads", "erase", "gil@example.com"],
    )
    .await;
    assert!(!ok && err.contains("403"), "erasure needs the admin scope: {err}");
    let admin = keys::create(&app.db().await, "cli-admin", &[Scope::Admin])
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let admin = admin.key.expose_secret();
    let (ok, out, err) = leadflow_as(&app, Some(admin), &["leads", "export-data", "gil@example.com"]).await;
    assert!(ok, "{err}");
    let data: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(data["lead"], Value::Null);
    assert_eq!(data["suppressions"][0]["reason"], json!("unsubscribed"));
    let (ok, out, err) = leadflow_as(&app, Some(admin), &["leads", "erase", "gil@example.com"]).await;
    assert!(ok, "{out}{err}");
    assert_eq!(
        suppressions_of(&app, "gil@example.com").await,
        vec![("erased".into(), "erasure".into(), None, None)]
    );
    app.stop().await;
}
