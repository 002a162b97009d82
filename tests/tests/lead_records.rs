//! Lead records end to end, over the HTTP API against the real services: creating a lead twice (the second says it
//! existed, another product is another inquiry), origin fields set once, the 30 custom fields, notes with their
//! history, an email change and a merge that keep the timeline, suspension stopping email, the timeline's pages,
//! inquiries opened by events and kept in step with their follow-ups, and a read key refused a change.

use serde_json::{json, Value};

use leadflow::api::keys::Scope;
use leadflow::Component;
use leadflow_shared::tokens::{Keyring, Purpose};
use leadflow_tests::{event, wait_until, ApiClient, TestApp, DEADLINE, TEST_TOKEN_KEYS};

/// The leadflow command, built for the tests.
const LEADFLOW: &str = env!("CARGO_BIN_EXE_leadflow-under-test");

/// Creates a lead (insisting on 201) and returns its id.
async fn create(api: &ApiClient, body: Value) -> i64 {
    let created = api.post("/v1/leads", &body).await.expect(201);
    created["lead"]["id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no lead id in {created:#}"))
}

async fn lead(api: &ApiClient, id: i64) -> Value {
    api.get(&format!("/v1/leads/{id}")).await.expect(200)
}

/// Every timeline entry of the lead, following the cursor with `limit` entries per page.
async fn whole_timeline(api: &ApiClient, id: i64, limit: u32) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let path = match &cursor {
            Some(c) => format!("/v1/leads/{id}/timeline?limit={limit}&cursor={c}"),
            None => format!("/v1/leads/{id}/timeline?limit={limit}"),
        };
        let page = api.get(&path).await.expect(200);
        let got = page["items"].as_array().cloned().unwrap_or_default();
        assert!(got.len() <= limit as usize, "a page holds at most the limit: {page:#}");
        items.extend(got);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return items,
        }
    }
    panic!("the timeline of lead {id} did not end after 100 pages");
}

fn kinds(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| i["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

async fn lead_id_of(app: &TestApp, email: &str) -> i64 {
    app.db()
        .await
        .query_one("SELECT id FROM leads WHERE email = $1", &[&email])
        .await
        .unwrap_or_else(|e| panic!("no lead {email}: {e}"))
        .get(0)
}

#[tokio::test]
async fn creating_a_lead_again_says_it_existed_and_another_product_is_another_inquiry() {
    let app = TestApp::spawn().await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;

    let first = api
        .post(
            "/v1/leads",
            &json!({"email": " Ann@Example.com ", "first_name": "Ann", "tags": ["vip"],
                    "search_keyword": "trail shoes", "inquiry": {"product_sku": "TR-2", "product_name": "Trail Runner 2"}}),
        )
        .await
        .expect(201);
    assert_eq!(first["existed"], json!(false));
    assert_eq!(
        first["lead"]["email"],
        json!("ann@example.com"),
        "the email is normalised"
    );
    assert_eq!(
        first["lead"]["original_source"],
        json!("api"),
        "the origin is set at creation"
    );
    assert_eq!(first["lead"]["search_keyword"], json!("trail shoes"));
    assert_eq!(first["inquiry"]["product_sku"], json!("TR-2"));
    let id = first["lead"]["id"].as_i64().unwrap_or_default();

    let again = api
        .post(
            "/v1/leads",
            &json!({"email": "ann@example.com", "city": "Berlin", "tags": ["b2b"], "inquiry": {"product_sku": "HK-9"}}),
        )
        .await
        .expect(200);
    assert_eq!(again["existed"], json!(true));
    assert_eq!(again["lead"]["id"], json!(id), "the same lead");
    assert_eq!(again["lead"]["city"], json!("Berlin"), "what is new is added");
    assert_eq!(again["lead"]["first_name"], json!("Ann"), "what was there stays");
    assert_eq!(again["lead"]["tags"], json!(["vip", "b2b"]));
    assert_eq!(again["lead"]["created_at"], first["lead"]["created_at"]);
    assert_eq!(again["inquiry"]["product_sku"], json!("HK-9"));

    // The same product again is the same inquiry.
    let same = api
        .post(
            "/v1/leads",
            &json!({"email": "ann@example.com", "inquiry": {"product_sku": "TR-2"}}),
        )
        .await
        .expect(200);
    assert_eq!(same["inquiry"]["id"], first["inquiry"]["id"]);

    let shown = lead(&api, id).await;
    let skus: Vec<&str> = shown["inquiries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["product_sku"].as_str())
        .collect();
    assert_eq!(skus, ["TR-2", "HK-9"], "{shown:#}");
    let changes = app
        .count(&format!(
            "SELECT count(*) FROM lead_changes WHERE lead_id = {id} AND actor = 'tests-write'"
        ))
        .await;
    assert_eq!(
        changes, 2,
        "created, then updated once (the third create changed nothing)"
    );

    api.post("/v1/leads", &json!({"first_name": "No email"}))
        .await
        .problem(400, "email");
}

#[tokio::test]
async fn origin_fields_are_set_once_while_other_fields_edit_and_last_updated_moves() {
    let app = TestApp::spawn().await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    let reader = ApiClient::with_scope(&app, Scope::Read).await;
    let id = create(&api, json!({"email": "bo@example.com", "source": "Google"})).await;
    let before = lead(&api, id).await["lead"].clone();
    assert_eq!(before["original_source"], json!("Google"));
    assert_eq!(before["original_source_category"], json!("organic search"));

    let refused = api
        .patch(&format!("/v1/leads/{id}"), &json!({"original_source": "Bing"}))
        .await
        .problem(409, "original_source");
    assert!(
        refused["detail"].as_str().unwrap_or_default().contains("set once"),
        "{refused:#}"
    );
    api.patch(
        &format!("/v1/leads/{id}"),
        &json!({"created_at": "2020-01-01T00:00:00Z"}),
    )
    .await
    .problem(400, "created_at");
    api.patch(&format!("/v1/leads/{id}"), &json!({"status": "Nope"}))
        .await
        .problem(400, "status");
    reader
        .patch(&format!("/v1/leads/{id}"), &json!({"city": "Oslo"}))
        .await
        .refused(403);

    let edited = api
        .patch(
            &format!("/v1/leads/{id}"),
            &json!({"city": "Oslo", "status": "Inactive", "source": "Bing", "phones": ["+47 1", "+47 2"]}),
        )
        .await
        .expect(200);
    let after = &edited["lead"];
    assert_eq!(after["city"], json!("Oslo"));
    assert_eq!(after["status"], json!("Inactive"));
    assert_eq!(after["source"], json!("Bing"), "the current source edits");
    assert_eq!(after["original_source"], json!("Google"), "the original source stays");
    assert_eq!(edited["changes"]["city"], json!({"from": null, "to": "Oslo"}));
    assert!(
        after["updated_at"].as_str() > before["updated_at"].as_str(),
        "last updated moves: {before:#} -> {after:#}"
    );
    assert_eq!(after["created_at"], before["created_at"]);
    let logged = app
        .count(&format!(
            "SELECT count(*) FROM lead_changes WHERE lead_id = {id} AND kind = 'updated'
               AND changes ? 'city' AND actor = 'tests-write'"
        ))
        .await;
    assert_eq!(logged, 1);

    // A custom status can be defined (admin) and then used.
    api.post("/v1/lead-statuses", &json!({"name": "Qualified"}))
        .await
        .refused(403);
    let admin = ApiClient::with_scope(&app, Scope::Admin).await;
    admin
        .post("/v1/lead-statuses", &json!({"name": "Qualified"}))
        .await
        .expect(201);
    admin
        .post("/v1/lead-statuses", &json!({"name": "Qualified"}))
        .await
        .problem(409, "name");
    admin
        .post("/v1/lead-sources", &json!({"name": "Fair 2026", "category": "event"}))
        .await
        .expect(201);
    let changed = api
        .patch(&format!("/v1/leads/{id}"), &json!({"status": "Qualified"}))
        .await
        .expect(200);
    assert_eq!(changed["lead"]["status"], json!("Qualified"));
    let sources = reader.get("/v1/lead-sources").await.expect(200);
    assert!(
        sources["items"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == "Fair 2026" && s["category"] == "event"),
        "{sources:#}"
    );
}

#[tokio::test]
async fn the_thirty_first_custom_field_is_refused_and_a_value_of_the_wrong_type_is_named() {
    let app = TestApp::spawn().await;
    let admin = ApiClient::with_scope(&app, Scope::Admin).await;
    let writer = ApiClient::with_scope(&app, Scope::Write).await;
    writer
        .post("/v1/lead-fields", &json!({"name": "plan", "kind": "text"}))
        .await
        .refused(403);
    admin
        .post(
            "/v1/lead-fields",
            &json!({"name": "birthday", "kind": "date", "label": "Birthday"}),
        )
        .await
        .expect(201);
    admin
        .post(
            "/v1/lead-fields",
            &json!({"name": "plan", "kind": "choice", "choices": ["Basic", "Pro"]}),
        )
        .await
        .expect(201);
    admin
        .post("/v1/lead-fields", &json!({"name": "seats", "kind": "colour"}))
        .await
        .problem(400, "kind");
    for i in 3..=30 {
        admin
            .post(
                "/v1/lead-fields",
                &json!({"name": format!("extra_{i}"), "kind": "number"}),
            )
            .await
            .expect(201);
    }
    let refused = admin
        .post("/v1/lead-fields", &json!({"name": "one_too_many", "kind": "text"}))
        .await
        .problem(409, "name");
    assert!(
        refused["detail"].as_str().unwrap_or_default().contains("30"),
        "{refused:#}"
    );
    let listed = writer.get("/v1/lead-fields").await.expect(200);
    assert_eq!(listed["items"].as_array().map(Vec::len), Some(30));

    writer
        .post(
            "/v1/leads",
            &json!({"email": "cy@example.com", "custom": {"birthday": "12/01/1990"}}),
        )
        .await
        .problem(400, "custom.birthday");
    let id = create(
        &writer,
        json!({"email": "cy@example.com", "custom": {"birthday": "1990-01-12", "plan": "pro"}}),
    )
    .await;
    writer
        .patch(&format!("/v1/leads/{id}"), &json!({"custom": {"extra_3": "many"}}))
        .await
        .problem(400, "custom.extra_3");
    let shown = lead(&writer, id).await;
    assert_eq!(
        shown["lead"]["custom"],
        json!({"birthday": "1990-01-12", "plan": "Pro"})
    );

    // Removing a field frees a place and clears its values.
    admin.delete("/v1/lead-fields/plan").await.expect(200);
    admin
        .post("/v1/lead-fields", &json!({"name": "one_too_many", "kind": "text"}))
        .await
        .expect(201);
    assert_eq!(
        lead(&writer, id).await["lead"]["custom"],
        json!({"birthday": "1990-01-12"})
    );
}

#[tokio::test]
async fn editing_a_note_keeps_its_earlier_text_and_deleting_hides_it() {
    let app = TestApp::spawn().await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    let id = create(&api, json!({"email": "di@example.com"})).await;
    let note = api
        .post(&format!("/v1/leads/{id}/notes"), &json!({"body": "called, no answer"}))
        .await
        .expect(201);
    let note_id = note["id"].as_i64().unwrap_or_default();
    assert_eq!(note["author"], json!("tests-write"));
    api.post(&format!("/v1/leads/{id}/notes"), &json!({"body": " "}))
        .await
        .problem(400, "body");

    let edited = api
        .put(
            &format!("/v1/leads/{id}/notes/{note_id}"),
            &json!({"body": "called, will call back on Monday"}),
        )
        .await
        .expect(200);
    assert_eq!(edited["body"], json!("called, will call back on Monday"));
    assert_eq!(edited["revisions"][0]["body"], json!("called, no answer"));

    let listed = api.get(&format!("/v1/leads/{id}/notes")).await.expect(200);
    assert_eq!(
        listed["items"][0]["revisions"].as_array().map(Vec::len),
        Some(1),
        "{listed:#}"
    );

    api.delete(&format!("/v1/leads/{id}/notes/{note_id}")).await.expect(204);
    let listed = api.get(&format!("/v1/leads/{id}/notes")).await.expect(200);
    assert_eq!(listed["items"], json!([]));
    let kept = app
        .count(&format!(
            "SELECT count(*) FROM lead_notes WHERE id = {note_id} AND deleted_at IS NOT NULL"
        ))
        .await;
    assert_eq!(kept, 1, "a deleted note is hidden, not erased");
    api.put(&format!("/v1/leads/{id}/notes/{note_id}"), &json!({"body": "x"}))
        .await
        .refused(404);
}

#[tokio::test]
async fn changing_the_email_keeps_the_leads_history_and_a_taken_email_is_refused() {
    let app = TestApp::spawn().await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    app.post_event(&event("lead.captured", "ed@example.com")).await;
    wait_until("the event is stored", DEADLINE, || async {
        app.count("SELECT count(*) FROM events").await == 1
    })
    .await;
    let id = lead_id_of(&app, "ed@example.com").await;
    api.post(&format!("/v1/leads/{id}/notes"), &json!({"body": "prefers email"}))
        .await
        .expect(201);
    create(&api, json!({"email": "taken@example.com"})).await;

    api.put(&format!("/v1/leads/{id}/email"), &json!({"email": "Taken@example.com"}))
        .await
        .problem(409, "email");
    api.put(&format!("/v1/leads/{id}/email"), &json!({"email": "not an address"}))
        .await
        .problem(400, "email");
    api.post(&format!("/v1/leads/{id}/suspend"), &json!({"reason": "disputed order"}))
        .await
        .expect(200);
    let changed = api
        .put(
            &format!("/v1/leads/{id}/email"),
            &json!({"email": "ed.new@example.com"}),
        )
        .await
        .expect(200);
    assert_eq!(changed["lead"]["id"], json!(id));
    assert_eq!(changed["lead"]["email"], json!("ed.new@example.com"));
    assert_eq!(
        changed["lead"]["consent"]["suspended"]["reason"],
        json!("disputed order"),
        "a new address does not clear the suspension: {changed:#}"
    );

    let timeline = whole_timeline(&api, id, 50).await;
    let kinds = kinds(&timeline);
    assert!(kinds.contains(&"email change".to_string()), "{timeline:#?}");
    assert!(kinds.contains(&"event".to_string()), "the event stays: {timeline:#?}");
    assert!(kinds.contains(&"note".to_string()), "the note stays: {timeline:#?}");

    // Later events for the new address land on the same lead.
    app.post_event(&event("lead.captured", "ed.new@example.com")).await;
    wait_until("the second event is stored", DEADLINE, || async {
        app.count(&format!("SELECT count(*) FROM events WHERE lead_id = {id}"))
            .await
            == 2
    })
    .await;
}

#[tokio::test]
async fn a_merge_moves_timeline_inquiries_notes_and_score_to_the_survivor_and_deletes_the_other() {
    let app = TestApp::spawn().await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    let survivor = create(
        &api,
        json!({"email": "fay@example.com", "first_name": "Fay", "tags": ["vip"], "inquiry": {"product_sku": "TR-2"}}),
    )
    .await;
    let other = create(
        &api,
        json!({"email": "fay.work@example.com", "last_name": "Lind", "city": "Malmö", "tags": ["b2b"],
               "inquiry": {"product_sku": "HK-9"}}),
    )
    .await;
    // Both asked about TR-2: one inquiry remains.
    api.post(
        "/v1/leads",
        &json!({"email": "fay.work@example.com", "inquiry": {"product_sku": "TR-2", "product_name": "Trail Runner 2"}}),
    )
    .await
    .expect(200);
    let mut captured = event("lead.captured", "fay.work@example.com");
    for name in ["first_name", "last_name"] {
        captured["data"].as_object_mut().map(|d| d.remove(name));
    }
    app.post_event(&captured).await;
    wait_until("the event is stored", DEADLINE, || async {
        app.count(&format!("SELECT count(*) FROM events WHERE lead_id = {other}"))
            .await
            == 1
    })
    .await;
    api.post(&format!("/v1/leads/{other}/notes"), &json!({"body": "met at the fair"}))
        .await
        .expect(201);
    {
        let db = app.db().await;
        db.execute("UPDATE leads SET score = 7 WHERE id = $1", &[&other])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        db.execute("UPDATE leads SET score = 5 WHERE id = $1", &[&survivor])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    api.post(&format!("/v1/leads/{survivor}/merge"), &json!({"from": survivor}))
        .await
        .problem(400, "from");
    let merged = api
        .post(&format!("/v1/leads/{survivor}/merge"), &json!({"from": other}))
        .await
        .expect(200);
    let kept = &merged["lead"];
    assert_eq!(kept["email"], json!("fay@example.com"));
    assert_eq!(kept["first_name"], json!("Fay"));
    assert_eq!(
        kept["last_name"],
        json!("Lind"),
        "empty fields are filled from the other"
    );
    assert_eq!(kept["city"], json!("Malmö"));
    assert_eq!(kept["tags"], json!(["vip", "b2b"]));
    assert_eq!(kept["score"].as_f64(), Some(12.0), "scores add up: {kept:#}");

    api.get(&format!("/v1/leads/{other}")).await.refused(404);
    let shown = lead(&api, survivor).await;
    let inquiries = shown["inquiries"].as_array().cloned().unwrap_or_default();
    let skus: Vec<&str> = inquiries.iter().filter_map(|i| i["product_sku"].as_str()).collect();
    assert_eq!(skus, ["TR-2", "HK-9"], "{shown:#}");
    assert_eq!(inquiries[0]["product_name"], json!("Trail Runner 2"));

    let timeline = whole_timeline(&api, survivor, 50).await;
    let kinds = kinds(&timeline);
    for kind in ["merge", "event", "note", "score"] {
        assert!(kinds.contains(&kind.to_string()), "{kind} moved: {timeline:#?}");
    }
    let notes = api.get(&format!("/v1/leads/{survivor}/notes")).await.expect(200);
    assert_eq!(notes["items"][0]["body"], json!("met at the fair"));
    let left = app
        .count(&format!("SELECT count(*) FROM lead_changes WHERE lead_id = {other}"))
        .await;
    assert_eq!(left, 0);
}

#[tokio::test]
async fn a_suspended_lead_gets_no_more_email_shows_it_and_only_an_admin_lifts_it() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    let writer = ApiClient::with_scope(&app, Scope::Write).await;
    let admin = ApiClient::with_scope(&app, Scope::Admin).await;
    let email = "gus@example.com";
    app.post_event(&event("checkout.abandoned", email)).await;
    app.smtp.wait_for_to(email, 1, DEADLINE).await;
    let id = lead_id_of(&app, email).await;
    let rows = app.deliveries(email).await;
    assert!(
        rows.iter().any(|r| r.state == "pending"),
        "an open follow-up: {rows:#?}"
    );

    writer
        .post(&format!("/v1/leads/{id}/suspend"), &json!({}))
        .await
        .problem(400, "reason");
    let suspended = writer
        .post(&format!("/v1/leads/{id}/suspend"), &json!({"reason": "chargeback"}))
        .await
        .expect(200);
    assert_eq!(suspended["lead"]["consent"]["suspended"]["reason"], json!("chargeback"));
    assert_eq!(suspended["lead"]["consent"]["mailable"], json!(false));
    let rows = app.deliveries(email).await;
    assert!(
        rows.iter().all(|r| r.state != "pending")
            && rows
                .iter()
                .any(|r| r.state == "cancelled" && r.reason.as_deref() == Some("suspended")),
        "the open follow-ups are cancelled: {rows:#?}"
    );
    let shown = lead(&writer, id).await;
    assert_eq!(shown["lead"]["consent"]["suspended"]["reason"], json!("chargeback"));
    assert_eq!(shown["inquiries"][0]["follow_up_status"], json!("stopped"), "{shown:#}");

    // An edit does not clear it; a write key cannot lift it.
    writer
        .patch(&format!("/v1/leads/{id}"), &json!({"city": "Bergen"}))
        .await
        .expect(200);
    assert!(!lead(&writer, id).await["lead"]["consent"]["suspended"].is_null());
    writer
        .post(&format!("/v1/leads/{id}/unsuspend"), &json!({"reason": "sorted out"}))
        .await
        .refused(403);
    let timeline = whole_timeline(&writer, id, 50).await;
    assert!(kinds(&timeline).contains(&"suspended".to_string()), "{timeline:#?}");

    let lifted = admin
        .post(
            &format!("/v1/leads/{id}/unsuspend"),
            &json!({"reason": "chargeback reversed"}),
        )
        .await
        .expect(200);
    assert!(lifted["lead"]["consent"]["suspended"].is_null(), "{lifted:#}");
    admin
        .post(&format!("/v1/leads/{id}/unsuspend"), &json!({"reason": "again"}))
        .await
        .refused(404);
}

#[tokio::test]
async fn an_event_about_a_product_opens_an_inquiry_its_follow_up_sets_the_email_status_and_the_timeline_pages() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    let email = "hal@example.com";
    app.post_event(&event("checkout.abandoned", email)).await;
    let id = {
        wait_until("the lead exists", DEADLINE, || async {
            app.count("SELECT count(*) FROM leads").await == 1
        })
        .await;
        lead_id_of(&app, email).await
    };
    let shown = lead(&api, id).await;
    assert_eq!(shown["lead"]["original_source"], json!("checkout"), "{shown:#}");
    assert_eq!(shown["lead"]["original_source_category"], json!("shop"));
    let inquiry = &shown["inquiries"][0];
    assert_eq!(inquiry["product_sku"], json!("TR-2"), "{shown:#}");
    assert_eq!(inquiry["product_name"], json!("Trail Runner 2"));
    assert_eq!(inquiry["lead_source"], json!("checkout.abandoned"));

    app.smtp.wait_for_to(email, 1, DEADLINE).await;
    wait_until("the inquiry shows the sent follow-up", DEADLINE, || async {
        let shown = lead(&api, id).await;
        shown["inquiries"][0]["email_status"] == "sent"
    })
    .await;
    let shown = lead(&api, id).await;
    assert_eq!(shown["inquiries"][0]["status"], json!("Follow-up"), "{shown:#}");
    assert_eq!(shown["inquiries"][0]["follow_up_status"], json!("in progress"));
    assert_eq!(shown["inquiries"].as_array().map(Vec::len), Some(1));

    api.post(&format!("/v1/leads/{id}/notes"), &json!({"body": "asked about sizes"}))
        .await
        .expect(201);
    let first_page = api.get(&format!("/v1/leads/{id}/timeline?limit=2")).await.expect(200);
    assert_eq!(
        first_page["items"][0]["kind"],
        json!("note"),
        "newest first: {first_page:#}"
    );
    assert!(first_page["next_cursor"].is_string(), "{first_page:#}");

    let all = whole_timeline(&api, id, 2).await;
    let kinds = kinds(&all);
    for kind in ["note", "email sent", "enrolled", "event"] {
        assert!(kinds.contains(&kind.to_string()), "{kind}: {all:#?}");
    }
    let times: Vec<&str> = all.iter().filter_map(|i| i["at"].as_str()).collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted, "newest first across pages");
    let one_page = whole_timeline(&api, id, 500).await;
    assert_eq!(all, one_page, "pages hold every entry once");
    api.get(&format!("/v1/leads/{id}/timeline?cursor=nonsense"))
        .await
        .problem(400, "cursor");
}

#[tokio::test]
async fn an_order_completes_the_inquiry_its_follow_up_was_about() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    let api = ApiClient::with_scope(&app, Scope::Read).await;
    let email = "ida@example.com";
    let mut checkout = event("checkout.abandoned", email);
    checkout["data"]["checkout_id"] = json!("c-9");
    app.post_event(&checkout).await;
    app.smtp.wait_for_to(email, 1, DEADLINE).await;
    let id = lead_id_of(&app, email).await;

    let mut order = event("order.completed", email);
    order["data"]["checkout_id"] = json!("c-9");
    order["data"]["order_id"] = json!("o-77");
    app.post_event(&order).await;
    wait_until("the order completes the inquiry", DEADLINE, || async {
        lead(&api, id).await["inquiries"][0]["processed_order"] == "o-77"
    })
    .await;
    let shown = lead(&api, id).await;
    let inquiry = &shown["inquiries"][0];
    assert_eq!(inquiry["subject"], json!("checkout:c-9"), "{shown:#}");
    assert_eq!(inquiry["status"], json!("Completed"));
    assert_eq!(inquiry["email_status"], json!("sent"));
    wait_until("the follow-up is completed", DEADLINE, || async {
        lead(&api, id).await["inquiries"][0]["follow_up_status"] == "completed"
    })
    .await;
    assert_eq!(
        lead(&api, id).await["inquiries"].as_array().map(Vec::len),
        Some(1),
        "the order is about the same checkout"
    );
    let timeline = whole_timeline(&api, id, 50).await;
    assert!(kinds(&timeline).contains(&"order".to_string()), "{timeline:#?}");
}

#[tokio::test]
async fn a_bounced_follow_up_shows_as_the_inquirys_email_status_and_on_the_timeline() {
    let app = TestApp::builder().variant("long-second-step").spawn().await;
    let api = ApiClient::with_scope(&app, Scope::Read).await;
    let email = "lou@example.net";
    app.post_event(&event("checkout.abandoned", email)).await;
    let message = app.smtp.wait_for_to(email, 1, DEADLINE).await.remove(0);
    let delivery = message
        .delivery_id()
        .unwrap_or_else(|| panic!("no X-Leadflow-Delivery header in {message}"));
    app.wait_for_deliveries(email, "step 1 is recorded as sent", |rows| {
        rows.iter().any(|r| r.id == delivery && r.state == "sent")
    })
    .await;
    let id = lead_id_of(&app, email).await;

    // A real MTA's report (shared/tests/dsn), rewritten to be about this follow-up, as tests/bounces.rs does.
    let ring = Keyring::parse(TEST_TOKEN_KEYS).unwrap_or_else(|e| panic!("test keys: {e}"));
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/tests/dsn/postfix-user-unknown.msg");
    let report = std::fs::read_to_string(&sample)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", sample.display()))
        .replace(
            "t1.NDI.AAAAAAAAAAAAAAAAAAAAAA",
            &ring.sign(Purpose::Bounce, &delivery.to_string()),
        )
        .replace(
            "t1.ZDo0Mg.BBBBBBBBBBBBBBBBBBBBBB",
            &ring.sign(Purpose::Unsubscribe, &format!("d:{delivery}")),
        )
        .replace("ann.lee@example.net", email)
        .replace("X-Leadflow-Delivery: 42", &format!("X-Leadflow-Delivery: {delivery}"));
    let answer = reqwest::Client::new()
        .post(app.url("/v1/bounces"))
        .header(reqwest::header::CONTENT_TYPE, "message/rfc822")
        .body(report)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST /v1/bounces failed: {e}"));
    assert_eq!(answer.status().as_u16(), 202);

    wait_until("the inquiry shows the bounce", DEADLINE, || async {
        lead(&api, id).await["inquiries"][0]["email_status"] == "bounced"
    })
    .await;
    let shown = lead(&api, id).await;
    assert_eq!(shown["inquiries"][0]["follow_up_status"], json!("stopped"), "{shown:#}");
    assert!(!shown["lead"]["consent"]["invalid_email"].is_null(), "{shown:#}");
    let kinds = kinds(&whole_timeline(&api, id, 50).await);
    for kind in ["email sent", "email bounced", "bounced", "enrollment ended"] {
        assert!(kinds.contains(&kind.to_string()), "{kind} in {kinds:?}");
    }
}

#[tokio::test]
async fn an_unsubscribed_lead_cannot_be_suspended_on_top_and_unsuspend_does_not_resubscribe_it() {
    let app = TestApp::spawn_with(&[Component::Api], &[]).await;
    let writer = ApiClient::with_scope(&app, Scope::Write).await;
    let admin = ApiClient::with_scope(&app, Scope::Admin).await;
    let id = create(&writer, json!({"email": "jo@example.com"})).await;
    admin
        .post(
            "/v1/admin/suppressions",
            &json!({"email": "jo@example.com", "reason": "unsubscribed", "note": "asked by phone"}),
        )
        .await
        .expect(201);
    writer
        .post(&format!("/v1/leads/{id}/suspend"), &json!({"reason": "fraud"}))
        .await
        .problem(409, "reason");
    admin
        .post(&format!("/v1/leads/{id}/unsuspend"), &json!({"reason": "oops"}))
        .await
        .problem(409, "reason");
    let shown = lead(&writer, id).await;
    assert!(!shown["lead"]["consent"]["unsubscribed"].is_null(), "{shown:#}");
    assert_eq!(shown["lead"]["consent"]["mailable"], json!(false));
}

/// Runs `leadflow <args>` and insists that it succeeds; returns its output.
async fn run(app: &TestApp, key: &str, args: &[&str]) -> String {
    let (ok, out, err) = leadflow(app, key, args).await;
    assert!(ok, "leadflow {args:?} failed: {out}{err}");
    out
}

/// Runs `leadflow <args>` against the test's API with `key`; returns (success, stdout, stderr).
async fn leadflow(app: &TestApp, key: &str, args: &[&str]) -> (bool, String, String) {
    app.run_leadflow(LEADFLOW, Some(key), args).await
}

#[tokio::test]
async fn the_command_line_creates_edits_notes_suspends_and_shows_the_timeline() {
    let app = TestApp::spawn_with(&[Component::Api], &[]).await;
    let writer = ApiClient::with_scope(&app, Scope::Write).await;
    let key = writer.key().unwrap_or_default().to_string();
    let out = run(
        &app,
        &key,
        &[
            "leads",
            "create",
            "kim@example.com",
            "--set",
            "city=Turku",
            "--product",
            "TR-2",
        ],
    )
    .await;
    assert!(out.contains("created") && out.contains("inquiry"), "{out}");
    let id = lead_id_of(&app, "kim@example.com").await.to_string();
    let id = id.as_str();
    let out = run(&app, &key, &["leads", "create", "kim@example.com", "--product", "HK-9"]).await;
    assert!(out.contains("already existed"), "{out}");
    run(
        &app,
        &key,
        &[
            "leads",
            "update",
            id,
            "--set",
            "status=Inactive",
            "--set",
            "tags=vip,b2b",
        ],
    )
    .await;
    run(&app, &key, &["leads", "note", id, "prefers mornings"]).await;
    let notes = run(&app, &key, &["leads", "note", id]).await;
    assert!(notes.contains("prefers mornings"), "{notes}");
    run(&app, &key, &["leads", "suspend", id, "--reason", "asked for a pause"]).await;
    let shown = run(&app, &key, &["leads", "get", id]).await;
    for expected in [
        "Turku",
        "Inactive",
        "vip,b2b",
        "suspended",
        "asked for a pause",
        "TR-2",
        "HK-9",
    ] {
        assert!(shown.contains(expected), "{expected} in {shown}");
    }
    let timeline = run(&app, &key, &["leads", "timeline", id]).await;
    for expected in ["note", "profile update", "suspended", "created", "inquiry"] {
        assert!(timeline.contains(expected), "{expected} in {timeline}");
    }
    let (ok, out, err) = leadflow(&app, &key, &["leads", "unsuspend", id, "--reason", "back"]).await;
    assert!(!ok, "a write key cannot lift a suspension: {out}{err}");
}
