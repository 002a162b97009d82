//! Lead import and export end to end: CSV and XLSX files imported as background jobs through the API (rows checked
//! like API input, bad rows reported by line and field while good rows go in, re-import upserting), the sample
//! sheet, a job left behind by a stopped process resumed, exports filtered and parsed back, and a large export
//! streamed by a separate process whose peak memory stays far below the export's size.

use std::io::Cursor;
use std::process::Stdio;
use std::time::Duration;

use calamine::{Data, Reader as _, Xlsx};
use serde_json::{json, Value};

use leadflow::api::keys::Scope;
use leadflow::Component;
use leadflow_tests::{wait_until, with_query, ApiClient, TestApp, DEADLINE};

const LEADFLOW: &str = env!("CARGO_BIN_EXE_leadflow-under-test");
const CSV: &str = "text/csv";
const XLSX: &str = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet";

async fn app() -> TestApp {
    TestApp::spawn_with(&[Component::Api], &[]).await
}

/// Uploads `file`, waits for the job to end, and returns it.
async fn import(api: &ApiClient, content_type: &str, file: Vec<u8>, params: &[(&str, &str)]) -> Value {
    let queued = api
        .upload(&with_query("/v1/imports", params), content_type, file)
        .await
        .expect(202);
    assert_eq!(queued["state"], "queued", "{queued:#}");
    let id = queued["id"].as_i64().expect("the job has an id");
    api.wait_for_import(id).await
}

async fn errors(api: &ApiClient, id: &Value) -> Vec<(i64, String)> {
    let page = api.get(&format!("/v1/imports/{id}/errors")).await.expect(200);
    page["items"]
        .as_array()
        .expect("errors are a list")
        .iter()
        .map(|e| {
            assert!(!e["detail"].as_str().unwrap_or_default().is_empty(), "{e:#}");
            (
                e["line"].as_i64().unwrap_or(-1),
                e["field"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The lead with `email` as stored.
async fn lead(app: &TestApp, email: &str) -> Value {
    app.db()
        .await
        .query_one("SELECT to_jsonb(l) FROM leads l WHERE email = $1", &[&email])
        .await
        .unwrap_or_else(|e| panic!("no lead {email}: {e}"))
        .get(0)
}

async fn define_field(app: &TestApp, name: &str, label: &str, kind: &str, choices: &[&str]) {
    let choices: Vec<String> = choices.iter().map(|c| c.to_string()).collect();
    app.db()
        .await
        .execute(
            "INSERT INTO lead_fields (name, label, kind, choices) VALUES ($1, $2, $3, $4)",
            &[&name, &label, &kind, &choices],
        )
        .await
        .expect("failed to define a custom field");
}

#[tokio::test]
async fn a_bad_row_is_reported_with_its_line_number_and_field_while_good_rows_go_in() {
    let app = app().await;
    define_field(&app, "seats", "Seats", "number", &[]).await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    let csv = "E-mail;First name;Country;Seats;Status;Mobile;Tags;Notes\n\
               ann@example.com;Ann;de;3;Active;+49 30 1;fair, vip;\"met at the stand,\nwants a call\"\n\
               not-an-email;Bob;DE;;;;;\n\
               carl@example.com;Carl;Germany;;;;;\n\
               \n\
               dora@example.com;Dora;AT;many;;;;\n\
               eve@example.com;Eve;FR;;Dormant;;;\n\
               gina@example.com;Gina;;;;+41 1, +41 2;;\n";
    let job = import(
        &api,
        CSV,
        csv.as_bytes().to_vec(),
        &[
            ("file_name", "fair.csv"),
            ("source", "fair-2026"),
            ("list", "Fair 2026"),
        ],
    )
    .await;

    assert_eq!(job["state"], "done", "{job:#}");
    assert_eq!(job["rows_total"], 6, "{job:#}");
    assert_eq!(job["rows_done"], 6, "{job:#}");
    assert_eq!(job["rows_created"], 2, "{job:#}");
    assert_eq!(job["rows_rejected"], 4, "{job:#}");
    assert_eq!(job["unmapped_columns"], json!(["Notes"]), "{job:#}");
    // The quoted line break in ann's row and the blank line move the later rows' line numbers.
    assert_eq!(
        errors(&api, &job["id"]).await,
        [
            (4, "email".to_string()),
            (5, "country".to_string()),
            (7, "custom.seats".to_string()),
            (8, "status".to_string())
        ]
    );

    // The errors page by line.
    let page = api
        .get(&format!("/v1/imports/{}/errors?limit=3", job["id"]))
        .await
        .expect(200);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(3), "{page:#}");
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let rest = api
        .get(&format!("/v1/imports/{}/errors?limit=3&cursor={cursor}", job["id"]))
        .await
        .expect(200);
    assert_eq!(rest["items"][0]["line"], 8, "{rest:#}");
    assert_eq!(rest["next_cursor"], Value::Null, "{rest:#}");

    let ann = lead(&app, "ann@example.com").await;
    assert_eq!(ann["first_name"], "Ann");
    assert_eq!(ann["country"], "DE");
    assert_eq!(ann["phones"], json!(["+49 30 1"]));
    assert_eq!(ann["tags"], json!(["fair", "vip"]));
    assert_eq!(ann["custom"], json!({"seats": 3.0}));
    assert_eq!(ann["source"], "fair-2026");
    assert_eq!(ann["original_source"], "fair-2026");
    assert_eq!(ann["original_source_category"], "import");
    assert_eq!(
        lead(&app, "gina@example.com").await["phones"],
        json!(["+41 1", "+41 2"])
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM leads WHERE email IN ('carl@example.com', 'dora@example.com', 'eve@example.com')"
        )
        .await,
        0
    );
    assert_eq!(
        app.count("SELECT count(*) FROM lead_sources WHERE name = 'fair-2026' AND category = 'import'")
            .await,
        1
    );
    assert_eq!(
        app.count(
            "SELECT count(*) FROM lead_list_members m JOIN lead_lists l ON l.id = m.list_id
              WHERE l.name = 'Fair 2026' AND l.kind = 'static'"
        )
        .await,
        2
    );
    let actor = format!("import #{}", job["id"]);
    let logged = app
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM lead_changes WHERE kind = 'imported' AND actor = $1",
            &[&actor],
        )
        .await
        .expect("lead_changes")
        .get::<_, i64>(0);
    assert_eq!(logged, 2);
}

#[tokio::test]
async fn importing_changed_rows_again_updates_the_leads_without_duplicates() {
    let app = app().await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    let first = "email,first_name,city,company\nann@example.com,Ann,Berlin,Acme\nbob@example.com,Bob,Köln,\n";
    let job = import(&api, CSV, first.as_bytes().to_vec(), &[]).await;
    assert_eq!(
        (job["rows_created"].as_i64(), job["rows_rejected"].as_i64()),
        (Some(2), Some(0)),
        "{job:#}"
    );

    // Upper-case address, a new city, an empty first name (left as it is), and one new lead.
    let again = "email,first_name,city\nANN@example.com,,Hamburg\ncarl@example.com,Carl,Bonn\n";
    let job = import(&api, CSV, again.as_bytes().to_vec(), &[]).await;
    assert_eq!(job["state"], "done", "{job:#}");
    assert_eq!(
        (job["rows_created"].as_i64(), job["rows_updated"].as_i64()),
        (Some(1), Some(1)),
        "{job:#}"
    );
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 3);
    let ann = lead(&app, "ann@example.com").await;
    assert_eq!(
        (ann["city"].as_str(), ann["first_name"].as_str()),
        (Some("Hamburg"), Some("Ann"))
    );
    assert_eq!(ann["company_name"], "Acme");
    // The original source stays the first import's.
    assert_eq!(ann["original_source"], "import");
    let changes: Value = app
        .db()
        .await
        .query_one(
            "SELECT c.changes FROM lead_changes c JOIN leads l ON l.id = c.lead_id
              WHERE l.email = 'ann@example.com' AND c.actor = $1",
            &[&format!("import #{}", job["id"])],
        )
        .await
        .expect("the re-import is in ann's change log")
        .get(0);
    assert_eq!(changes["city"], json!({"from": "Berlin", "to": "Hamburg"}));

    // The jobs, newest first, a page at a time.
    let page = api.get("/v1/imports?limit=1").await.expect(200);
    assert_eq!(page["items"][0]["id"], job["id"], "{page:#}");
    let cursor = page["next_cursor"].as_str().expect("an older page");
    let older = api
        .get(&format!("/v1/imports?limit=1&cursor={cursor}"))
        .await
        .expect(200);
    assert_eq!(older["items"].as_array().map(Vec::len), Some(1), "{older:#}");
    assert_ne!(older["items"][0]["id"], job["id"]);
    assert_eq!(older["next_cursor"], Value::Null, "{older:#}");
    api.get("/v1/imports?cursor=nonsense").await.problem(400, "cursor");
    api.get("/v1/imports/999999").await.refused(404);
}

fn workbook(rows: &[&[&str]]) -> Vec<u8> {
    let mut workbook = rust_xlsxwriter::Workbook::new();
    let sheet = workbook.add_worksheet();
    for (r, row) in rows.iter().enumerate() {
        for (c, cell) in row.iter().enumerate() {
            // Numbers go in as numbers, as a spreadsheet program would store them.
            match cell.parse::<f64>() {
                Ok(n) => sheet.write_number(r as u32, c as u16, n),
                Err(_) => sheet.write_string(r as u32, c as u16, *cell),
            }
            .expect("failed to write a cell");
        }
    }
    workbook.save_to_buffer().expect("failed to build the workbook")
}

#[tokio::test]
async fn an_xlsx_file_is_imported_with_headers_matched_and_an_explicit_mapping() {
    let app = app().await;
    define_field(&app, "plan", "Plan chosen", "choice", &["Basic", "Pro"]).await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    let file = workbook(&[
        &[
            "Email Address",
            "Company",
            "ZIP",
            "Phone",
            "Plan chosen",
            "Kundennummer",
            "Ort",
        ],
        &[
            "ann@example.com",
            "Acme GmbH",
            "10115",
            "4930123",
            "pro",
            "K-1",
            "Berlin",
        ],
        &["bob@example.com", "Beta AG", "50667", "", "Gold", "K-2", "Köln"],
    ]);
    let mapping = json!({"Kundennummer": "customer_id", "Ort": "city"}).to_string();
    let job = import(&api, XLSX, file, &[("format", "xlsx"), ("mapping", &mapping)]).await;

    assert_eq!(job["state"], "done", "{job:#}");
    assert_eq!(job["rows_created"], 1, "{job:#}");
    assert_eq!(job["unmapped_columns"], json!([]), "{job:#}");
    assert_eq!(errors(&api, &job["id"]).await, [(3, "custom.plan".to_string())]);
    let ann = lead(&app, "ann@example.com").await;
    assert_eq!(ann["company_name"], "Acme GmbH");
    assert_eq!(ann["postal_code"], "10115");
    assert_eq!(ann["phones"], json!(["4930123"]));
    assert_eq!(ann["custom"]["plan"], "Pro");
    assert_eq!(ann["customer_id"], "K-1");
    assert_eq!(ann["city"], "Berlin");

    // A mapping to something that is not a field is refused before a job is queued.
    let refused = api
        .upload(
            &with_query("/v1/imports", &[("format", "xlsx"), ("mapping", r#"{"Ort": "town"}"#)]),
            XLSX,
            workbook(&[&["Email"]]),
        )
        .await;
    refused.problem(400, "mapping");
}

#[tokio::test]
async fn the_sample_sheet_lists_every_importable_column_and_imports_cleanly() {
    let app = app().await;
    define_field(&app, "birthday", "Birthday", "date", &[]).await;
    define_field(&app, "plan", "Plan", "choice", &["Basic", "Pro"]).await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;

    let answer = api.get("/v1/imports/sample.csv").await;
    assert_eq!(answer.status.as_u16(), 200, "{answer:#?}");
    assert!(answer.content_type.starts_with("text/csv"), "{answer:#?}");
    let text = answer.text();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers: Vec<String> = reader
        .headers()
        .expect("a header row")
        .iter()
        .map(str::to_string)
        .collect();
    for column in [
        "email",
        "first_name",
        "phones",
        "company_name",
        "postal_code",
        "tags",
        "status",
    ] {
        assert!(
            headers.contains(&column.to_string()),
            "{column} missing from {headers:?}"
        );
    }
    assert!(headers.contains(&"custom.birthday".to_string()) && headers.contains(&"custom.plan".to_string()));
    assert_eq!(reader.records().count(), 2);

    let job = import(&api, CSV, text.into_bytes(), &[]).await;
    assert_eq!(job["state"], "done", "{job:#}");
    assert_eq!(
        (job["rows_created"].as_i64(), job["rows_rejected"].as_i64()),
        (Some(2), Some(0)),
        "{job:#}"
    );
    assert_eq!(job["unmapped_columns"], json!([]), "{job:#}");
    assert_eq!(lead(&app, "ann.example@example.com").await["custom"]["plan"], "Basic");

    let answer = api.get("/v1/imports/sample.xlsx").await;
    assert_eq!(answer.status.as_u16(), 200, "{answer:#?}");
    assert_eq!(answer.content_type, XLSX);
    let job = import(&api, XLSX, answer.bytes, &[]).await;
    assert_eq!(job["state"], "done", "{job:#}");
    // The same two leads: imported again, updated.
    assert_eq!(
        (job["rows_updated"].as_i64(), job["rows_rejected"].as_i64()),
        (Some(2), Some(0)),
        "{job:#}"
    );
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 2);
}

#[tokio::test]
async fn a_job_left_running_by_a_stopped_process_is_resumed_after_its_committed_rows() {
    let app = app().await;
    let api = ApiClient::with_scope(&app, Scope::Read).await;
    let csv = "email,city\none@example.com,A\ntwo@example.com,B\nthree@example.com,C\nfour@example.com,D\n";
    // As a worker that committed the first two rows and then died leaves it: running, its lease run out.
    let id: i64 = app
        .db()
        .await
        .query_one(
            "INSERT INTO import_jobs (format, state, rows_done, rows_created, actor, content, started_at, lease_until)
             VALUES ('csv', 'running', 2, 2, 'tests', $1, now() - interval '5 minutes', now() - interval '1 minute')
             RETURNING id",
            &[&csv.as_bytes()],
        )
        .await
        .expect("failed to insert the abandoned job")
        .get(0);

    let job = api.wait_for_import(id).await;
    assert_eq!(job["state"], "done", "{job:#}");
    assert_eq!(
        (job["rows_done"].as_i64(), job["rows_created"].as_i64()),
        (Some(4), Some(4)),
        "{job:#}"
    );
    let emails: Vec<String> = app
        .db()
        .await
        .query("SELECT email FROM leads ORDER BY id", &[])
        .await
        .expect("leads")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(emails, ["three@example.com", "four@example.com"]);
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM import_jobs WHERE id = {id} AND content IS NULL"
        ))
        .await,
        1
    );
}

/// Leads in Berlin, Köln and Hamburg, with a custom field.
async fn seed_cities(app: &TestApp) {
    define_field(app, "seats", "Seats", "number", &[]).await;
    app.db()
        .await
        .batch_execute(
            "INSERT INTO leads (email, first_name, city, tags, custom, phones)
             SELECT 'lead' || i || '@example.com', 'Name ' || i,
                    (ARRAY['Berlin', 'Köln', 'Hamburg'])[1 + i % 3],
                    ARRAY['t' || (i % 2)], jsonb_build_object('seats', i), ARRAY['+49 ' || i, '+49 0' || i]
               FROM generate_series(1, 30) i",
        )
        .await
        .expect("failed to seed leads");
}

#[tokio::test]
async fn a_filtered_csv_export_holds_exactly_the_matching_leads_and_imports_again() {
    let app = app().await;
    seed_cities(&app).await;
    let api = ApiClient::with_scope(&app, Scope::Read).await;
    let answer = api.get("/v1/leads/export?format=csv&city=Berlin").await;
    assert_eq!(answer.status.as_u16(), 200, "{answer:#?}");
    assert!(answer.content_type.starts_with("text/csv"), "{answer:#?}");
    let text = answer.text();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader.headers().expect("a header row").clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("no {name} column in {headers:?}"))
    };
    let (id, city, phones, seats) = (column("id"), column("city"), column("phones"), column("custom.seats"));
    for name in [
        "email",
        "score",
        "temperature",
        "created_at",
        "updated_at",
        "company_name",
    ] {
        column(name);
    }
    let records: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("a CSV record")).collect();
    let mut exported: Vec<i64> = records.iter().map(|r| r[id].parse().expect("an id")).collect();
    exported.sort_unstable();
    let expected: Vec<i64> = app
        .db()
        .await
        .query("SELECT id FROM leads WHERE city = 'Berlin' ORDER BY id", &[])
        .await
        .expect("leads")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(exported, expected);
    assert_eq!(expected.len(), 10);
    assert!(records.iter().all(|r| &r[city] == "Berlin"));
    let lead3 = records
        .iter()
        .find(|r| &r[column("email")] == "lead3@example.com")
        .expect("lead3 is in Berlin");
    assert_eq!((&lead3[phones], &lead3[seats]), ("+49 3, +49 03", "3"));

    // In the order asked for.
    let sorted = api.get("/v1/leads/export?city=Berlin&sort=email:desc").await;
    assert_eq!(sorted.status.as_u16(), 200, "{sorted:#?}");
    let sorted = sorted.text();
    let emails: Vec<String> = csv::Reader::from_reader(sorted.as_bytes())
        .records()
        .map(|r| r.expect("a CSV record")[column("email")].to_string())
        .collect();
    let mut descending = emails.clone();
    descending.sort_by(|a, b| b.cmp(a));
    assert_eq!(emails, descending);
    assert_eq!(emails.len(), 10);

    // A filter the search does not know is refused naming it.
    api.get("/v1/leads/export?colour=red").await.problem(400, "colour");

    // The export imports again as it is: every lead matched by email, nothing refused.
    let writer = ApiClient::with_scope(&app, Scope::Write).await;
    let job = import(&writer, CSV, text.into_bytes(), &[]).await;
    assert_eq!(job["state"], "done", "{job:#}");
    assert_eq!(
        (job["rows_updated"].as_i64(), job["rows_rejected"].as_i64()),
        (Some(10), Some(0)),
        "{job:#}"
    );
    assert_eq!(app.count("SELECT count(*) FROM leads").await, 30);
}

#[tokio::test]
async fn a_filtered_xlsx_export_opens_as_a_workbook_of_the_matching_leads() {
    let app = app().await;
    seed_cities(&app).await;
    let api = ApiClient::with_scope(&app, Scope::Read).await;
    let answer = api.get("/v1/leads/export?format=xlsx&city=K%C3%B6ln&tag=t1").await;
    assert_eq!(answer.status.as_u16(), 200, "{answer:#?}");
    assert_eq!(answer.content_type, XLSX);
    let mut workbook: Xlsx<_> = calamine::open_workbook_from_rs(Cursor::new(answer.bytes)).expect("an XLSX workbook");
    let range = workbook
        .worksheet_range_at(0)
        .expect("a worksheet")
        .expect("a readable worksheet");
    let mut rows = range.rows();
    let header: Vec<String> = rows
        .next()
        .expect("a header row")
        .iter()
        .map(|c| c.to_string())
        .collect();
    let email = header.iter().position(|h| h == "email").expect("an email column");
    let mut emails: Vec<String> = rows.map(|r| r[email].to_string()).collect();
    emails.sort();
    let mut expected: Vec<String> = app
        .db()
        .await
        .query("SELECT email FROM leads WHERE city = 'Köln' AND 't1' = ANY (tags)", &[])
        .await
        .expect("leads")
        .iter()
        .map(|r| r.get(0))
        .collect();
    expected.sort();
    assert!(!expected.is_empty());
    assert_eq!(emails, expected);
    let id = header.iter().position(|h| h == "id").expect("an id column");
    assert!(
        matches!(range.rows().nth(1).map(|r| &r[id]), Some(Data::Float(_))),
        "ids are numbers"
    );
}

#[tokio::test]
async fn a_read_only_key_cannot_import() {
    let app = app().await;
    let api = ApiClient::with_scope(&app, Scope::Read).await;
    api.upload("/v1/imports?format=csv", CSV, b"email\nann@example.com\n".to_vec())
        .await
        .refused(403);
    assert_eq!(app.count("SELECT count(*) FROM import_jobs").await, 0);
    // Without any key: 401.
    ApiClient::new(&app, None)
        .upload("/v1/imports?format=csv", CSV, b"email\nann@example.com\n".to_vec())
        .await
        .refused(401);
}

#[tokio::test]
async fn an_import_file_may_be_larger_than_a_json_body_up_to_64_mib() {
    let app = TestApp::spawn_with(&[Component::Api], &[("LEADFLOW_MAX_BODY_BYTES", "1000")]).await;
    let api = ApiClient::with_scope(&app, Scope::Write).await;
    let mut csv = String::from("email\n");
    for i in 0..500 {
        csv.push_str(&format!("lead{i}@example.com\n"));
    }
    assert!(csv.len() > 1000);
    let job = import(&api, CSV, csv.into_bytes(), &[]).await;
    assert_eq!(job["rows_created"], 500, "{job:#}");

    let too_large = vec![b'x'; 64 * 1024 * 1024 + 1];
    let refused = api.upload("/v1/imports?format=csv", CSV, too_large).await.refused(413);
    assert!(refused["detail"].as_str().is_some_and(|d| !d.is_empty()), "{refused:#}");
}

/// The peak resident memory of process `pid` (VmHWM), in KiB.
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the process's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmHWM line")
}

/// Downloads `url` chunk by chunk (the test holds no more than a chunk), returning the byte and line counts.
async fn download(http: &reqwest::Client, url: &str, key: &str) -> (u64, u64) {
    let mut response = http
        .get(url)
        .bearer_auth(key)
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .expect("the export request");
    assert_eq!(response.status().as_u16(), 200);
    let (mut bytes, mut lines) = (0u64, 0u64);
    while let Some(chunk) = response.chunk().await.expect("an export chunk") {
        bytes += chunk.len() as u64;
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
    }
    (bytes, lines)
}

#[tokio::test]
async fn a_large_export_is_streamed_with_bounded_memory() {
    const LEADS: i64 = 200_000;
    let app = app().await;
    app.db()
        .await
        .batch_execute(&format!(
            "INSERT INTO leads (email, first_name, last_name, city, address, company_name, profession, phones, tags)
             SELECT 'bulk' || i || '@example.com', 'Firstname' || i, 'Lastname' || i, 'Berlin',
                    'Long Street Name ' || i || ', Building ' || (i % 97), 'Company number ' || i || ' GmbH',
                    'Profession of lead ' || i, ARRAY['+49 30 ' || i], ARRAY['bulk', 'export']
               FROM generate_series(1, {LEADS}) i"
        ))
        .await
        .expect("failed to insert the leads");
    let key = ApiClient::with_scope(&app, Scope::Read)
        .await
        .key()
        .expect("a key")
        .to_string();

    // The api service alone in its own process, so its memory can be read.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut command = tokio::process::Command::new(LEADFLOW);
    command.args(["run", "api"]).kill_on_drop(true).stdin(Stdio::null());
    for (name, _) in std::env::vars() {
        if name.starts_with("LEADFLOW_") {
            command.env_remove(name);
        }
    }
    for (name, value) in app.env() {
        command.env(name, value);
    }
    command.env("LEADFLOW_HTTP_ADDR", format!("127.0.0.1:{port}"));
    if std::env::var_os("TEST_LOG").is_none() {
        command.stdout(Stdio::null()).stderr(Stdio::null());
    }
    let mut child = command.spawn().expect("failed to start leadflow run api");
    let pid = child.id().expect("the process id");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_until("the api process answers", DEADLINE, || async {
        http.get(format!("{base}/healthz")).send().await.is_ok()
    })
    .await;

    // Warm up on a small export, so the baseline includes what any export allocates once.
    let (_, lines) = download(&http, &format!("{base}/v1/leads/export?email=bulk1@example.com"), &key).await;
    assert_eq!(lines, 2);
    let before = peak_kib(pid);
    let (bytes, lines) = download(&http, &format!("{base}/v1/leads/export?format=csv&tag=bulk"), &key).await;
    let after = peak_kib(pid);
    let (xlsx_bytes, _) = download(&http, &format!("{base}/v1/leads/export?format=xlsx&tag=bulk"), &key).await;
    let after_xlsx = peak_kib(pid);

    // A client that goes away after the first chunk: the export's query ends, and exports go on working.
    let mut abandoned = http
        .get(format!("{base}/v1/leads/export?tag=bulk"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("the export request");
    assert!(abandoned.chunk().await.expect("a first chunk").is_some());
    drop(abandoned);
    wait_until("the abandoned export's query has ended", DEADLINE, || async {
        app.count(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND state = 'active'
                AND query LIKE 'SELECT to_jsonb(l) FROM leads l WHERE%'",
        )
        .await
            == 0
    })
    .await;
    let (_, one) = download(&http, &format!("{base}/v1/leads/export?email=bulk2@example.com"), &key).await;
    assert_eq!(one, 2, "a header and bulk2");
    let _ = child.kill().await;

    assert_eq!(lines, LEADS as u64 + 1, "a header and every lead");
    assert!(
        bytes > 40_000_000,
        "the export is large enough to show it: {bytes} bytes"
    );
    let grown = (after - before) * 1024;
    assert!(
        grown < bytes / 8,
        "the api's peak memory grew by {grown} bytes for a CSV export of {bytes} bytes (before {before} KiB, \
         after {after} KiB): the export is held in memory"
    );
    // The same leads as a workbook: written in constant memory, then streamed from its temporary file.
    assert!(xlsx_bytes > 1_000_000, "a workbook of every lead: {xlsx_bytes} bytes");
    let grown = (after_xlsx - after) * 1024;
    assert!(
        grown < bytes / 8,
        "the api's peak memory grew by {grown} bytes writing a workbook of {bytes} bytes of lead data \
         (before {after} KiB, after {after_xlsx} KiB)"
    );
}

/// Runs `leadflow <args>` against the app's API with `key`; returns whether it succeeded and its standard output.
async fn cli(app: &TestApp, key: &str, args: &[&str]) -> (bool, String) {
    let (success, stdout, stderr) = app.run_leadflow(LEADFLOW, Some(key), args).await;
    (success, format!("{stdout}{stderr}"))
}

#[tokio::test]
async fn the_cli_imports_with_a_mapping_reports_rejected_lines_and_exports_a_workbook() {
    let app = app().await;
    let key = ApiClient::with_scope(&app, Scope::Write)
        .await
        .key()
        .expect("a key")
        .to_string();
    let dir = std::env::temp_dir().join(format!("leadflow-transfer-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let file = dir.join("fair.csv");
    std::fs::write(
        &file,
        "Email,Handy,City\nann@example.com,+49 1,Berlin\nnope,+49 2,Berlin\n",
    )
    .expect("the CSV");

    let (ok, output) = cli(
        &app,
        &key,
        &[
            "leads",
            "import",
            file.to_str().expect("a UTF-8 path"),
            "--source",
            "fair-2026",
            "--map",
            "Handy=phones",
        ],
    )
    .await;
    assert!(!ok, "a rejected row makes the import command fail: {output}");
    assert!(output.contains("line 3: email:"), "{output}");
    assert_eq!(lead(&app, "ann@example.com").await["phones"], json!(["+49 1"]));
    assert_eq!(lead(&app, "ann@example.com").await["source"], "fair-2026");

    let workbook_file = dir.join("berlin.xlsx");
    let out = workbook_file.to_str().expect("a UTF-8 path");
    let (ok, output) = cli(
        &app,
        &key,
        &[
            "leads",
            "export",
            "--where",
            "city=Berlin",
            "--format",
            "xlsx",
            "-o",
            out,
        ],
    )
    .await;
    assert!(ok, "{output}");
    let mut workbook: Xlsx<_> = calamine::open_workbook(&workbook_file).expect("an XLSX workbook");
    let range = workbook
        .worksheet_range_at(0)
        .expect("a worksheet")
        .expect("a readable worksheet");
    assert_eq!(range.height(), 2, "a header and ann");

    let sample = dir.join("sample.csv");
    let (ok, output) = cli(
        &app,
        &key,
        &["leads", "sample", "-o", sample.to_str().expect("a UTF-8 path")],
    )
    .await;
    assert!(ok, "{output}");
    let text = std::fs::read_to_string(&sample).expect("the sample");
    assert!(text.starts_with("email,first_name,"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
