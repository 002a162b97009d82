//! Per-lead discount codes and instant lead notifications against the real services: generated and pool codes
//! in the emails, an empty pool, revenue credited to the step whose code an order names, the pool import, and
//! signed notifications to a small HTTP receiver that records what it gets and can fail on purpose.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use leadflow_scheduler::notify;
use leadflow_tests::{event, wait_until, Captured, DeliveryRow, Rule, TestApp, DEADLINE};

/// The leadflow command, built for the tests to run as a separate process.
const LEADFLOW: &str = env!("CARGO_BIN_EXE_leadflow-under-test");

const SECRET: &str = "test-notify-secret";

// ---- discount codes ----

/// The code assigned to each delivery of the lead with `email`: delivery id -> (step, code).
async fn codes_of(app: &TestApp, email: &str) -> BTreeMap<i64, (i16, String)> {
    app.db()
        .await
        .query(
            "SELECT k.delivery_id, k.step, k.code FROM discount_codes k JOIN leads l ON l.id = k.lead_id
              WHERE l.email = $1 AND k.delivery_id IS NOT NULL",
            &[&email],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to read discount codes: {e}"))
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect()
}

fn text_of(message: &Captured) -> String {
    message
        .text_body()
        .unwrap_or_else(|| panic!("no text/plain part in {message}:\n{}", message.data))
}

fn html_of(message: &Captured) -> String {
    message
        .html_body()
        .unwrap_or_else(|| panic!("no text/html part in {message}:\n{}", message.data))
}

fn is_generated_code(code: &str) -> bool {
    code.strip_prefix("LF-")
        .is_some_and(|rest| rest.len() == 10 && rest.bytes().all(|b| b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789".contains(&b)))
}

fn step_state(rows: &[DeliveryRow], step: i16) -> Option<&str> {
    rows.iter().find(|r| r.step == step).map(|r| r.state.as_str())
}

#[tokio::test]
async fn generated_codes_are_unique_per_lead_and_step_and_appear_in_the_email() {
    let app = TestApp::builder().variant("discount-codes").spawn().await;
    let leads = ["gen-a@example.com", "gen-b@example.com", "gen-c@example.com"];
    let batch: Vec<Value> = leads.iter().map(|l| event("checkout.abandoned", l)).collect();
    app.post_event(&Value::Array(batch)).await;

    let mut all_codes = BTreeSet::new();
    for lead in leads {
        let rows = app
            .wait_for_deliveries(lead, "all three steps are sent", |d| {
                d.len() == 3 && d.iter().all(|r| r.state == "sent")
            })
            .await;
        let codes = codes_of(&app, lead).await;
        let steps: Vec<i16> = codes.values().map(|(step, _)| *step).collect();
        assert_eq!(
            steps,
            vec![1, 2],
            "steps one and two give a code, step three none: {codes:?}"
        );
        let messages = app.smtp.messages_to(lead);
        assert_eq!(messages.len(), 3, "{}", app.smtp.summary());
        for message in &messages {
            let id = message
                .delivery_id()
                .unwrap_or_else(|| panic!("a message without a delivery id: {message}"));
            let row = rows
                .iter()
                .find(|r| r.id == id)
                .unwrap_or_else(|| panic!("a message for an unknown delivery {id}"));
            match codes.get(&id) {
                Some((_, code)) => {
                    assert!(
                        is_generated_code(code),
                        "{code} is not LF- and ten unambiguous characters"
                    );
                    let subject = message.subject().unwrap_or_default();
                    assert!(
                        subject.contains(code),
                        "step {} subject {subject:?} lacks {code}",
                        row.step
                    );
                    assert!(text_of(message).contains(code), "step {} text lacks {code}", row.step);
                    assert!(
                        html_of(message).contains(&format!("<strong>{code}</strong>")),
                        "step {} HTML lacks {code}",
                        row.step
                    );
                    assert!(all_codes.insert(code.clone()), "{code} was given twice");
                }
                None => assert_eq!(row.step, 3, "only step three comes without a code"),
            }
        }
    }
    assert_eq!(all_codes.len(), 6, "three leads x two steps");
    assert_eq!(
        app.count("SELECT count(*) FROM discount_codes WHERE source = 'generated'")
            .await,
        6
    );
}

#[tokio::test]
async fn pool_codes_are_drawn_in_order_and_an_empty_pool_fails_the_delivery_with_the_reason() {
    let app = TestApp::builder()
        .variant("discount-codes")
        .variant("discount-pool")
        .spawn()
        .await;
    let report = leadflow_scheduler::codes::import(&app.db().await, "cart-recovery", "A", 1, "POOL-1\nPOOL-2\n")
        .await
        .unwrap_or_else(|e| panic!("import failed: {e:#}"));
    assert_eq!(report.imported, 2, "{report}");

    // One lead after the other, so "in order" means something.
    for (lead, expected) in [("pool-a@example.com", "POOL-1"), ("pool-b@example.com", "POOL-2")] {
        app.post_event(&event("checkout.abandoned", lead)).await;
        let messages = app.smtp.wait_for_to(lead, 1, DEADLINE).await;
        let text = text_of(&messages[0]);
        assert!(text.contains(expected), "{lead} should get {expected}: {text}");
        let codes: Vec<String> = codes_of(&app, lead).await.into_values().map(|(_, c)| c).collect();
        assert_eq!(codes, vec![expected.to_string()]);
    }

    let lead = "pool-c@example.com";
    app.post_event(&event("checkout.abandoned", lead)).await;
    let rows = app
        .wait_for_deliveries(lead, "step one failed and step two was sent", |d| {
            step_state(d, 1) == Some("failed") && step_state(d, 2) == Some("sent")
        })
        .await;
    assert_eq!(
        rows[0].reason.as_deref(),
        Some("no discount code left in the pool for cart-recovery step 1")
    );
    assert_eq!(app.smtp.messages_to(lead).len(), 1, "only step two reaches the lead");

    let counts = leadflow_scheduler::codes::list(&app.db().await, "cart-recovery")
        .await
        .unwrap_or_else(|e| panic!("list failed: {e:#}"));
    let step_one = counts
        .iter()
        .find(|c| c.step == 1)
        .unwrap_or_else(|| panic!("no step one in {counts:?}"));
    assert_eq!(
        (
            step_one.source.as_deref(),
            step_one.free,
            step_one.assigned,
            step_one.redeemed
        ),
        (Some("pool"), 0, 2, 0)
    );
}

#[tokio::test]
async fn an_order_carrying_a_code_credits_that_codes_step_even_after_a_later_step_was_sent() {
    let app = TestApp::builder().variant("discount-codes").spawn().await;
    let lead = "redeem@example.com";
    app.post_event(&event("checkout.abandoned", lead)).await;
    let rows = app
        .wait_for_deliveries(lead, "all three steps are sent", |d| {
            d.len() == 3 && d.iter().all(|r| r.state == "sent")
        })
        .await;
    let codes = codes_of(&app, lead).await;
    let (step_one_delivery, (_, code)) = codes
        .iter()
        .find(|(_, (step, _))| *step == 1)
        .map(|(id, c)| (*id, c.clone()))
        .unwrap_or_else(|| panic!("no step-one code in {codes:?}"));
    assert!(
        rows.iter().filter(|r| r.step > 1).all(|r| r.sent_at > rows[0].sent_at),
        "steps two and three were sent after step one: {rows:#?}"
    );

    let mut order = event("order.completed", lead);
    order["data"]["discount_code"] = json!(code.to_lowercase());
    order["data"]["amount"] = json!(120.5);
    app.post_event(&order).await;

    let db = app.db().await;
    wait_until("the order is recorded", DEADLINE, || async {
        app.count("SELECT count(*) FROM conversions").await == 1
    })
    .await;
    let row = db
        .query_one(
            "SELECT c.step, c.code, c.delivery_id, c.amount::text, ca.name
               FROM conversions c LEFT JOIN campaigns ca ON ca.id = c.campaign_id",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to read the conversion: {e}"));
    let (step, stored_code, delivery, amount, campaign): (
        Option<i16>,
        Option<String>,
        Option<i64>,
        String,
        Option<String>,
    ) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        step,
        Some(1),
        "credited to the step whose code was used, not the last one sent"
    );
    assert_eq!(stored_code.as_deref(), Some(code.as_str()));
    assert_eq!(delivery, Some(step_one_delivery));
    assert_eq!(amount, "120.5000");
    assert_eq!(campaign.as_deref(), Some("cart-recovery"));
    let redeemed = db
        .query_one(
            "SELECT k.redeemed_at IS NOT NULL, k.conversion_id = c.id
               FROM discount_codes k JOIN conversions c ON true WHERE k.code = $1",
            &[&code],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to read the code: {e}"));
    assert!(redeemed.get::<_, bool>(0), "the code is marked redeemed");
    assert!(redeemed.get::<_, bool>(1), "the code names its conversion");
    let stats = leadflow_scheduler::stats::campaign_stats(&db)
        .await
        .unwrap_or_else(|e| panic!("stats failed: {e:#}"));
    let text = serde_json::to_string(&stats).unwrap_or_default();
    assert!(text.contains("120.5"), "the revenue shows in the stats: {text}");
}

#[tokio::test]
async fn the_import_reports_a_bad_line_by_number_and_keeps_the_rest() {
    let app = TestApp::builder()
        .variant("discount-codes")
        .variant("discount-pool")
        .spawn()
        .await;
    let dir = std::env::temp_dir().join(format!("leadflow-codes-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let file = dir.join("pool.csv");
    let long = "L".repeat(65);
    std::fs::write(
        &file,
        format!("code,value\n# first batch\nSUMMER-1,10\nSUM MER,10\n\nSUMMER-2,10\nSUMMER-1,10\n{long}\nSUMMER-3\n"),
    )
    .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));

    let run = |args: Vec<String>| {
        let mut command = tokio::process::Command::new(LEADFLOW);
        command.args(&args).stdin(std::process::Stdio::null());
        for (key, _) in std::env::vars() {
            if key.starts_with("LEADFLOW_") {
                command.env_remove(key);
            }
        }
        for (key, value) in app.env() {
            command.env(key, value);
        }
        async move {
            let output = command
                .output()
                .await
                .unwrap_or_else(|e| panic!("failed to run leadflow {args:?}: {e}"));
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
    };
    let path = file.display().to_string();
    let import = [
        "codes",
        "import",
        "--campaign",
        "cart-recovery",
        "--step",
        "1",
        path.as_str(),
    ];
    let (status, stdout, stderr) = run(import.iter().map(|s| s.to_string()).collect()).await;
    assert_eq!(
        status,
        Some(1),
        "rejected lines make the exit status 1\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("line 4: \"SUM MER\" has spaces inside"), "{stdout}");
    assert!(stdout.contains("line 7: \"SUMMER-1\" repeats line 3"), "{stdout}");
    assert!(stdout.contains("line 8: longer than 64 characters"), "{stdout}");
    assert!(
        stdout.contains("3 imported into cart-recovery variant A step 1; 0 already there, 3 rejected, 3 skipped"),
        "{stdout}"
    );
    assert!(stderr.contains("3 line(s)"), "{stderr}");

    let pool: Vec<String> = app
        .db()
        .await
        .query(
            "SELECT code FROM discount_codes WHERE source = 'pool' AND step = 1 ORDER BY id",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to read the pool: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        pool,
        vec!["SUMMER-1", "SUMMER-2", "SUMMER-3"],
        "good lines, in file order"
    );

    // Importing the same file again adds nothing and still reports the bad lines.
    let (_, again, _) = run(import.iter().map(|s| s.to_string()).collect()).await;
    assert!(
        again.contains("0 imported") && again.contains("3 already there"),
        "{again}"
    );

    let (status, listing, stderr) = run(["codes", "list", "--campaign", "cart-recovery"]
        .iter()
        .map(|s| s.to_string())
        .collect())
    .await;
    assert_eq!(status, Some(0), "{stderr}");
    let step_one = listing
        .lines()
        .find(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == ["A", "1", "pool"])
        .unwrap_or_else(|| panic!("no line for step 1 in\n{listing}"));
    assert_eq!(
        step_one.split_whitespace().skip(3).collect::<Vec<_>>(),
        ["3", "0", "0"],
        "{listing}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- instant lead notifications ----

/// One request the receiver got, and what it answered.
#[derive(Debug, Clone)]
struct Received {
    headers: HashMap<String, String>,
    body: Vec<u8>,
    status: u16,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
            .unwrap_or_default()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn kind(&self) -> String {
        self.json()["kind"].as_str().unwrap_or_default().to_string()
    }
}

#[derive(Default)]
struct ReceiverState {
    requests: Vec<Received>,
    /// Answer 500 to this many attempts of each notification (by `X-Leadflow-Notification`).
    fail_first: u32,
    /// Answer 500 to everything.
    always_fail: bool,
    attempts: HashMap<String, u32>,
}

/// A tiny HTTP/1.1 endpoint: records every request and answers 200, or 500 as told.
struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
}

impl Receiver {
    async fn start(fail_first: u32, always_fail: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind the receiver: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("no receiver address: {e}"));
        let state = Arc::new(Mutex::new(ReceiverState {
            fail_first,
            always_fail,
            ..ReceiverState::default()
        }));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, state).await;
                });
            }
        });
        Self { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/leadflow?token=abc", self.addr)
    }

    fn requests(&self) -> Vec<Received> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).requests.clone()
    }

    /// Waits until the requests answered 200 satisfy `check`; returns those.
    async fn wait_for_delivered(&self, what: &str, check: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let delivered: Vec<Received> = self.requests().into_iter().filter(|r| r.status == 200).collect();
            if check(&delivered) {
                return delivered;
            }
            if tokio::time::Instant::now() >= deadline {
                let seen: Vec<String> = self
                    .requests()
                    .iter()
                    .map(|r| format!("{} {}", r.status, r.kind()))
                    .collect();
                panic!("timed out after {DEADLINE:?} waiting until {what}; the receiver got {seen:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Reads one request (headers, then `Content-Length` bytes of body), records it, answers, and closes.
async fn serve(mut stream: TcpStream, state: Arc<Mutex<ReceiverState>>) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let headers: HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buffer.len() < head_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer[head_end..].to_vec();
    let status = {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        let id = headers.get("x-leadflow-notification").cloned().unwrap_or_default();
        let attempt = {
            let count = state.attempts.entry(id).or_insert(0);
            *count += 1;
            *count
        };
        let status = if state.always_fail || attempt <= state.fail_first {
            500
        } else {
            200
        };
        state.requests.push(Received { headers, body, status });
        status
    };
    let (reason, text) = if status == 200 {
        ("OK", "thanks")
    } else {
        ("Internal Server Error", "receiver down for maintenance")
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

async fn set_notify_url(app: &TestApp, url: &str) {
    app.db()
        .await
        .execute(
            "UPDATE campaigns SET notify_url = $1 WHERE name = 'cart-recovery'",
            &[&url],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to set notify_url: {e}"));
}

/// (kind, state, attempts, last_error) of every notification, oldest first.
async fn notifications(app: &TestApp) -> Vec<(String, String, i32, Option<String>)> {
    app.db()
        .await
        .query(
            "SELECT kind, state, attempts, last_error FROM notifications ORDER BY id",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("failed to read notifications: {e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

fn of_kind<'a>(requests: &'a [Received], kind: &str) -> Vec<&'a Received> {
    requests.iter().filter(|r| r.kind() == kind).collect()
}

#[tokio::test]
async fn signed_notifications_tell_the_endpoint_of_enrollment_email_sent_and_conversion() {
    let receiver = Receiver::start(0, false).await;
    let app = TestApp::builder().env("LEADFLOW_NOTIFY_SECRET", SECRET).spawn().await;
    set_notify_url(&app, &receiver.url()).await;

    let lead = "ann@example.com";
    app.post_event(&event("checkout.abandoned", lead)).await;
    app.smtp.wait_for_to(lead, 1, DEADLINE).await;
    let mut order = event("order.completed", lead);
    order["data"]["amount"] = json!(89.9);
    order["data"]["currency"] = json!("EUR");
    app.post_event(&order).await;

    let delivered = receiver
        .wait_for_delivered("enrolled, email_sent and converted arrived", |r| {
            ["enrolled", "email_sent", "converted"]
                .iter()
                .all(|k| !of_kind(r, k).is_empty())
        })
        .await;
    for request in &delivered {
        let body = request.json();
        assert_eq!(request.header("content-type"), "application/json");
        assert_eq!(
            request.header("x-leadflow-event"),
            body["kind"].as_str().unwrap_or_default()
        );
        assert_eq!(
            request.header("x-leadflow-notification"),
            body["id"].as_str().unwrap_or("?")
        );
        let signature = request.header("x-leadflow-signature");
        assert!(
            notify::verify(SECRET, signature, &request.body, Duration::from_secs(300)),
            "the signature {signature:?} does not verify"
        );
        assert!(
            !notify::verify("another-secret", signature, &request.body, Duration::from_secs(300)),
            "a signature must not verify with another secret"
        );
        assert_eq!(body["campaign"], "cart-recovery");
        assert_eq!(body["lead"]["email"], lead);
    }
    let ids: BTreeSet<&str> = delivered.iter().map(|r| r.header("x-leadflow-notification")).collect();
    assert_eq!(ids.len(), delivered.len(), "every notification has its own id");

    let first = |kind: &str| of_kind(&delivered, kind)[0].json();
    let (enrolled, sent, converted) = (first("enrolled"), first("email_sent"), first("converted"));
    assert_eq!(enrolled["variant"], "A");
    assert_eq!(enrolled["holdout"], false);
    assert_eq!(sent["step"], 1);
    assert_eq!(converted["step"], 1, "the conversion is credited to the one step sent");
    assert_eq!(converted["order"]["amount"], 89.9);
    assert_eq!(converted["order"]["currency"], "EUR");
    assert_eq!(converted["order"]["id"], order["data"]["order_id"]);
    let at = |v: &Value| v["occurred_at"].as_str().unwrap_or_default().to_string();
    assert!(
        at(&enrolled) <= at(&sent) && at(&sent) <= at(&converted),
        "enrolled, then email_sent, then converted: {enrolled} {sent} {converted}"
    );
}

#[tokio::test]
async fn a_bounce_and_an_unsubscribe_are_notified() {
    let receiver = Receiver::start(0, false).await;
    let app = TestApp::builder().env("LEADFLOW_NOTIFY_SECRET", SECRET).spawn().await;
    set_notify_url(&app, &receiver.url()).await;
    let bouncing = "gone@example.com";
    app.smtp
        .set_rule(bouncing, Rule::always(550, "5.1.1 <gone@example.com>: no such user"));
    app.post_event(&event("checkout.abandoned", bouncing)).await;
    let leaving = "leaving@example.com";
    app.post_event(&event("checkout.abandoned", leaving)).await;
    app.smtp.wait_for_to(leaving, 1, DEADLINE).await;
    app.post_event(&event("lead.unsubscribed", leaving)).await;

    let delivered = receiver
        .wait_for_delivered("bounced and unsubscribed arrived", |r| {
            !of_kind(r, "bounced").is_empty() && !of_kind(r, "unsubscribed").is_empty()
        })
        .await;
    let bounced = of_kind(&delivered, "bounced")[0].json();
    assert_eq!(bounced["lead"]["email"], bouncing);
    assert_eq!(bounced["step"], 1);
    assert!(
        bounced["reason"].as_str().is_some_and(|r| r.contains("5.1.1")),
        "{bounced}"
    );
    let unsubscribed = of_kind(&delivered, "unsubscribed")[0].json();
    assert_eq!(unsubscribed["lead"]["email"], leaving);
    assert_eq!(unsubscribed["reason"], "unsubscribed");
}

#[tokio::test]
async fn a_notification_answered_500_twice_arrives_on_the_third_try() {
    let receiver = Receiver::start(2, false).await;
    let app = TestApp::builder()
        .env("LEADFLOW_NOTIFY_SECRET", SECRET)
        .env("LEADFLOW_NOTIFY_RETRY_BASE", "200ms")
        .spawn()
        .await;
    set_notify_url(&app, &receiver.url()).await;
    let lead = "retry@example.com";
    app.post_event(&event("checkout.abandoned", lead)).await;

    receiver
        .wait_for_delivered("the enrolled notification got through", |r| {
            !of_kind(r, "enrolled").is_empty()
        })
        .await;
    let tries: Vec<Received> = receiver
        .requests()
        .into_iter()
        .filter(|r| r.kind() == "enrolled")
        .collect();
    let statuses: Vec<u16> = tries.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![500, 500, 200]);
    let ids: BTreeSet<&str> = tries.iter().map(|r| r.header("x-leadflow-notification")).collect();
    assert_eq!(ids.len(), 1, "every try carries the same notification id");
    assert!(tries.iter().all(|r| notify::verify(
        SECRET,
        r.header("x-leadflow-signature"),
        &r.body,
        Duration::from_secs(300)
    )));

    let db = app.db().await;
    wait_until("the row shows three attempts", DEADLINE, || async {
        let row = db
            .query_one(
                "SELECT state, attempts, delivered_at IS NOT NULL FROM notifications WHERE kind = 'enrolled'",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("failed to read the notification: {e}"));
        (row.get::<_, String>(0), row.get::<_, i32>(1), row.get::<_, bool>(2)) == ("delivered".to_string(), 3, true)
    })
    .await;

    // The emails went out on their own schedule, whatever the endpoint did.
    app.wait_for_deliveries(lead, "all three steps are sent", |d| {
        d.len() == 3 && d.iter().all(|r| r.state == "sent")
    })
    .await;
    receiver
        .wait_for_delivered("three email_sent notifications got through", |r| {
            of_kind(r, "email_sent").len() == 3
        })
        .await;
}

#[tokio::test]
async fn a_failing_endpoint_never_holds_up_the_emails_and_its_notifications_end_failed() {
    let receiver = Receiver::start(0, true).await;
    let app = TestApp::builder()
        .env("LEADFLOW_NOTIFY_SECRET", SECRET)
        .env("LEADFLOW_NOTIFY_RETRY_BASE", "200ms")
        .env("LEADFLOW_NOTIFY_MAX_ATTEMPTS", "3")
        .spawn()
        .await;
    set_notify_url(&app, &receiver.url()).await;
    let lead = "down@example.com";
    app.post_event(&event("checkout.abandoned", lead)).await;
    app.wait_for_deliveries(lead, "all three steps are sent", |d| {
        d.len() == 3 && d.iter().all(|r| r.state == "sent")
    })
    .await;
    assert_eq!(app.smtp.messages_to(lead).len(), 3);

    wait_until("every notification is given up", DEADLINE, || async {
        let rows = notifications(&app).await;
        rows.len() == 4 && rows.iter().all(|(_, state, _, _)| state == "failed")
    })
    .await;
    for (kind, _, attempts, error) in notifications(&app).await {
        assert_eq!(attempts, 3, "{kind}");
        let error = error.unwrap_or_default();
        assert!(
            error.starts_with("HTTP 500") && error.contains("receiver down for maintenance"),
            "{kind}: {error}"
        );
        assert!(!error.contains("token=abc"), "the URL stays out of the error: {error}");
    }
}

#[tokio::test]
async fn without_a_secret_notifications_fail_unsent_naming_the_variable() {
    let receiver = Receiver::start(0, false).await;
    let app = TestApp::spawn().await;
    set_notify_url(&app, &receiver.url()).await;
    let lead = "unsigned@example.com";
    app.post_event(&event("checkout.abandoned", lead)).await;
    app.wait_for_deliveries(lead, "all three steps are sent", |d| {
        d.len() == 3 && d.iter().all(|r| r.state == "sent")
    })
    .await;

    wait_until(
        "the enrolled and three email_sent notifications failed",
        DEADLINE,
        || async {
            let rows = notifications(&app).await;
            rows.len() == 4 && rows.iter().all(|(_, state, _, _)| state == "failed")
        },
    )
    .await;
    for (kind, _, attempts, error) in notifications(&app).await {
        assert_eq!(attempts, 0, "{kind} was never sent");
        assert!(
            error.as_deref().is_some_and(|e| e.contains("LEADFLOW_NOTIFY_SECRET")),
            "{kind}: {error:?}"
        );
    }
    assert!(receiver.requests().is_empty(), "nothing is ever sent unsigned");
}

#[tokio::test]
async fn a_campaign_without_notify_url_queues_no_notifications() {
    let app = TestApp::builder().env("LEADFLOW_NOTIFY_SECRET", SECRET).spawn().await;
    let lead = "quiet@example.com";
    app.post_event(&event("checkout.abandoned", lead)).await;
    app.wait_for_deliveries(lead, "all three steps are sent", |d| {
        d.len() == 3 && d.iter().all(|r| r.state == "sent")
    })
    .await;
    assert_eq!(app.count("SELECT count(*) FROM notifications").await, 0);
}
