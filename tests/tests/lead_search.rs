//! Lead search, lists and segments end to end, over the HTTP API against real PostgreSQL: each filter returns
//! exactly the leads it should, sort orders with their tiebreak, cursor pages that cover every lead once, bad
//! filters and limits named in a 400, static lists and segments with their members, a campaign whose audience is
//! a segment enrolling only matching leads through the real pipeline, and a list in use refused deletion.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use leadflow::api::keys::Scope;
use leadflow::Component;
use leadflow_tests::{event, wait_until, ApiClient, TestApp, DEADLINE};

const LEADFLOW: &str = env!("CARGO_BIN_EXE_leadflow-under-test");

/// One seeded lead: the columns the filters read.
struct Seed {
    email: &'static str,
    first: &'static str,
    last: &'static str,
    city: Option<&'static str>,
    company: Option<&'static str>,
    phones: &'static [&'static str],
    tags: &'static [&'static str],
    agent: Option<&'static str>,
    source: Option<&'static str>,
    status: &'static str,
    profession: Option<&'static str>,
    address: Option<&'static str>,
    region: Option<&'static str>,
    district: Option<&'static str>,
    division: Option<&'static str>,
    country: Option<&'static str>,
    language: Option<&'static str>,
    score: f64,
    temperature: &'static str,
    is_customer: bool,
    do_not_call: bool,
    created: &'static str,
    updated: &'static str,
}

const BASE: Seed = Seed {
    email: "",
    first: "",
    last: "",
    city: None,
    company: None,
    phones: &[],
    tags: &[],
    agent: None,
    source: None,
    status: "Active",
    profession: None,
    address: None,
    region: None,
    district: None,
    division: None,
    country: None,
    language: None,
    score: 0.0,
    temperature: "cold",
    is_customer: false,
    do_not_call: false,
    created: "2026-03-01T00:00:00Z",
    updated: "2026-03-01T00:00:00Z",
};

/// Ten leads that differ in every filtered column; the last five share their creation time and score, so ties
/// are broken by id.
fn seeds() -> Vec<Seed> {
    vec![
        Seed {
            email: "anna@acme.test",
            first: "Anna",
            last: "Schmidt",
            city: Some("Berlin"),
            company: Some("Acme GmbH"),
            phones: &["+49 (30) 123-4567"],
            tags: &["vip", "fair"],
            agent: Some("Mia"),
            source: Some("Google"),
            profession: Some("Engineer"),
            address: Some("Hauptstrasse 5"),
            region: Some("Brandenburg"),
            district: Some("Mitte"),
            division: Some("North"),
            country: Some("DE"),
            language: Some("de-DE"),
            score: 42.0,
            temperature: "hot",
            is_customer: true,
            created: "2026-01-05T10:00:00Z",
            updated: "2026-02-01T00:00:00Z",
            ..BASE
        },
        Seed {
            email: "bob@initech.test",
            first: "Bob",
            last: "Stone",
            city: Some("Munich"),
            company: Some("Initech"),
            phones: &["+49 89 555"],
            tags: &["vip"],
            agent: Some("Tom"),
            source: Some("Bing"),
            profession: Some("Designer"),
            address: Some("Marienplatz 1"),
            region: Some("Bavaria"),
            district: Some("Altstadt"),
            division: Some("South"),
            country: Some("DE"),
            language: Some("de-AT"),
            score: 12.0,
            temperature: "warm",
            do_not_call: true,
            created: "2026-01-10T08:00:00Z",
            updated: "2026-01-10T08:00:00Z",
            ..BASE
        },
        Seed {
            email: "carla@acme.test",
            first: "Carla",
            last: "Schmidtke",
            city: Some("berlin"),
            company: Some("Acme Corp"),
            agent: Some("Mia"),
            source: Some("import"),
            status: "Inactive",
            profession: Some("engineer"),
            country: Some("FR"),
            language: Some("fr"),
            score: 3.0,
            created: "2026-01-20T12:00:00Z",
            updated: "2026-03-05T00:00:00Z",
            ..BASE
        },
        Seed {
            email: "dan@example.test",
            first: "Dan",
            last: "Brown",
            city: Some("Paris"),
            phones: &["0033 1 22 33"],
            tags: &["fair"],
            source: Some("web form"),
            profession: Some("Teacher"),
            country: Some("FR"),
            language: Some("fr"),
            score: 60.0,
            temperature: "hot",
            created: "2026-02-01T00:00:00Z",
            updated: "2026-02-02T00:00:00Z",
            ..BASE
        },
        Seed {
            email: "eve@globex.test",
            first: "Eve",
            last: "O'Neil",
            company: Some("Globex 50% Off"),
            source: Some("api"),
            score: -5.0,
            created: "2026-02-15T00:00:00Z",
            updated: "2026-02-15T00:00:00Z",
            ..BASE
        },
        Seed {
            email: "f1@filler.test",
            first: "Fay",
            last: "Adams",
            score: 7.0,
            ..BASE
        },
        Seed {
            email: "f2@filler.test",
            first: "Finn",
            last: "adams",
            score: 7.0,
            ..BASE
        },
        Seed {
            email: "f3@filler.test",
            first: "Flo",
            last: "Zeller",
            score: 7.0,
            ..BASE
        },
        Seed {
            email: "f4@filler.test",
            first: "Fritz",
            last: "Meyer",
            score: 7.0,
            ..BASE
        },
        Seed {
            email: "f5@filler.test",
            first: "Fred",
            last: "Meyer",
            score: 7.0,
            ..BASE
        },
    ]
}

/// Writes the seeds, two inquiries with follow-up data, a campaign with two enrollments, into the test database.
async fn seed(app: &TestApp) {
    let db = app.db().await;
    db.batch_execute("INSERT INTO agents (name) VALUES ('Mia'), ('Tom') ON CONFLICT DO NOTHING")
        .await
        .expect("agents");
    for s in seeds() {
        let phones: Vec<String> = s.phones.iter().map(|p| p.to_string()).collect();
        let tags: Vec<String> = s.tags.iter().map(|t| t.to_string()).collect();
        let created: chrono::DateTime<chrono::Utc> = s.created.parse().expect("created");
        let updated: chrono::DateTime<chrono::Utc> = s.updated.parse().expect("updated");
        db.execute(
            "INSERT INTO leads (email, first_name, last_name, city, company_name, phones, tags, agent, source,
                                original_source, status, profession, address, region, district, division, country,
                                language, score, temperature, is_customer, do_not_call, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
                     $21, $22, $23)",
            &[
                &s.email,
                &s.first,
                &s.last,
                &s.city,
                &s.company,
                &phones,
                &tags,
                &s.agent,
                &s.source,
                &s.status,
                &s.profession,
                &s.address,
                &s.region,
                &s.district,
                &s.division,
                &s.country,
                &s.language,
                &s.score,
                &s.temperature,
                &s.is_customer,
                &s.do_not_call,
                &created,
                &updated,
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("seeding {}: {e}", s.email));
    }
    db.batch_execute(
        "INSERT INTO inquiries (lead_id, subject, follow_up_status, email_status, processed_order)
         SELECT id, 'checkout:a1', 'scheduled', 'sent', NULL FROM leads WHERE email = 'anna@acme.test'
         UNION ALL
         SELECT id, 'checkout:b1', 'stopped', 'bounced', 'o-777' FROM leads WHERE email = 'bob@initech.test'
         UNION ALL
         SELECT id, 'order:d1', 'completed', 'sent', 'o-900' FROM leads WHERE email = 'dan@example.test';
         UPDATE leads SET contact_method = 'Telephone' WHERE email = 'bob@initech.test';
         UPDATE leads SET customer_id = 'C-7' WHERE email = 'eve@globex.test';
         INSERT INTO campaigns (name, status) VALUES ('spring', 'inactive');
         INSERT INTO enrollments (lead_id, campaign_id, subject, status)
         SELECT l.id, c.id, 'manual', 'completed' FROM leads l, campaigns c
          WHERE c.name = 'spring' AND l.email IN ('bob@initech.test', 'carla@acme.test');",
    )
    .await
    .expect("inquiries and enrollments");
}

/// `?k=v&...`, each part encoded.
fn query(pairs: &[(&str, &str)]) -> String {
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        out.append_pair(k, v);
    }
    format!("?{}", out.finish())
}

fn emails_of(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {page:#}"))
        .iter()
        .map(|l| l["email"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Query parameters in order.
type Pairs<'a> = Vec<(&'a str, &'a str)>;

/// The emails one page of the search finds (at most 500).
async fn found(api: &ApiClient, pairs: &[(&str, &str)]) -> BTreeSet<String> {
    let mut all = pairs.to_vec();
    all.push(("limit", "500"));
    let page = api.get(&format!("/v1/leads{}", query(&all))).await.expect(200);
    assert!(page["next_cursor"].is_null(), "one page holds them all: {page:#}");
    emails_of(&page).into_iter().collect()
}

fn set(emails: &[&str]) -> BTreeSet<String> {
    emails.iter().map(|e| e.to_string()).collect()
}

/// Every lead the search finds, following the cursor with `limit` per page; asserts each page's size.
async fn every_page(api: &ApiClient, path: &str, pairs: &[(&str, &str)], limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..50 {
        let mut all: Vec<(&str, &str)> = pairs.to_vec();
        let limit_text = limit.to_string();
        all.push(("limit", &limit_text));
        if let Some(c) = &cursor {
            all.push(("cursor", c));
        }
        let page = api.get(&format!("{path}{}", query(&all))).await.expect(200);
        let emails = emails_of(&page);
        assert!(emails.len() <= limit, "a page holds at most the limit: {page:#}");
        out.extend(emails);
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return out,
        }
    }
    panic!("the cursor never ended");
}

#[tokio::test]
async fn each_filter_returns_exactly_the_leads_it_describes() {
    let app = TestApp::spawn().await;
    seed(&app).await;
    let api = ApiClient::with_scope(&app, Scope::Read).await;
    let fillers = [
        "f1@filler.test",
        "f2@filler.test",
        "f3@filler.test",
        "f4@filler.test",
        "f5@filler.test",
    ];

    let cases: Vec<(Pairs, Vec<&str>)> = vec![
        (
            vec![("created_from", "2026-01-10"), ("created_to", "2026-01-20")],
            vec!["bob@initech.test", "carla@acme.test"],
        ),
        (vec![("created_to", "2026-01-10T07:59:59Z")], vec!["anna@acme.test"]),
        (
            vec![
                ("created_from", "2026-02-15T00:00:00+00:00"),
                ("created_to", "2026-02-28"),
            ],
            vec!["eve@globex.test"],
        ),
        (vec![("updated_from", "2026-03-02")], vec!["carla@acme.test"]),
        (vec![("updated_to", "2026-01-31")], vec!["bob@initech.test"]),
        (vec![("name", "schmidt")], vec!["anna@acme.test", "carla@acme.test"]),
        (vec![("name", "Anna Schm")], vec!["anna@acme.test"]),
        (vec![("name", "o'neil")], vec!["eve@globex.test"]),
        (vec![("email", "ANNA@acme.test")], vec!["anna@acme.test"]),
        (vec![("email", "acme")], vec!["anna@acme.test", "carla@acme.test"]),
        (vec![("phone", "+4930 1234567")], vec!["anna@acme.test"]),
        (vec![("phone", "0033122 33")], vec!["dan@example.test"]),
        (vec![("tag", "vip")], vec!["anna@acme.test", "bob@initech.test"]),
        (vec![("tag", "vip"), ("tag", "fair")], vec!["anna@acme.test"]),
        (vec![("agent", "Mia")], vec!["anna@acme.test", "carla@acme.test"]),
        (vec![("source", "Bing")], vec!["bob@initech.test"]),
        (vec![("original_source", "web form")], vec!["dan@example.test"]),
        (vec![("status", "Inactive")], vec!["carla@acme.test"]),
        (vec![("contact_method", "Telephone")], vec!["bob@initech.test"]),
        (vec![("customer_id", "C-7")], vec!["eve@globex.test"]),
        (
            vec![("profession", "ENGINEER")],
            vec!["anna@acme.test", "carla@acme.test"],
        ),
        (vec![("address", "platz")], vec!["bob@initech.test"]),
        (vec![("city", "Berlin")], vec!["anna@acme.test", "carla@acme.test"]),
        (vec![("region", "bavaria")], vec!["bob@initech.test"]),
        (vec![("district", "Mitte")], vec!["anna@acme.test"]),
        (vec![("division", "South")], vec!["bob@initech.test"]),
        (vec![("country", "fr")], vec!["carla@acme.test", "dan@example.test"]),
        (vec![("company", "acme")], vec!["anna@acme.test", "carla@acme.test"]),
        // LIKE's own characters are taken literally.
        (vec![("company", "50% off")], vec!["eve@globex.test"]),
        (vec![("company", "5_%")], vec![]),
        (
            vec![("score_min", "12"), ("score_max", "42")],
            vec!["anna@acme.test", "bob@initech.test"],
        ),
        (vec![("score_max", "0")], vec!["eve@globex.test"]),
        (vec![("temperature", "hot")], vec!["anna@acme.test", "dan@example.test"]),
        (
            vec![("campaign", "spring")],
            vec!["bob@initech.test", "carla@acme.test"],
        ),
        (vec![("follow_up_status", "stopped")], vec!["bob@initech.test"]),
        (
            vec![("email_status", "sent")],
            vec!["anna@acme.test", "dan@example.test"],
        ),
        (vec![("processed_order", "o-900")], vec!["dan@example.test"]),
        (
            vec![("processed_order", "true")],
            vec!["bob@initech.test", "dan@example.test"],
        ),
        (vec![("q", "berlin")], vec!["anna@acme.test", "carla@acme.test"]),
        (vec![("q", "initech")], vec!["bob@initech.test"]),
        // Every word of q, anywhere in name, email, company and city.
        (vec![("q", "berlin  anna")], vec!["anna@acme.test"]),
        (vec![("q", "acme schmidt")], vec!["anna@acme.test", "carla@acme.test"]),
        (vec![("is_customer", "true")], vec!["anna@acme.test"]),
        (vec![("do_not_call", "yes")], vec!["bob@initech.test"]),
        (vec![("language", "de")], vec!["anna@acme.test", "bob@initech.test"]),
        (vec![("language", "de-AT")], vec!["bob@initech.test"]),
        // Conditions combine: all must hold.
        (
            vec![("city", "berlin"), ("status", "Active"), ("tag", "fair")],
            vec!["anna@acme.test"],
        ),
    ];
    for (pairs, expected) in cases {
        assert_eq!(found(&api, &pairs).await, set(&expected), "filter {pairs:?}");
    }

    let mut active: Vec<&str> = vec![
        "anna@acme.test",
        "bob@initech.test",
        "dan@example.test",
        "eve@globex.test",
    ];
    active.extend(fillers);
    assert_eq!(found(&api, &[("status", "Active")]).await, set(&active));
    let everyone = found(&api, &[]).await;
    assert_eq!(everyone.len(), 10);
    let not_customers = found(&api, &[("is_customer", "false")]).await;
    assert_eq!(not_customers.len(), 9);
    assert!(!not_customers.contains("anna@acme.test"));
}

#[tokio::test]
async fn sort_orders_are_stable_and_cursor_pages_cover_every_lead_once() {
    let app = TestApp::spawn().await;
    seed(&app).await;
    let api = ApiClient::with_scope(&app, Scope::Read).await;

    // Newest first by default; the five fillers share their creation time and come in descending id order.
    let page = api.get("/v1/leads?limit=500").await.expect(200);
    let newest: Vec<String> = emails_of(&page);
    assert_eq!(
        newest,
        vec![
            "f5@filler.test",
            "f4@filler.test",
            "f3@filler.test",
            "f2@filler.test",
            "f1@filler.test",
            "eve@globex.test",
            "dan@example.test",
            "carla@acme.test",
            "bob@initech.test",
            "anna@acme.test"
        ]
    );

    let by_score = api.get("/v1/leads?sort=score:desc&limit=500").await.expect(200);
    let scores: Vec<f64> = by_score["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["score"].as_f64().unwrap())
        .collect();
    assert_eq!(scores, vec![60.0, 42.0, 12.0, 7.0, 7.0, 7.0, 7.0, 7.0, 3.0, -5.0]);

    let by_name = api.get("/v1/leads?sort=last_name&limit=500").await.expect(200);
    let last: Vec<String> = by_name["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["last_name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        last,
        vec![
            "Adams",
            "adams",
            "Brown",
            "Meyer",
            "Meyer",
            "O'Neil",
            "Schmidt",
            "Schmidtke",
            "Stone",
            "Zeller"
        ],
        "case-insensitive, ties by id"
    );

    let by_email = emails_of(&api.get("/v1/leads?sort=email:desc&limit=500").await.expect(200));
    let mut sorted = by_email.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(by_email, sorted);

    // Every sort, pages of 3: each lead exactly once, in the same order as one big page.
    for sort in [
        "created_at:desc",
        "created_at:asc",
        "updated_at:desc",
        "score:desc",
        "score:asc",
        "last_name:asc",
        "last_name:desc",
        "email:asc",
    ] {
        let whole = emails_of(
            &api.get(&format!("/v1/leads{}", query(&[("sort", sort), ("limit", "500")])))
                .await
                .expect(200),
        );
        let paged = every_page(&api, "/v1/leads", &[("sort", sort)], 3).await;
        assert_eq!(paged, whole, "pages of 3 sorted by {sort}");
        assert_eq!(
            paged.iter().collect::<BTreeSet<_>>().len(),
            10,
            "no duplicates by {sort}"
        );
    }

    // Pages of a filtered search stay within the filter.
    let paged = every_page(&api, "/v1/leads", &[("score_min", "7"), ("sort", "score:asc")], 2).await;
    assert_eq!(paged.len(), 8);
}

#[tokio::test]
async fn a_bad_filter_sort_limit_or_cursor_is_a_400_naming_it() {
    let app = TestApp::spawn().await;
    seed(&app).await;
    let api = ApiClient::with_scope(&app, Scope::Read).await;

    api.get("/v1/leads?colour=red").await.problem(400, "colour");
    api.get("/v1/leads?score_min=lots").await.problem(400, "score_min");
    api.get("/v1/leads?created_from=last-week")
        .await
        .problem(400, "created_from");
    api.get("/v1/leads?temperature=tepid").await.problem(400, "temperature");
    api.get("/v1/leads?follow_up_status=later")
        .await
        .problem(400, "follow_up_status");
    api.get("/v1/leads?is_customer=perhaps")
        .await
        .problem(400, "is_customer");
    api.get("/v1/leads?city=a&city=b").await.problem(400, "city");
    api.get("/v1/leads?list=nothing-by-that-name")
        .await
        .problem(400, "list");
    api.get("/v1/leads?sort=shoe_size").await.problem(400, "sort");
    api.get("/v1/leads?limit=501").await.problem(400, "limit");
    api.get("/v1/leads?limit=0").await.problem(400, "limit");
    api.get("/v1/leads?limit=ten").await.problem(400, "limit");
    api.get("/v1/leads?cursor=not-a-cursor").await.problem(400, "cursor");
    // A cursor only continues the sort it came from.
    let page = api.get("/v1/leads?limit=2&sort=score:desc").await.expect(200);
    let cursor = page["next_cursor"].as_str().expect("a next cursor").to_string();
    api.get(&format!(
        "/v1/leads{}",
        query(&[("cursor", &cursor), ("sort", "email")])
    ))
    .await
    .problem(400, "cursor");
    // A value that looks like SQL is only a value.
    let page = api
        .get(&format!("/v1/leads{}", query(&[("city", "x' OR '1'='1")])))
        .await
        .expect(200);
    assert_eq!(emails_of(&page), Vec::<String>::new());
    // Without a key, nothing.
    ApiClient::new(&app, None).get("/v1/leads").await.refused(401);
}

#[tokio::test]
async fn static_lists_and_segments_have_the_right_members() {
    let app = TestApp::spawn().await;
    seed(&app).await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    let ids = found_ids(&api).await;

    let created = api
        .post(
            "/v1/lists",
            &json!({"name": "trade fair", "description": "Met at the fair"}),
        )
        .await;
    assert_eq!(created.location.as_deref(), Some("/v1/lists/trade+fair"));
    let created = created.expect(201);
    assert_eq!(created["kind"], "static");
    assert_eq!(created["member_count"], 0);
    let added = api
        .post(
            "/v1/lists/trade%20fair/members",
            &json!({"lead_ids": [ids["anna@acme.test"], ids["dan@example.test"], ids["anna@acme.test"]]}),
        )
        .await
        .expect(200);
    assert_eq!(added["added"], 2);
    let again = api
        .post(
            "/v1/lists/trade%20fair/members",
            &json!({"lead_ids": [ids["dan@example.test"]]}),
        )
        .await
        .expect(200);
    assert_eq!(again["added"], 0, "a member already in the list is not added twice");
    api.post(
        "/v1/lists/trade%20fair/members",
        &json!({"lead_ids": [ids["dan@example.test"], 999999]}),
    )
    .await
    .problem(400, "lead_ids");
    api.post("/v1/lists", &json!({"name": "trade fair"}))
        .await
        .problem(409, "name");

    let members = every_page(&api, "/v1/lists/trade%20fair/members", &[], 1).await;
    assert_eq!(
        members.into_iter().collect::<BTreeSet<_>>(),
        set(&["anna@acme.test", "dan@example.test"])
    );
    assert_eq!(
        found(&api, &[("list", "trade fair")]).await,
        set(&["anna@acme.test", "dan@example.test"])
    );
    assert_eq!(
        found(&api, &[("list", "trade fair"), ("country", "DE")]).await,
        set(&["anna@acme.test"])
    );

    // A segment: the CLI sends every value as a string.
    let segment = api
        .post(
            "/v1/lists",
            &json!({"name": "hot-berlin", "kind": "segment", "filter": {"temperature": "hot", "city": "Berlin"}}),
        )
        .await
        .expect(201);
    assert_eq!(segment["kind"], "segment");
    assert_eq!(segment["filter"], json!({"temperature": "hot", "city": "Berlin"}));
    let members = api.get("/v1/lists/hot-berlin/members").await.expect(200);
    assert_eq!(emails_of(&members), vec!["anna@acme.test"]);
    // Evaluated when read: Carla warming up joins it.
    app.db()
        .await
        .execute(
            "UPDATE leads SET temperature = 'hot' WHERE email = 'carla@acme.test'",
            &[],
        )
        .await
        .expect("carla is hot");
    let members = every_page(&api, "/v1/lists/hot-berlin/members", &[], 10).await;
    assert_eq!(
        members.into_iter().collect::<BTreeSet<_>>(),
        set(&["anna@acme.test", "carla@acme.test"])
    );
    // A segment over a list.
    api.post(
        "/v1/lists",
        &json!({"filter": {"list": "trade fair", "score_min": 50}, "name": "fair-and-keen"}),
    )
    .await
    .expect(201);
    assert_eq!(
        found(&api, &[("list", "fair-and-keen")]).await,
        set(&["dan@example.test"])
    );

    // What a segment cannot be.
    api.post("/v1/lists", &json!({"name": "bad", "filter": {"temperature": "tepid"}}))
        .await
        .problem(400, "filter.temperature");
    api.post("/v1/lists", &json!({"name": "bad", "filter": {"list": "no-such-list"}}))
        .await
        .problem(400, "filter.list");
    api.post("/v1/lists", &json!({"name": "bad", "kind": "segment"}))
        .await
        .problem(400, "filter");
    api.post(
        "/v1/lists",
        &json!({"name": "bad", "kind": "static", "filter": {"city": "Berlin"}}),
    )
    .await
    .problem(400, "filter");
    api.post(
        "/v1/lists/hot-berlin/members",
        &json!({"lead_ids": [ids["bob@initech.test"]]}),
    )
    .await
    .problem(409, "kind");

    // Listing, reading, removing a member, deleting.
    let lists = api.get("/v1/lists").await.expect(200);
    let names: Vec<&str> = lists["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["fair-and-keen", "hot-berlin", "trade fair"]);
    api.delete(&format!("/v1/lists/trade%20fair/members/{}", ids["dan@example.test"]))
        .await
        .expect(204);
    api.delete(&format!("/v1/lists/trade%20fair/members/{}", ids["dan@example.test"]))
        .await
        .refused(404);
    let fair = api.get("/v1/lists/trade%20fair").await.expect(200);
    assert_eq!(fair["member_count"], 1);
    api.delete("/v1/lists/trade%20fair").await.problem(409, "name");
    api.delete("/v1/lists/fair-and-keen").await.expect(204);
    api.delete("/v1/lists/trade%20fair").await.expect(204);
    api.get("/v1/lists/trade%20fair").await.refused(404);
    api.get("/v1/lists/trade%20fair/members").await.refused(404);

    // A read key reads lists but cannot change them.
    let reader = ApiClient::with_scope(&app, Scope::Read).await;
    reader.get("/v1/lists/hot-berlin/members").await.expect(200);
    reader.post("/v1/lists", &json!({"name": "mine"})).await.refused(403);
}

/// Lead ids by email.
async fn found_ids(api: &ApiClient) -> std::collections::HashMap<String, i64> {
    let page = api.get("/v1/leads?limit=500").await.expect(200);
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["email"].as_str().unwrap().to_string(), l["id"].as_i64().unwrap()))
        .collect()
}

#[tokio::test]
async fn a_campaign_targeting_a_segment_enrolls_only_matching_leads_and_its_list_cannot_be_deleted() {
    let app = TestApp::spawn().await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    api.post("/v1/lists", &json!({"name": "schmidts", "filter": {"name": "schmidt"}}))
        .await
        .expect(201);

    let mut campaign = json!({
        "name": "schmidt-recovery",
        "lead_source": "checkout.abandoned",
        "audience": "nobody-by-that-name",
        "steps": [{"delay": "1h", "template": "cart-reminder"}]
    });
    api.post("/v1/admin/campaigns", &campaign)
        .await
        .problem(400, "audience");
    campaign["audience"] = json!("schmidts");
    let created = api.post("/v1/admin/campaigns", &campaign).await.expect(201);
    assert_eq!(created["audience"], "schmidts");
    assert_eq!(
        api.get("/v1/admin/campaigns/schmidt-recovery").await.expect(200)["audience"],
        "schmidts"
    );

    let mut schmidt = event("checkout.abandoned", "greta@shop.test");
    schmidt["data"]["last_name"] = json!("Schmidt");
    let other = event("checkout.abandoned", "lee@shop.test");
    app.post_event(&json!([schmidt, other])).await;
    wait_until("both events are handled", DEADLINE, || async {
        app.count("SELECT count(*) FROM events WHERE handled_at IS NOT NULL")
            .await
            >= 2
    })
    .await;

    let enrolled = |email: &'static str| {
        let app = &app;
        async move {
            app.db()
                .await
                .query_one(
                    "SELECT count(*) FROM enrollments e JOIN leads l ON l.id = e.lead_id
                       JOIN campaigns c ON c.id = e.campaign_id
                      WHERE l.email = $1 AND c.name = 'schmidt-recovery'",
                    &[&email],
                )
                .await
                .expect("count enrollments")
                .get::<_, i64>(0)
        }
    };
    assert_eq!(enrolled("greta@shop.test").await, 1, "the Schmidt is in the segment");
    assert_eq!(enrolled("lee@shop.test").await, 0, "Lee is not");
    // The campaign filter is not all: the base campaign (no audience) took both.
    assert_eq!(
        app.count(
            "SELECT count(DISTINCT e.lead_id) FROM enrollments e JOIN campaigns c ON c.id = e.campaign_id
              WHERE c.name <> 'schmidt-recovery'"
        )
        .await,
        2
    );
    assert_eq!(
        found(&api, &[("campaign", "schmidt-recovery")]).await,
        set(&["greta@shop.test"])
    );

    // In use: refused, naming the campaign; once the campaign targets everyone, it goes.
    let refused = api.delete("/v1/lists/schmidts").await.problem(409, "name");
    assert!(
        refused["detail"].as_str().unwrap().contains("schmidt-recovery"),
        "{refused:#}"
    );
    campaign.as_object_mut().unwrap().remove("audience");
    let replaced = api
        .put("/v1/admin/campaigns/schmidt-recovery", &campaign)
        .await
        .expect(200);
    assert!(replaced["audience"].is_null(), "{replaced:#}");
    api.delete("/v1/lists/schmidts").await.expect(204);
}

#[tokio::test]
async fn a_campaign_targeting_a_static_list_enrolls_only_its_members() {
    let app = TestApp::spawn().await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    let db = app.db().await;
    for email in ["member@shop.test", "outsider@shop.test"] {
        db.execute("INSERT INTO leads (email) VALUES ($1)", &[&email])
            .await
            .expect("lead");
    }
    let member: i64 = db
        .query_one("SELECT id FROM leads WHERE email = 'member@shop.test'", &[])
        .await
        .expect("member id")
        .get(0);
    api.post("/v1/lists", &json!({"name": "insiders"})).await.expect(201);
    api.post("/v1/lists/insiders/members", &json!({"lead_ids": [member]}))
        .await
        .expect(200);
    api.post(
        "/v1/admin/campaigns",
        &json!({
            "name": "insider-recovery",
            "lead_source": "checkout.abandoned",
            "audience": "insiders",
            "steps": [{"delay": "1h", "template": "cart-reminder"}]
        }),
    )
    .await
    .expect(201);

    app.post_event(&json!([
        event("checkout.abandoned", "member@shop.test"),
        event("checkout.abandoned", "outsider@shop.test")
    ]))
    .await;
    wait_until("both events are handled", DEADLINE, || async {
        app.count("SELECT count(*) FROM events WHERE handled_at IS NOT NULL")
            .await
            >= 2
    })
    .await;
    assert_eq!(
        found(&api, &[("campaign", "insider-recovery")]).await,
        set(&["member@shop.test"])
    );
    api.delete("/v1/lists/insiders").await.problem(409, "name");
}

/// Runs `leadflow <args>` against the test's API with `key`, insisting it succeeds; returns its stdout.
async fn leadflow(app: &TestApp, key: &str, args: &[&str]) -> String {
    let (success, stdout, stderr) = app.run_leadflow(LEADFLOW, Some(key), args).await;
    assert!(success, "leadflow {args:?} failed: {stdout}{stderr}");
    stdout
}

#[tokio::test]
async fn the_command_line_searches_and_keeps_lists_and_segments() {
    let app = TestApp::spawn_with(&[Component::Api], &[]).await;
    seed(&app).await;
    let writer = ApiClient::with_scope(&app, Scope::Write).await;
    let key = writer.key().unwrap_or_default().to_string();

    // One lead per line with --json; every page with --all.
    let out = leadflow(
        &app,
        &key,
        &[
            "leads",
            "search",
            "--where",
            "city=Berlin",
            "--sort",
            "email:desc",
            "--json",
        ],
    )
    .await;
    let emails: Vec<String> = out
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).expect("a lead per line")["email"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(emails, vec!["carla@acme.test", "anna@acme.test"]);
    let out = leadflow(&app, &key, &["leads", "search", "--limit", "3", "--all", "--json"]).await;
    assert_eq!(out.lines().count(), 10, "{out}");

    leadflow(
        &app,
        &key,
        &["lists", "create", "fair", "--description", "Met at the fair"],
    )
    .await;
    let out = leadflow(
        &app,
        &key,
        &["lists", "add", "fair", "anna@acme.test", "dan@example.test"],
    )
    .await;
    assert!(out.contains("2 lead(s) added"), "{out}");
    leadflow(
        &app,
        &key,
        &[
            "lists",
            "create",
            "keen",
            "--where",
            "score_min=40",
            "--where",
            "list=fair",
        ],
    )
    .await;
    let out = leadflow(&app, &key, &["lists", "list"]).await;
    assert!(
        out.contains("fair") && out.contains("static") && out.contains("segment"),
        "{out}"
    );
    let out = leadflow(&app, &key, &["lists", "members", "keen", "--json"]).await;
    let members: Value = serde_json::from_str(&out).expect("members as JSON");
    let mut keen: Vec<&str> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["email"].as_str().unwrap())
        .collect();
    keen.sort();
    assert_eq!(keen, vec!["anna@acme.test", "dan@example.test"]);
    leadflow(&app, &key, &["lists", "delete", "keen"]).await;
    assert!(!leadflow(&app, &key, &["lists", "list"]).await.contains("keen"));
}

#[tokio::test]
async fn a_campaign_file_naming_an_unknown_audience_is_refused_naming_audience() {
    let app = TestApp::spawn_with(&[Component::Api], &[]).await;
    let dir = std::env::temp_dir().join(format!("leadflow-audience-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("campaign.yaml"),
        "name: vip-only\nlead_source: checkout.abandoned\naudience: vips\nsteps:\n  - { delay: 1h, template: cart-reminder }\n",
    )
    .expect("campaign file");
    let pool = leadflow_shared::db::pool(&app.config.database).expect("pool");
    let refused = leadflow::apply::apply_path(&pool, &dir)
        .await
        .expect_err("no list named vips");
    assert!(
        format!("{refused:#}").contains("audience: there is no list or segment named \"vips\""),
        "{refused:#}"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM campaigns WHERE name = 'vip-only'")
            .await,
        0
    );

    ApiClient::with_scope(&app, Scope::Write)
        .await
        .post("/v1/lists", &json!({"name": "vips", "filter": {"tag": "vip"}}))
        .await
        .expect(201);
    leadflow::apply::apply_path(&pool, &dir)
        .await
        .expect("applied once the list exists");
    assert_eq!(
        app.count(
            "SELECT count(*) FROM campaigns c JOIN lead_lists ll ON ll.id = c.audience_list
              WHERE c.name = 'vip-only' AND ll.name = 'vips'"
        )
        .await,
        1
    );
    let _ = std::fs::remove_dir_all(&dir);
}
