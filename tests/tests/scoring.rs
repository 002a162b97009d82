//! Lead scoring against the real services: events go in through ingest and are scored by the scheduler, attribute
//! rules follow the profile, scores decay with the half-life (the sweep is stepped with a `now` of the test's
//! choosing), thresholds make a lead warm and hot, and rules are managed over the API and `leadflow apply -f`.

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{json, Value};

use leadflow::api::keys::Scope;
use leadflow_scheduler::scoring;
use leadflow_tests::{event, wait_until, ApiClient, TestApp, DEADLINE};

async fn admin(app: &TestApp) -> ApiClient {
    ApiClient::with_scope(app, Scope::Admin).await
}

/// (lead id, score, temperature, score_at) of the lead with `email`, if it exists.
async fn score_of(app: &TestApp, email: &str) -> Option<(i64, f64, String, Option<DateTime<Utc>>)> {
    app.db()
        .await
        .query_opt(
            "SELECT id, score, temperature, score_at FROM leads WHERE email = $1",
            &[&email],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to read the score of {email}: {e}"))
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
}

async fn wait_for_score(app: &TestApp, email: &str, score: f64) -> (i64, f64, String, Option<DateTime<Utc>>) {
    wait_until(&format!("{email} scores {score}"), DEADLINE, || async {
        score_of(app, email)
            .await
            .is_some_and(|(_, s, _, _)| (s - score).abs() < 1e-9)
    })
    .await;
    score_of(app, email).await.unwrap_or_else(|| panic!("{email} is gone"))
}

async fn wait_until_handled(app: &TestApp) {
    wait_until("every event is handled", DEADLINE, || async {
        app.count("SELECT count(*) FROM events WHERE handled_at IS NULL").await == 0
    })
    .await;
}

/// Every ledger row of a lead through the API, newest first, following the cursor with pages of `limit`.
async fn ledger(api: &ApiClient, lead_id: i64, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/leads/{lead_id}/score?limit={limit}&cursor={c}"),
            None => format!("/v1/leads/{lead_id}/score?limit={limit}"),
        };
        let page = api.get(&path).await.expect(200);
        let rows = page["ledger"]["items"].as_array().cloned().unwrap_or_default();
        assert!(rows.len() <= limit, "a page holds at most {limit}: {page}");
        items.extend(rows);
        match page["ledger"]["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return items,
        }
    }
}

/// Changes the lead's company size through the API (`PATCH /v1/leads/{id}`), which rescores it in the edit's
/// transaction.
async fn set_company_size(writer: &ApiClient, lead_id: i64, size: &str) {
    writer
        .patch(&format!("/v1/leads/{lead_id}"), &json!({ "company_size": size }))
        .await
        .expect(200);
}

fn pool(app: &TestApp) -> deadpool_postgres::Pool {
    leadflow_shared::db::pool(&app.config.database).unwrap_or_else(|e| panic!("no pool: {e:#}"))
}

#[tokio::test]
async fn an_event_rule_adds_its_points_once_even_when_the_same_event_is_posted_twice() {
    let app = TestApp::spawn().await;
    let api = admin(&app).await;
    api.post(
        "/v1/scoring/rules",
        &json!({"name": "trial", "event_type": "trial.started", "points": 12}),
    )
    .await
    .expect(201);

    let lead = "twice@example.com";
    let trial = event("trial.started", lead);
    app.post_event(&trial).await;
    app.post_event(&trial).await;
    wait_until_handled(&app).await;
    let (lead_id, score, temperature, _) = wait_for_score(&app, lead, 12.0).await;
    assert_eq!(temperature, "cold");
    assert_eq!(
        app.count(&format!("SELECT count(*) FROM score_ledger WHERE lead_id = {lead_id}"))
            .await,
        1
    );

    // The scheduler sees the event again (a redelivered message): the ledger's (event, rule) keeps it at one.
    let mut client = app.db().await;
    let event_row: i64 = client
        .query_one(
            "SELECT id FROM events WHERE lead_id = $1 AND type = 'trial.started'",
            &[&lead_id],
        )
        .await
        .unwrap_or_else(|e| panic!("no event row: {e}"))
        .get(0);
    let rules = scoring::EventScoring::load(&client)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let tx = client.transaction().await.unwrap_or_else(|e| panic!("{e}"));
    let again = rules
        .apply_event(&tx, event_row, Utc::now())
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    tx.commit().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.ledger_rows, 0, "{again:?}");
    assert_eq!(score_of(&app, lead).await.map(|s| s.1), Some(score));

    // Another trial event counts again.
    app.post_event(&event("trial.started", lead)).await;
    wait_for_score(&app, lead, 24.0).await;
}

#[tokio::test]
async fn engagement_makes_a_lead_warm_then_hot_and_the_hot_turn_is_an_event_and_a_notification() {
    let app = TestApp::spawn().await;
    let api = admin(&app).await;
    app.db()
        .await
        .execute(
            "UPDATE campaigns SET notify_url = 'http://127.0.0.1:9/hooks/leads' WHERE name = 'cart-recovery'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to set notify_url: {e}"));
    let settings = api
        .put("/v1/scoring/settings", &json!({"hot": 30, "warm": 15}))
        .await
        .expect(200);
    assert_eq!(settings["hot"], json!(30.0));
    assert_eq!(settings["warm"], json!(15.0));
    api.post(
        "/v1/scoring/rules",
        &json!({"name": "engaged", "event_type": "engagement.*", "points": 10}),
    )
    .await
    .expect(201);

    let lead = "warming@example.com";
    app.post_event(&event("checkout.abandoned", lead)).await; // enrolled in cart-recovery, which is notified
    wait_until_handled(&app).await;
    let (lead_id, ..) = score_of(&app, lead).await.unwrap_or_else(|| panic!("no lead"));
    assert_eq!(score_of(&app, lead).await.map(|s| s.2), Some("cold".into()));

    app.post_event(&event("engagement.page_viewed", lead)).await;
    assert_eq!(wait_for_score(&app, lead, 10.0).await.2, "cold");
    app.post_event(&event("engagement.email_clicked", lead)).await;
    assert_eq!(wait_for_score(&app, lead, 20.0).await.2, "warm");
    let hot_events = format!("SELECT count(*) FROM events WHERE lead_id = {lead_id} AND type = 'lead.hot'");
    assert_eq!(app.count(&hot_events).await, 0, "warm is not hot");
    app.post_event(&event("engagement.page_viewed", lead)).await;
    assert_eq!(wait_for_score(&app, lead, 30.0).await.2, "hot");

    let row = app
        .db()
        .await
        .query_one(
            "SELECT source, data, handled_at IS NOT NULL FROM events WHERE lead_id = $1 AND type = 'lead.hot'",
            &[&lead_id],
        )
        .await
        .unwrap_or_else(|e| panic!("no lead.hot event: {e}"));
    let (source, data, handled): (String, Value, bool) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(source, "leadflow");
    assert_eq!(data["score"], json!(30.0));
    assert_eq!(data["previous_temperature"], "warm");
    assert!(handled, "the scheduler must not act on its own lead.hot event");
    let notification = app
        .db()
        .await
        .query_one(
            "SELECT n.payload FROM notifications n JOIN campaigns c ON c.id = n.campaign_id
              WHERE n.kind = 'lead_hot' AND c.name = 'cart-recovery'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("no lead_hot notification: {e}"));
    let payload: Value = notification.get(0);
    assert_eq!(payload["kind"], "lead_hot");
    assert_eq!(payload["lead"]["email"], lead);
    assert_eq!(payload["score"], json!(30.0));

    // Staying hot is not becoming hot again.
    app.post_event(&event("engagement.page_viewed", lead)).await;
    wait_for_score(&app, lead, 40.0).await;
    assert_eq!(app.count(&hot_events).await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM notifications WHERE kind = 'lead_hot'")
            .await,
        1
    );
}

#[tokio::test]
async fn an_attribute_rule_holds_while_its_condition_does_and_is_withdrawn_when_it_stops() {
    let app = TestApp::spawn().await;
    let api = admin(&app).await;
    let lead = "company@example.com";
    app.post_event(&event("lead.captured", lead)).await;
    wait_until_handled(&app).await;
    let (lead_id, ..) = score_of(&app, lead).await.unwrap_or_else(|| panic!("no lead"));
    let writer = ApiClient::with_scope(&app, Scope::Write).await;

    // A rule made after the lead matched: the recompute gives its points.
    set_company_size(&writer, lead_id, "51-200").await;
    api.post(
        "/v1/scoring/rules",
        &json!({"name": "mid-size", "condition": {"field": "company_size", "op": "in", "value": ["51-200", "201-500"]},
                "points": 8}),
    )
    .await
    .expect(201);
    assert_eq!(
        score_of(&app, lead).await.map(|s| s.1),
        Some(0.0),
        "not before the recompute"
    );
    let done = api.post_empty("/v1/scoring/recompute").await.expect(200);
    assert_eq!(done["changed"], 1, "{done}");
    assert!(done["leads"].as_u64().is_some_and(|n| n >= 1), "{done}");
    wait_for_score(&app, lead, 8.0).await;
    let again = api.post_empty("/v1/scoring/recompute").await.expect(200);
    assert_eq!(again["changed"], 0, "a second recompute changes nothing: {again}");

    // Still holding after another change that keeps it: no second award.
    set_company_size(&writer, lead_id, "201-500").await;
    wait_for_score(&app, lead, 8.0).await;
    // The condition stops holding: the points are withdrawn.
    set_company_size(&writer, lead_id, "1-10").await;
    wait_for_score(&app, lead, 0.0).await;
    // And holds again.
    set_company_size(&writer, lead_id, "51-200").await;
    wait_for_score(&app, lead, 8.0).await;

    // Changing the rule adjusts the leads holding it; deactivating it withdraws the points.
    let mid_size = json!({"field": "company_size", "op": "in", "value": ["51-200", "201-500"]});
    api.put(
        "/v1/scoring/rules/mid-size",
        &json!({"condition": mid_size, "points": 10}),
    )
    .await
    .expect(200);
    wait_for_score(&app, lead, 10.0).await;
    api.put(
        "/v1/scoring/rules/mid-size",
        &json!({"condition": mid_size, "points": 10, "active": false}),
    )
    .await
    .expect(200);
    wait_for_score(&app, lead, 0.0).await;
    api.put(
        "/v1/scoring/rules/mid-size",
        &json!({"condition": mid_size, "points": 10}),
    )
    .await
    .expect(200);
    assert_eq!(
        score_of(&app, lead).await.map(|s| s.1),
        Some(0.0),
        "reactivated: given by the recompute"
    );
    api.post_empty("/v1/scoring/recompute").await.expect(200);
    wait_for_score(&app, lead, 10.0).await;

    // Deleting the rule withdraws its points from the leads holding it.
    api.delete("/v1/scoring/rules/mid-size").await.expect(204);
    wait_for_score(&app, lead, 0.0).await;

    let reasons: Vec<String> = ledger(&api, lead_id, 50)
        .await
        .iter()
        .map(|r| r["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(reasons.len(), 7, "{reasons:#?}");
    let expected: [&[&str]; 7] = [
        &["withdrawn", "deleted"],
        &["(+10)", "holds (by tests-admin)"],
        &["withdrawn", "deactivated"],
        &["changed from +8 to +10 points"],
        &["mid-size", "holds (by tests-write)"],
        &["withdrawn", "no longer holds"],
        &["mid-size", "company_size in"],
    ];
    for (reason, words) in reasons.iter().zip(expected) {
        assert!(words.iter().all(|w| reason.contains(w)), "{words:?} in {reasons:#?}");
    }
}

#[tokio::test]
async fn decay_halves_the_score_after_one_half_life_and_lowers_the_temperature() {
    let app = TestApp::spawn().await;
    let api = admin(&app).await;
    let settings = api
        .put("/v1/scoring/settings", &json!({"half_life": "30d"}))
        .await
        .expect(200);
    assert_eq!(settings, json!({"half_life": "30d", "hot": 50.0, "warm": 20.0}));
    api.post(
        "/v1/scoring/rules",
        &json!({"name": "pricing page", "event_type": "engagement.pricing_viewed", "points": 15}),
    )
    .await
    .expect(201);

    let lead = "fading@example.com";
    for _ in 0..4 {
        app.post_event(&event("engagement.pricing_viewed", lead)).await;
    }
    let (lead_id, _, temperature, score_at) = wait_for_score(&app, lead, 60.0).await;
    assert_eq!(temperature, "hot");
    let score_at = score_at.unwrap_or_else(|| panic!("a scored lead has a score_at"));

    let pool = pool(&app);
    let decayed = scoring::decay_once(&pool, score_at + TimeDelta::days(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(decayed, 1);
    let (_, score, temperature, _) = score_of(&app, lead).await.unwrap_or_else(|| panic!("no lead"));
    assert!(
        (score - 30.0).abs() < 1e-6,
        "one half-life halves 60 to 30, got {score}"
    );
    assert_eq!(temperature, "warm");
    // A sweep at the same moment finds nothing left to decay.
    assert_eq!(
        scoring::decay_once(&pool, score_at + TimeDelta::days(30))
            .await
            .unwrap_or_else(|e| panic!("{e:#}")),
        0
    );
    scoring::decay_once(&pool, score_at + TimeDelta::days(60))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (_, score, temperature, _) = score_of(&app, lead).await.unwrap_or_else(|| panic!("no lead"));
    assert!((score - 15.0).abs() < 1e-6, "two half-lives: 15, got {score}");
    assert_eq!(temperature, "cold");

    // The ledger lists every change with its reason, newest first, across pages.
    let rows = ledger(&api, lead_id, 2).await;
    assert_eq!(rows.len(), 6, "{rows:#?}");
    for decay in &rows[..2] {
        assert!(
            decay["reason"]
                .as_str()
                .unwrap_or_default()
                .starts_with("decay (half-life 30d)"),
            "{decay}"
        );
        assert_eq!(decay["rule"], Value::Null);
    }
    assert_eq!(rows[0]["points"], json!(-15.0));
    assert_eq!(rows[0]["score"], json!(15.0));
    assert_eq!(rows[1]["points"], json!(-30.0));
    let mut after = 0.0;
    for (i, row) in rows[2..].iter().rev().enumerate() {
        after += 15.0;
        assert_eq!(row["rule"], "pricing page", "{row}");
        assert_eq!(row["event_type"], "engagement.pricing_viewed", "{row}");
        assert!(row["event_id"].is_i64(), "{row}");
        assert_eq!(row["points"], json!(15.0), "{row}");
        assert_eq!(row["score"], json!(after), "row {i}: {row}");
        let reason = row["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("pricing page") && reason.contains("engagement.pricing_viewed"),
            "{reason}"
        );
    }
    let page = api.get(&format!("/v1/leads/{lead_id}/score")).await.expect(200);
    assert_eq!(page["temperature"], "cold");
    assert_eq!(page["score"], json!(15.0));
}

#[tokio::test]
async fn bad_rules_and_settings_are_refused_naming_the_field() {
    let app = TestApp::spawn().await;
    let api = admin(&app).await;
    for (rule, field) in [
        (
            json!({"name": "big", "event_type": "trial.started", "points": 150}),
            "points",
        ),
        (json!({"name": "nothing", "points": 5}), "event_type"),
        (
            json!({"name": "typo", "event_type": "trial.begun", "points": 5}),
            "event_type",
        ),
        (
            json!({"name": "op", "condition": {"field": "country", "op": "like", "value": "DE"}, "points": 5}),
            "condition.op",
        ),
        (
            json!({"name": "field", "condition": {"field": "shoe_size", "op": "eq", "value": "42"}, "points": 5}),
            "condition.field",
        ),
        (
            json!({"name": "value", "condition": {"field": "country", "op": "in", "value": "DE"}, "points": 5}),
            "condition.value",
        ),
    ] {
        api.post("/v1/scoring/rules", &rule).await.problem(400, field);
    }
    api.put("/v1/scoring/settings", &json!({"warm": 80}))
        .await
        .problem(400, "warm");
    api.put("/v1/scoring/settings", &json!({"half_life": "soon"}))
        .await
        .problem(400, "half_life");
    assert_eq!(app.count("SELECT count(*) FROM scoring_rules").await, 0);
    let settings = api.get("/v1/scoring/settings").await.expect(200);
    assert_eq!(
        settings["warm"],
        json!(20.0),
        "a refused change leaves the settings as they were"
    );

    api.post(
        "/v1/scoring/rules",
        &json!({"name": "de", "condition": {"field": "country", "op": "eq", "value": "DE"}, "points": 3}),
    )
    .await
    .expect(201);
    api.post(
        "/v1/scoring/rules",
        &json!({"name": "de", "condition": {"field": "country", "op": "eq", "value": "DE"}, "points": 3}),
    )
    .await
    .problem(409, "name");
}

#[tokio::test]
async fn a_read_key_sees_the_rules_but_cannot_change_them() {
    let app = TestApp::spawn().await;
    let admin = admin(&app).await;
    let reader = ApiClient::with_scope(&app, Scope::Read).await;
    let writer = ApiClient::with_scope(&app, Scope::Write).await;
    let rule = json!({"name": "order", "event_type": "order.completed", "points": 15});
    reader.post("/v1/scoring/rules", &rule).await.refused(403);
    writer.post("/v1/scoring/rules", &rule).await.refused(403);
    admin.post("/v1/scoring/rules", &rule).await.expect(201);
    let listed = reader.get("/v1/scoring/rules").await.expect(200);
    assert_eq!(listed["items"][0]["name"], "order");
    assert_eq!(listed["items"][0]["points"], json!(15.0));
    reader
        .put(
            "/v1/scoring/rules/order",
            &json!({"event_type": "order.completed", "points": 1}),
        )
        .await
        .refused(403);
    reader.delete("/v1/scoring/rules/order").await.refused(403);
    reader
        .put("/v1/scoring/settings", &json!({"hot": 10}))
        .await
        .refused(403);
    reader.post_empty("/v1/scoring/recompute").await.refused(403);
    let changed = admin
        .put(
            "/v1/scoring/rules/order",
            &json!({"event_type": "order.completed", "points": 14}),
        )
        .await
        .expect(200);
    assert_eq!(changed["points"], json!(14.0));
    ApiClient::new(&app, None).get("/v1/scoring/rules").await.refused(401);
}

#[tokio::test]
async fn leadflow_apply_upserts_scoring_rules_by_name() {
    let app = TestApp::spawn().await;
    let dir = std::env::temp_dir().join(format!("leadflow-scoring-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join("scoring.yaml");
    let write = |points: i32| {
        std::fs::write(
            &file,
            format!(
                "scoring_rules:\n  - name: trial\n    event_type: trial.started\n    points: {points}\n  - name: germany\n    \
                 condition: {{field: country, op: eq, value: DE}}\n    points: 3\n"
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    };
    write(10);
    let pool = pool(&app);
    let report = leadflow::apply::apply_path(&pool, &file)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let text = report.to_string();
    assert!(
        text.contains("scoring rule trial created") && text.contains("scoring rule germany created"),
        "{text}"
    );
    write(12);
    let text = leadflow::apply::apply_path(&pool, &file)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
        .to_string();
    assert!(
        text.contains("scoring rule trial updated") && text.contains("scoring rule germany unchanged"),
        "{text}"
    );
    let listed = admin(&app).await.get("/v1/scoring/rules").await.expect(200);
    let trial = listed["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"] == "trial")
        .cloned();
    assert_eq!(trial.map(|r| r["points"].clone()), Some(json!(12.0)));

    std::fs::write(
        &file,
        "scoring_rules:\n  - name: huge\n    event_type: trial.started\n    points: 500\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let error = format!("{:#}", leadflow::apply::apply_path(&pool, &file).await.unwrap_err());
    assert!(error.contains("points"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn attribute_points_do_not_fade_and_a_merge_counts_a_rule_both_leads_held_once() {
    let app = TestApp::spawn().await;
    let api = admin(&app).await;
    api.post(
        "/v1/scoring/rules",
        &json!({"name": "uk", "condition": {"field": "country", "op": "eq", "value": "gb"}, "points": 10}),
    )
    .await
    .expect(201);
    api.post(
        "/v1/scoring/rules",
        &json!({"name": "trial", "event_type": "trial.started", "points": 20}),
    )
    .await
    .expect(201);
    let (ann, bob) = ("ann.merge@example.com", "bob.merge@example.com");
    // The test events say country GB: the profile an event brings is scored when the event is handled.
    app.post_event(&event("lead.captured", ann)).await;
    app.post_event(&event("lead.captured", bob)).await;
    let (ann_id, ..) = wait_for_score(&app, ann, 10.0).await;
    wait_for_score(&app, bob, 10.0).await;
    let first = ledger(&api, ann_id, 50).await;
    assert!(
        first[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("holds (by lead.captured event)")),
        "{first:#?}"
    );
    let done = api.post_empty("/v1/scoring/recompute").await.expect(200);
    assert_eq!(done["changed"], 0, "nothing left to recompute: {done}");
    app.post_event(&event("trial.started", ann)).await;
    app.post_event(&event("trial.started", bob)).await;
    let (_, _, _, score_at) = wait_for_score(&app, ann, 30.0).await;
    let (bob_id, ..) = wait_for_score(&app, bob, 30.0).await;

    // One half-life later only the event points have halved: 10 + 20 / 2.
    let score_at = score_at.unwrap_or_else(|| panic!("a scored lead has a score_at"));
    scoring::decay_once(&pool(&app), score_at + TimeDelta::days(30))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (_, score, ..) = score_of(&app, ann).await.unwrap_or_else(|| panic!("no lead"));
    assert!((score - 20.0).abs() < 1e-6, "held points stay whole: {score}");

    // Merging bob into ann carries bob's event points (10 after decay) but not a second "uk".
    let mut client = app.db().await;
    let tx = client.transaction().await.unwrap_or_else(|e| panic!("{e}"));
    scoring::merge_scores(&tx, ann_id, bob_id, "tests")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    tx.execute("DELETE FROM leads WHERE id = $1", &[&bob_id])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tx.commit().await.unwrap_or_else(|e| panic!("{e}"));
    let (_, score, temperature, _) = score_of(&app, ann).await.unwrap_or_else(|| panic!("no lead"));
    assert!(
        (score - 30.0).abs() < 1e-6,
        "10 held + 10 own + 10 carried, got {score}"
    );
    assert_eq!(temperature, "warm");
    let reasons: Vec<Value> = ledger(&api, ann_id, 50).await;
    assert!(
        reasons[0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("merged from lead {bob_id}"))),
        "{reasons:#?}"
    );

    // The condition stops holding: exactly the 10 given are taken back.
    set_country(&app, ann_id, "DE").await;
    let (_, score, ..) = score_of(&app, ann).await.unwrap_or_else(|| panic!("no lead"));
    assert!((score - 20.0).abs() < 1e-6, "{score}");
}

async fn set_country(app: &TestApp, lead_id: i64, country: &str) {
    let mut client = app.db().await;
    let tx = client.transaction().await.unwrap_or_else(|e| panic!("{e}"));
    tx.execute("UPDATE leads SET country = $2 WHERE id = $1", &[&lead_id, &country])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    scoring::rescore_lead(&tx, lead_id, "tests")
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    tx.commit().await.unwrap_or_else(|e| panic!("{e}"));
}
