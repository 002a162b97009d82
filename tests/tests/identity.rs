//! A deployment keyed on customer ids (`LEADFLOW_IDENTITY_KEY=customer_id`): events, `POST /v1/leads` and imports
//! find the lead by its customer id, its email follows the customer's latest address (keeping the lead's history
//! and opt-outs), and anything without a customer id, or with an address another customer's lead holds, is refused
//! naming the field. Email mode is covered by the other lead tests, which run with the default.

use serde_json::{json, Value};

use leadflow::api::keys::Scope;
use leadflow_shared::domain::EmailAddress;
use leadflow_shared::suppression::{self, Reason};
use leadflow_shared::topology::WorkQueue;
use leadflow_tests::{event, wait_until, with_query, Answer, ApiClient, TestApp, DEADLINE};

async fn keyed_on_customer_id() -> TestApp {
    TestApp::builder()
        .env("LEADFLOW_IDENTITY_KEY", "customer_id")
        .spawn()
        .await
}

/// An event of `customer_id` with `email`.
fn customer_event(event_type: &str, customer_id: &str, email: &str) -> Value {
    let mut event = event(event_type, email);
    event["data"]["customer_id"] = json!(customer_id);
    event
}

/// (id, email) of every lead with `customer_id`.
async fn leads_of(app: &TestApp, customer_id: &str) -> Vec<(i64, String)> {
    app.db()
        .await
        .query(
            "SELECT id, email FROM leads WHERE customer_id = $1 ORDER BY id",
            &[&customer_id],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to read the leads of {customer_id}: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn email(raw: &str) -> EmailAddress {
    EmailAddress::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"))
}

#[tokio::test]
async fn two_events_of_one_customer_with_different_emails_are_one_lead_with_the_newer_email() {
    let app = keyed_on_customer_id().await;
    app.post_event(&customer_event("checkout.abandoned", "C-100", "ann@old.example"))
        .await;
    let first = leads_of(&app, "C-100").await;
    let [(lead_id, ref first_email)] = first[..] else {
        panic!("the customer's first event makes one lead: {first:?}");
    };
    assert_eq!(first_email, "ann@old.example");
    // Ann unsubscribed with her old address; the opt-out must follow her to the new one.
    suppression::suppress(
        &app.db().await,
        &email("ann@old.example"),
        Reason::Unsubscribed,
        "test",
        None,
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("failed to suppress: {e:#}"));

    app.post_event(&customer_event("lead.updated", "C-100", "Ann@New.example"))
        .await;

    assert_eq!(
        leads_of(&app, "C-100").await,
        vec![(lead_id, "ann@new.example".to_string())],
        "the same lead, with the newer (normalised) email"
    );
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 1);
    assert_eq!(
        app.count(&format!("SELECT count(*) FROM events WHERE lead_id = {lead_id}"))
            .await,
        2,
        "both events are on the customer's one lead"
    );
    let change: Value = app
        .db()
        .await
        .query_one(
            "SELECT changes FROM lead_changes WHERE lead_id = $1 AND kind = 'email'",
            &[&lead_id],
        )
        .await
        .unwrap_or_else(|e| panic!("the email change is not logged: {e}"))
        .get(0);
    assert_eq!(
        change,
        json!({"email": {"from": "ann@old.example", "to": "ann@new.example"}})
    );
    assert_eq!(
        suppression::suppressed_reason(&app.db().await, &email("ann@new.example"), None)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
            .as_deref(),
        Some("unsubscribed"),
        "an opt-out of the old address holds for the new one"
    );

    // A repeat of an event already stored (same source and id) changes nothing, not even the email.
    let mut repeat = customer_event("checkout.abandoned", "C-100", "ann@old.example");
    let first_id: String = app
        .db()
        .await
        .query_one(
            "SELECT event_id FROM events WHERE lead_id = $1 AND type = 'checkout.abandoned'",
            &[&lead_id],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .get(0);
    repeat["id"] = json!(first_id);
    app.post_event(&repeat).await;
    assert_eq!(leads_of(&app, "C-100").await[0].1, "ann@new.example");
    assert_eq!(
        app.count(&format!("SELECT count(*) FROM events WHERE lead_id = {lead_id}"))
            .await,
        2
    );
}

#[tokio::test]
async fn an_event_without_a_customer_id_is_refused_naming_the_field_over_http_and_amqp() {
    let app = keyed_on_customer_id().await;
    let without = event("checkout.abandoned", "nocustomer@example.com");
    Answer::read(app.post_events(&without).await)
        .await
        .problem(400, "/data/customer_id");
    let batch = json!([
        customer_event("checkout.abandoned", "C-1", "one@example.com"),
        without.clone()
    ]);
    let problem = Answer::read(app.post_events(&batch).await)
        .await
        .problem(400, "/1/data/customer_id");
    assert_eq!(problem["index"], 1);
    assert_eq!(
        app.count("SELECT count(*) FROM leads").await,
        0,
        "nothing of a refused batch is stored"
    );

    app.publish_event("checkout.abandoned", without.to_string().as_bytes())
        .await;
    let dead = app.wait_for_dead_letters(WorkQueue::IngestEvents, 1).await;
    let reason = dead[0].1.clone().unwrap_or_default();
    assert!(reason.contains("/data/customer_id"), "{reason}");
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 0);
}

#[tokio::test]
async fn an_event_with_an_email_another_customers_lead_holds_is_refused_naming_the_email() {
    let app = keyed_on_customer_id().await;
    app.post_event(&customer_event("checkout.abandoned", "C-1", "shared@example.com"))
        .await;
    app.post_event(&customer_event("checkout.abandoned", "C-2", "bob@example.com"))
        .await;
    let events_before = app.count("SELECT count(*) FROM events").await;

    let taken = customer_event("lead.updated", "C-2", "shared@example.com");
    Answer::read(app.post_events(&taken).await)
        .await
        .problem(409, "/data/email");
    assert_eq!(leads_of(&app, "C-2").await[0].1, "bob@example.com");
    assert_eq!(leads_of(&app, "C-1").await[0].1, "shared@example.com");
    assert_eq!(app.count("SELECT count(*) FROM events").await, events_before);

    // Over AMQP the message goes to the dead-letter queue, and the messages around it are stored.
    let fine = customer_event("lead.updated", "C-3", "carl@example.com");
    app.publish_event("lead.updated", taken.to_string().as_bytes()).await;
    app.publish_event("lead.updated", fine.to_string().as_bytes()).await;
    let dead = app.wait_for_dead_letters(WorkQueue::IngestEvents, 1).await;
    let reason = dead[0].1.clone().unwrap_or_default();
    assert!(reason.starts_with("/data/email: "), "{reason}");
    wait_until("the good message is stored", DEADLINE, || async {
        !leads_of(&app, "C-3").await.is_empty()
    })
    .await;
    assert_eq!(leads_of(&app, "C-2").await[0].1, "bob@example.com");
}

#[tokio::test]
async fn a_lead_with_the_email_and_no_customer_id_yet_becomes_the_customers() {
    let app = keyed_on_customer_id().await;
    // A lead from before the deployment keyed on customer ids.
    let legacy: i64 = app
        .db()
        .await
        .query_one(
            "INSERT INTO leads (email) VALUES ('legacy@example.com') RETURNING id",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .get(0);
    app.post_event(&customer_event("checkout.abandoned", "C-7", "legacy@example.com"))
        .await;
    assert_eq!(
        leads_of(&app, "C-7").await,
        vec![(legacy, "legacy@example.com".to_string())]
    );
}

#[tokio::test]
async fn post_v1_leads_finds_the_lead_by_customer_id_and_follows_its_email() {
    let app = keyed_on_customer_id().await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    let created = api
        .post(
            "/v1/leads",
            &json!({"email": "dora@old.example", "customer_id": "C-9", "first_name": "Dora"}),
        )
        .await
        .expect(201);
    assert_eq!(created["existed"], false);
    let id = created["lead"]["id"].as_i64().expect("an id");
    assert_eq!(created["lead"]["customer_id"], "C-9");

    let again = api
        .post(
            "/v1/leads",
            &json!({"email": "dora@new.example", "customer_id": "C-9", "city": "Lisbon"}),
        )
        .await
        .expect(200);
    assert_eq!(again["existed"], true);
    assert_eq!(again["lead"]["id"], id);
    assert_eq!(again["lead"]["email"], "dora@new.example");
    assert_eq!(again["lead"]["first_name"], "Dora");
    assert_eq!(again["lead"]["city"], "Lisbon");
    assert_eq!(leads_of(&app, "C-9").await, vec![(id, "dora@new.example".into())]);
    let timeline = api.get(&format!("/v1/leads/{id}/timeline")).await.expect(200);
    let kinds: Vec<&str> = timeline["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|item| item["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"email change"), "{timeline:#}");

    api.post("/v1/leads", &json!({"email": "nokey@example.com"}))
        .await
        .problem(400, "customer_id");
    api.post("/v1/leads", &json!({"email": "nokey@example.com", "customer_id": "  "}))
        .await
        .problem(400, "customer_id");
    api.post(
        "/v1/leads",
        &json!({"email": "dora@new.example", "customer_id": "C-10"}),
    )
    .await
    .problem(409, "email");
    api.patch(&format!("/v1/leads/{id}"), &json!({"customer_id": null}))
        .await
        .problem(400, "customer_id");
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 1);
}

/// Uploads a CSV file, waits for its job to end and returns the job.
async fn import_csv(api: &ApiClient, csv: &str) -> Value {
    let queued = api
        .upload(
            &with_query("/v1/imports", &[("format", "csv")]),
            "text/csv",
            csv.as_bytes().to_vec(),
        )
        .await
        .expect(202);
    let id = queued["id"].as_i64().expect("the job has an id");
    api.wait_for_import(id).await
}

#[tokio::test]
async fn an_import_upserts_by_customer_id_and_refuses_a_row_without_one() {
    let app = keyed_on_customer_id().await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    let first = import_csv(
        &api,
        "Email,Customer ID,City\neve@old.example,C-21,Berlin\nnokey@example.com,,Rome\nfred@example.com,C-22,Oslo\n",
    )
    .await;
    assert_eq!(first["state"], "done", "{first:#}");
    assert_eq!(
        (first["rows_created"].as_i64(), first["rows_rejected"].as_i64()),
        (Some(2), Some(1)),
        "{first:#}"
    );
    let errors = api
        .get(&format!("/v1/imports/{}/errors", first["id"]))
        .await
        .expect(200);
    assert_eq!(errors["items"][0]["line"], 3, "{errors:#}");
    assert_eq!(errors["items"][0]["field"], "customer_id", "{errors:#}");
    let eve = match leads_of(&app, "C-21").await[..] {
        [(eve, _)] => eve,
        ref other => panic!("one lead for C-21, got {other:?}"),
    };

    // Re-importing upserts by customer id: Eve's lead takes her new address and city.
    let second = import_csv(&api, "Email,Customer ID,City\neve@new.example,C-21,Paris\n").await;
    assert_eq!(
        (second["rows_created"].as_i64(), second["rows_updated"].as_i64()),
        (Some(0), Some(1)),
        "{second:#}"
    );
    assert_eq!(leads_of(&app, "C-21").await, vec![(eve, "eve@new.example".into())]);
    let lead = api.get(&format!("/v1/leads/{eve}")).await.expect(200);
    assert_eq!(lead["lead"]["city"], "Paris");
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 2);

    // An address another customer's lead holds is refused on its line, naming the email.
    let third = import_csv(&api, "Email,Customer ID\nfred@example.com,C-21\n").await;
    assert_eq!(third["rows_rejected"], 1, "{third:#}");
    let errors = api
        .get(&format!("/v1/imports/{}/errors", third["id"]))
        .await
        .expect(200);
    assert_eq!(errors["items"][0]["field"], "email", "{errors:#}");

    // A sheet with no customer id column cannot be imported at all.
    let keyless = import_csv(&api, "Email,City\ngina@example.com,Rome\n").await;
    assert_eq!(keyless["state"], "failed", "{keyless:#}");
    assert!(
        keyless["error"].as_str().is_some_and(|e| e.contains("customer id")),
        "{keyless:#}"
    );
}
