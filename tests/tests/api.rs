//! The admin REST API end to end: campaigns created and changed over HTTP drive the real pipeline, validation
//! errors name the field, templates are stored and previewed, stats and settings are served, and every request
//! is checked against an API key and its scope.

use reqwest::header::AUTHORIZATION;
use reqwest::Method;
use serde_json::{json, Value};

use leadflow::api::keys::{self, Scope};
use leadflow::Component;
use leadflow_tests::{event, wait_until, ApiClient as Admin, TestApp, DEADLINE};

/// A campaign for trial sign-ups: a welcome after a second, a reminder long after (so it is still open).
fn trial_campaign() -> Value {
    json!({
        "name": "trial-nurture",
        "description": "Welcome new trials",
        "lead_source": "trial.started",
        "steps": [
            {"delay": "1s", "template": "cart-reminder"},
            {"delay": "1h", "discount": 20, "template": "cart-discount"}
        ]
    })
}

#[tokio::test]
async fn a_campaign_created_over_the_api_enrolls_leads_and_deactivating_it_cancels_open_follow_ups() {
    let app = TestApp::spawn().await;
    let admin = Admin::with_scope(&app, Scope::Write).await;

    let created = admin.post("/v1/admin/campaigns", &trial_campaign()).await;
    assert_eq!(created.location.as_deref(), Some("/v1/admin/campaigns/trial-nurture"));
    let created = created.expect(201);
    assert_eq!(created["status"], "active");
    assert_eq!(created["lead_source"], "trial.started");
    assert_eq!(created["steps"][1]["delay"], "1h");
    assert_eq!(created["steps"][1]["discount"], 20);
    assert!(created["id"].as_i64().is_some(), "{created}");

    // The name is taken now.
    admin
        .post("/v1/admin/campaigns", &trial_campaign())
        .await
        .problem(409, "name");

    let listed = admin.get("/v1/admin/campaigns").await.expect(200);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {listed}"))
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, vec!["cart-recovery", "trial-nurture"]);

    // An update keeps the campaign (same id) and is visible right away; a GET's answer can be sent back.
    let mut changed = admin.get("/v1/admin/campaigns/trial-nurture").await.expect(200);
    changed["description"] = json!("Welcome new trials, second edition");
    let updated = admin
        .put("/v1/admin/campaigns/trial-nurture", &changed)
        .await
        .expect(200);
    assert_eq!(updated["id"], created["id"]);
    assert_eq!(updated["description"], "Welcome new trials, second edition");
    assert_eq!(
        admin.get("/v1/admin/campaigns/trial-nurture").await.expect(200)["description"],
        "Welcome new trials, second edition"
    );

    // The campaign works: a trial event enrolls the lead and the first follow-up goes out.
    app.post_event(&event("trial.started", "tia@example.com")).await;
    app.smtp.wait_for_to("tia@example.com", 1, DEADLINE).await;
    app.wait_for_deliveries("tia@example.com", "step one is sent and step two waits", |d| {
        d.len() == 2 && d[0].state == "sent" && d[1].state == "pending"
    })
    .await;

    let stopped = admin
        .post_empty("/v1/admin/campaigns/trial-nurture/deactivate")
        .await
        .expect(200);
    assert_eq!(stopped["status"], "inactive");
    assert_eq!(stopped["cancelled"], 1);
    let rows = app.deliveries_of("tia@example.com").await;
    assert_eq!(
        rows,
        vec![
            (1, "sent".to_string(), None),
            (2, "cancelled".to_string(), Some("campaign stopped".to_string()))
        ]
    );
    assert_eq!(
        admin.get("/v1/admin/campaigns/trial-nurture").await.expect(200)["status"],
        "inactive"
    );

    // Inactive: a new trial is not enrolled. Active again: the next one is.
    app.post_event(&event("trial.started", "tom@example.com")).await;
    wait_until("the scheduler has handled tom's event", DEADLINE, || async {
        app.count(
            "SELECT count(*) FROM events e JOIN leads l ON l.id = e.lead_id
             WHERE l.email = 'tom@example.com' AND e.handled_at IS NOT NULL",
        )
        .await
            == 1
    })
    .await;
    let started = admin
        .post_empty("/v1/admin/campaigns/trial-nurture/activate")
        .await
        .expect(200);
    assert_eq!(started["status"], "active");
    app.post_event(&event("trial.started", "una@example.com")).await;
    app.smtp.wait_for_to("una@example.com", 1, DEADLINE).await;
    assert!(app.deliveries_of("tom@example.com").await.is_empty());

    admin
        .post_empty("/v1/admin/campaigns/no-such-campaign/activate")
        .await
        .expect(404);
}

#[tokio::test]
async fn invalid_campaigns_are_refused_with_the_field_named() {
    let app = TestApp::spawn_with(&[Component::Api], &[]).await;
    let admin = Admin::with_scope(&app, Scope::Write).await;
    let refused = |edit: fn(&mut Value)| {
        let mut body = trial_campaign();
        edit(&mut body);
        body
    };

    let four_steps = refused(|c| {
        c["steps"] = json!([
            {"delay": "1s", "template": "cart-reminder"},
            {"delay": "1s", "template": "cart-reminder"},
            {"delay": "1s", "template": "cart-reminder"},
            {"delay": "1s", "template": "cart-reminder"}
        ])
    });
    let problem = admin
        .post("/v1/admin/campaigns", &four_steps)
        .await
        .problem(400, "steps");
    assert!(
        problem["detail"].as_str().unwrap_or_default().contains("1 to 3 steps"),
        "{problem}"
    );

    let bad_delay = refused(|c| c["steps"][0]["delay"] = json!("1 hour"));
    admin
        .post("/v1/admin/campaigns", &bad_delay)
        .await
        .problem(400, "steps[0].delay");

    let bad_source = refused(|c| c["lead_source"] = json!("trial"));
    admin
        .post("/v1/admin/campaigns", &bad_source)
        .await
        .problem(400, "lead_source");

    let missing_template = refused(|c| c["steps"][1]["template"] = json!("no-such-template"));
    let problem = admin
        .post("/v1/admin/campaigns", &missing_template)
        .await
        .problem(400, "steps[1].template");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("no-such-template"),
        "{problem}"
    );

    let unknown_field = refused(|c| c["colour"] = json!("red"));
    admin
        .post("/v1/admin/campaigns", &unknown_field)
        .await
        .problem(400, "colour");
    let unknown_step_field = refused(|c| c["steps"][0]["wait"] = json!("1s"));
    admin
        .post("/v1/admin/campaigns", &unknown_step_field)
        .await
        .problem(400, "steps[0].wait");

    let wrong_type = refused(|c| c["steps"][0]["discount"] = json!("ten"));
    admin
        .post("/v1/admin/campaigns", &wrong_type)
        .await
        .problem(400, "steps[0].discount");

    // PUT: the URL names the campaign; a different name in the body is refused.
    admin
        .put("/v1/admin/campaigns/other-name", &trial_campaign())
        .await
        .problem(400, "name");

    let not_json = admin.post("/v1/admin/campaigns", &json!("just a string")).await;
    assert_eq!(not_json.status, 400, "{not_json:#?}");
    assert_eq!(not_json.content_type, "application/problem+json");

    // Nothing of it was stored.
    assert_eq!(
        app.count("SELECT count(*) FROM campaigns WHERE name = 'trial-nurture'")
            .await,
        0
    );
    // A campaign named only in the URL is created by PUT.
    let mut unnamed = trial_campaign();
    unnamed.as_object_mut().map(|c| c.remove("name"));
    let created = admin
        .put("/v1/admin/campaigns/trial-nurture", &unnamed)
        .await
        .expect(201);
    assert_eq!(created["name"], "trial-nurture");
}

#[tokio::test]
async fn a_template_stored_over_the_api_is_previewed_for_a_sample_lead() {
    let app = TestApp::spawn_with(&[Component::Api], &[]).await;
    let admin = Admin::with_scope(&app, Scope::Write).await;
    let welcome = json!({
        "subject": "Welcome, {{lead.first_name}}",
        "body_text": "Hi {{lead.first_name}} {{lead.last_name}},\n{{#if discount.has}}{{discount.percent}}% off {{product.name}}: {{product.url}}{{/if}}",
        "body_html": "<p>Hi {{lead.first_name}}, <a href=\"{{product.url}}\">{{product.name}}</a></p>"
    });

    let stored = admin.put("/v1/admin/templates/welcome/en", &welcome).await.expect(201);
    assert_eq!(stored["version"], 1);
    assert_eq!(stored["change"], "created");
    let again = admin.put("/v1/admin/templates/welcome/en", &welcome).await.expect(200);
    assert_eq!(again["change"], "unchanged");
    assert_eq!(again["version"], 1);

    let listed = admin.get("/v1/admin/templates").await.expect(200);
    assert!(
        listed
            .as_array()
            .is_some_and(|all| all.iter().any(|t| t["name"] == "welcome" && t["language"] == "en")),
        "{listed}"
    );
    assert_eq!(
        admin.get("/v1/admin/templates/welcome/en").await.expect(200)["subject"],
        "Welcome, {{lead.first_name}}"
    );

    let preview = admin
        .post_empty("/v1/admin/templates/welcome/en/preview")
        .await
        .expect(200);
    assert_eq!(preview["subject"], "Welcome, Alex");
    let text = preview["body_text"].as_str().unwrap_or_default();
    assert!(text.starts_with("Hi Alex Sample,\n10% off "), "{preview}");
    assert!(
        preview["body_html"]
            .as_str()
            .unwrap_or_default()
            .contains("<a href=\"https://"),
        "{preview}"
    );

    let custom = admin
        .post(
            "/v1/admin/templates/welcome/en/preview",
            &json!({"lead": {"first_name": "Tom & Jerry"}, "discount": 0}),
        )
        .await
        .expect(200);
    assert_eq!(custom["subject"], "Welcome, Tom & Jerry");
    assert_eq!(custom["body_text"], "Hi Tom & Jerry Sample,\n");
    assert!(
        custom["body_html"]
            .as_str()
            .unwrap_or_default()
            .contains("Tom &amp; Jerry"),
        "{custom}"
    );

    // A product without a link: the template needs one, so the preview names the variable.
    let problem = admin
        .post(
            "/v1/admin/templates/welcome/en/preview",
            &json!({"product": {"name": "Boots"}}),
        )
        .await
        .problem(422, "product.url");
    assert!(
        problem["detail"].as_str().unwrap_or_default().contains("welcome/en"),
        "{problem}"
    );

    admin
        .post("/v1/admin/templates/welcome/en/preview", &json!({"leed": {}}))
        .await
        .problem(400, "leed");
    admin
        .post_empty("/v1/admin/templates/welcome/fr/preview")
        .await
        .expect(404);

    // A template that does not compile names the part and the line; the stored version is left alone.
    let broken = json!({
        "subject": "Welcome",
        "body_text": "line one\n{{#if lead.first_name}}unclosed",
        "body_html": "<p></p>"
    });
    let problem = admin
        .put("/v1/admin/templates/welcome/en", &broken)
        .await
        .problem(400, "body_text");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("body.txt.hbs") && detail.contains("line"), "{problem}");
    admin
        .put("/v1/admin/templates/Welcome/en", &welcome)
        .await
        .problem(400, "name");
    admin
        .put("/v1/admin/templates/welcome/EN", &welcome)
        .await
        .problem(400, "language");

    let mut changed = welcome.clone();
    changed["subject"] = json!("Welcome aboard, {{lead.first_name}}");
    let second = admin.put("/v1/admin/templates/welcome/en", &changed).await.expect(200);
    assert_eq!(second["version"], 2);
    assert_eq!(second["change"], "updated");
}

#[tokio::test]
async fn stats_and_settings_are_served_and_a_bad_setting_names_its_key() {
    let app = TestApp::spawn().await;
    let admin = Admin::with_scope(&app, Scope::Admin).await;

    app.post_event(&event("checkout.abandoned", "sam@example.com")).await;
    app.smtp.wait_for_to("sam@example.com", 1, DEADLINE).await;
    let overall = || async {
        let rows = admin.get("/v1/admin/stats?campaign=cart-recovery").await.expect(200);
        rows.as_array()
            .and_then(|rows| rows.iter().find(|r| r["step"].is_null()).cloned())
            .unwrap_or(Value::Null)
    };
    wait_until("the stats count the lead and a sent follow-up", DEADLINE, || async {
        let row = overall().await;
        row["targeted"] == 1 && row["sent"].as_i64().unwrap_or(0) >= 1
    })
    .await;
    let row = overall().await;
    assert_eq!(row["campaign"], "cart-recovery", "{row}");
    assert!(row["conversion_rate"].is_number(), "{row}");
    let none = admin.get("/v1/admin/stats?campaign=no-such-campaign").await.expect(200);
    assert_eq!(none, json!([]));

    let settings = admin.get("/v1/admin/settings").await.expect(200);
    let value_of = |all: &Value, key: &str| {
        all.as_array()
            .and_then(|s| s.iter().find(|s| s["key"] == key))
            .map(|s| s["value"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(value_of(&settings, "sending_enabled"), json!(true));

    let set = admin
        .put("/v1/admin/settings/stale_after", &json!({"value": "72h"}))
        .await
        .expect(200);
    assert_eq!(set["value"], "3d");
    admin
        .put("/v1/admin/settings/sending_enabled", &json!({"value": false}))
        .await
        .expect(200);
    let settings = admin.get("/v1/admin/settings").await.expect(200);
    assert_eq!(value_of(&settings, "sending_enabled"), json!(false));
    assert_eq!(value_of(&settings, "stale_after"), json!("3d"));

    admin
        .put("/v1/admin/settings/sending_enabled", &json!({"value": "maybe"}))
        .await
        .problem(400, "sending_enabled");
    admin
        .put("/v1/admin/settings/min_delay.order.lost", &json!({"value": "1h"}))
        .await
        .problem(400, "min_delay.order.lost");
    admin
        .put("/v1/admin/settings/stale_after", &json!({"val": "1d"}))
        .await
        .problem(400, "val");
}

#[tokio::test]
async fn every_request_needs_a_valid_key_with_the_right_scope_and_a_revoked_key_is_refused() {
    let app = TestApp::spawn_with(&[Component::Api], &[]).await;
    let anonymous = Admin::new(&app, None);
    let forged = Admin::new(&app, Some(format!("lf_{}", "x".repeat(32))));
    let reader = Admin::with_scope(&app, Scope::Read).await;
    let writer = Admin::with_scope(&app, Scope::Write).await;
    let admin = Admin::with_scope(&app, Scope::Admin).await;
    let template = json!({"subject": "Hi", "body_text": "Hi", "body_html": "<p>Hi</p>"});
    let setting = json!({"value": "true"});

    for client in [&anonymous, &forged] {
        let refused = client.get("/v1/admin/campaigns").await;
        assert_eq!(
            refused.challenge.as_deref(),
            Some("Bearer realm=\"leadflow\""),
            "{refused:#?}"
        );
        assert_eq!(refused.status, 401, "{refused:#?}");
        assert_eq!(refused.content_type, "application/problem+json");
    }
    let not_bearer = reqwest::Client::new()
        .get(app.url("/v1/admin/campaigns"))
        .header(AUTHORIZATION, "Basic YWxhZGRpbjpvcGVuc2VzYW1l")
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET failed: {e}"));
    assert_eq!(not_bearer.status(), 401);

    // read: every GET, and previews; nothing that changes anything.
    for path in [
        "/v1/admin/campaigns",
        "/v1/admin/templates",
        "/v1/admin/stats",
        "/v1/admin/settings",
    ] {
        reader.get(path).await.expect(200);
    }
    reader
        .post_empty("/v1/admin/templates/cart-reminder/en/preview")
        .await
        .expect(200);
    let forbidden = reader.post("/v1/admin/campaigns", &trial_campaign()).await;
    assert_eq!(forbidden.status, 403, "{forbidden:#?}");
    assert_eq!(forbidden.content_type, "application/problem+json");
    assert!(
        forbidden.body["detail"].as_str().unwrap_or_default().contains("write"),
        "{forbidden:#?}"
    );
    assert_eq!(reader.put("/v1/admin/templates/hello/en", &template).await.status, 403);
    assert_eq!(
        reader
            .post_empty("/v1/admin/campaigns/cart-recovery/deactivate")
            .await
            .status,
        403
    );
    assert_eq!(
        reader.put("/v1/admin/settings/sending_enabled", &setting).await.status,
        403
    );

    // write: campaigns and templates, not settings.
    writer.put("/v1/admin/templates/hello/en", &template).await.expect(201);
    writer.post("/v1/admin/campaigns", &trial_campaign()).await.expect(201);
    writer.get("/v1/admin/campaigns/trial-nurture").await.expect(200);
    let forbidden = writer.put("/v1/admin/settings/sending_enabled", &setting).await;
    assert_eq!(forbidden.status, 403, "{forbidden:#?}");
    assert!(
        forbidden.body["detail"].as_str().unwrap_or_default().contains("admin"),
        "{forbidden:#?}"
    );

    // admin: everything.
    admin
        .put("/v1/admin/settings/sending_enabled", &setting)
        .await
        .expect(200);
    admin
        .post_empty("/v1/admin/campaigns/trial-nurture/deactivate")
        .await
        .expect(200);
    admin.get("/v1/admin/stats").await.expect(200);

    // Listings show the prefix and when a key was used, never the key or its hash.
    let db = app.db().await;
    let listed = keys::list(&db)
        .await
        .unwrap_or_else(|e| panic!("failed to list keys: {e:#}"));
    assert_eq!(listed.len(), 3);
    let reader_key = reader.key().unwrap_or_default().to_string();
    let reader_info = listed
        .iter()
        .find(|k| reader_key.starts_with(&k.prefix))
        .unwrap_or_else(|| panic!("the read key is not listed: {listed:#?}"));
    assert_eq!(reader_info.prefix.len(), 8);
    assert!(reader_info.last_used_at.is_some(), "{reader_info:?}");
    let stored_hash: String = db
        .query_one("SELECT key_hash FROM api_keys WHERE id = $1", &[&reader_info.id])
        .await
        .unwrap_or_else(|e| panic!("query failed: {e}"))
        .get(0);
    assert_eq!(stored_hash, keys::hash(&reader_key));
    assert_eq!(
        app.count("SELECT count(*) FROM api_keys WHERE key_hash LIKE 'lf_%'")
            .await,
        0
    );

    // Revoked: refused from the next request on.
    let revoked = keys::revoke(&db, &reader_info.prefix)
        .await
        .unwrap_or_else(|e| panic!("failed to revoke: {e:#}"));
    assert!(revoked.revoked_at.is_some());
    let refused = reader.get("/v1/admin/campaigns").await;
    assert_eq!(refused.status, 401, "{refused:#?}");
    assert!(keys::revoke(&db, "lf_none0").await.is_err());

    // Unknown endpoints and methods are problems too.
    let missing = admin.get("/v1/admin/nothing-here").await;
    assert_eq!(
        (missing.status.as_u16(), missing.content_type.as_str()),
        (404, "application/problem+json")
    );
    let wrong_method = admin.send(Method::DELETE, "/v1/admin/campaigns", None, None).await;
    assert_eq!(wrong_method.status, 405, "{wrong_method:#?}");
    assert_eq!(wrong_method.content_type, "application/problem+json");
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_as_a_problem_and_the_document_is_served_without_a_key() {
    let app = TestApp::spawn_with(&[Component::Api], &[("LEADFLOW_MAX_BODY_BYTES", "4096")]).await;
    let admin = Admin::with_scope(&app, Scope::Write).await;

    let mut campaign = trial_campaign();
    campaign["description"] = json!("x".repeat(8192));
    let refused = admin.post("/v1/admin/campaigns", &campaign).await;
    assert_eq!(refused.status.as_u16(), 413, "{refused:#?}");
    assert_eq!(refused.content_type, "application/problem+json", "{refused:#?}");
    assert!(
        refused.body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("LEADFLOW_MAX_BODY_BYTES")),
        "{refused:#?}"
    );
    // Under the limit, the same request goes through.
    admin.post("/v1/admin/campaigns", &trial_campaign()).await.expect(201);

    let document = Admin::new(&app, None).get("/v1/openapi.json").await.expect(200);
    assert!(
        document["openapi"].as_str().is_some_and(|v| v.starts_with("3.1")),
        "{document}"
    );
    assert!(document["paths"]["/v1/events"]["post"].is_object(), "{document}");
    app.stop().await;
}
