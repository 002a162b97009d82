//! `leadflow leads ...` and `leadflow lists ...`: lead records from the command line, through the HTTP API
//! ([`crate::client`]), so the command line is checked and scoped like every other client.
//!
//! A lead is named by its id or its email address. `--set field=value` takes any profile field
//! (`services/api/src/leads/profile.rs`); `--set custom.plan=Pro` a custom field; `--set tags=a,b` a list.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};

use crate::client::{encode, query, ApiClient};

/// Where the API is and which key to present.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The leadflow API (default: the local one, at LEADFLOW_HTTP_ADDR).
    #[arg(long, env = "LEADFLOW_API_URL", global = true)]
    pub api_url: Option<String>,
    /// An API key (`leadflow keys create`); reading needs `read`, changes `write`, definitions `admin`.
    #[arg(long, env = "LEADFLOW_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
}

impl ApiArgs {
    pub fn client(&self, default_addr: std::net::SocketAddr) -> anyhow::Result<ApiClient> {
        let base = self.api_url.clone().unwrap_or_else(|| format!("http://{default_addr}"));
        ApiClient::new(&base, self.api_key.as_deref().unwrap_or_default())
    }
}

#[derive(Debug, Subcommand)]
pub enum LeadAction {
    /// Show a lead: profile, consent, inquiries.
    Get {
        lead: String,
        #[arg(long)]
        json: bool,
    },
    /// Create a lead (or, if the person exists, add what is new: the answer says it existed).
    Create {
        email: String,
        /// A profile field: `--set city=Berlin --set tags=vip,b2b --set custom.plan=Pro`.
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        set: Vec<String>,
        /// The product the person asks about (a new inquiry when it is another product).
        #[arg(long)]
        product: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Change profile fields (`--set field=value`; an empty value clears it).
    Update {
        lead: String,
        #[arg(long = "set", value_name = "FIELD=VALUE", required = true)]
        set: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Search: `--where city=Berlin --where temperature=hot --sort score:desc`.
    Search {
        /// A filter: created_from, name, email, phone, tag, agent, source, status, city, company, score_min,
        /// temperature, campaign, follow_up_status, email_status, processed_order, list, q, ... (docs/search.md).
        #[arg(long = "where", value_name = "FILTER=VALUE")]
        filters: Vec<String>,
        /// created_at, updated_at, score, last_name or email, with `:asc` or `:desc`.
        #[arg(long)]
        sort: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Follow the cursor to the end instead of one page.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Everything that happened to a lead, newest first.
    Timeline {
        lead: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        cursor: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Add a note, or list the notes when no text is given.
    Note { lead: String, text: Option<String> },
    /// Change a lead's email address; its history stays with it.
    Email { lead: String, new_email: String },
    /// Merge `other` into `survivor`: timeline, inquiries, notes and score move to the survivor.
    Merge { survivor: String, other: String },
    /// Stop every email to a lead, with the reason.
    Suspend {
        lead: String,
        #[arg(long, required = true)]
        reason: String,
    },
    /// Lift a suspension (needs an admin key), with the reason.
    Unsuspend {
        lead: String,
        #[arg(long, required = true)]
        reason: String,
    },
    /// A lead's score, temperature and score ledger.
    Score {
        lead: String,
        #[arg(long)]
        json: bool,
    },
    /// Import a CSV or XLSX file as a background job; waits for it and reports rejected rows by line.
    Import {
        file: PathBuf,
        /// The lead source of new leads (added to the sources if new).
        #[arg(long)]
        source: Option<String>,
        /// Add every imported lead to this static list.
        #[arg(long)]
        list: Option<String>,
        /// An explicit column mapping, `--map "Mobile=phones"`; other headers are matched automatically.
        #[arg(long = "map", value_name = "HEADER=FIELD")]
        map: Vec<String>,
        /// Return once the job is queued instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
    /// The state of an import job and its rejected rows.
    ImportStatus { id: i64 },
    /// Export the leads matching `--where` filters as CSV or XLSX (streamed).
    Export {
        #[arg(long = "where", value_name = "FILTER=VALUE")]
        filters: Vec<String>,
        #[arg(long, default_value = "csv")]
        format: String,
        /// The file to write (standard output for CSV when not given).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Write the sample import sheet (every importable column and two example rows).
    Sample {
        #[arg(long, default_value = "csv")]
        format: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Custom fields (at most 30): list, add, remove.
    Fields {
        #[command(subcommand)]
        action: FieldAction,
    },
    /// Everything stored about an address, as JSON (the right of access); needs an admin key.
    ExportData { email: String },
    /// Delete the lead and its personal data; a suppression entry with the address's hash only is kept.
    Erase { email: String },
}

#[derive(Debug, Subcommand)]
pub enum FieldAction {
    List,
    /// `leadflow leads fields add plan --kind choice --choices Basic,Pro --label "Plan"`.
    Add {
        name: String,
        /// text, number, date, boolean or choice.
        #[arg(long)]
        kind: String,
        #[arg(long)]
        label: Option<String>,
        /// For `choice`: the allowed values, comma separated.
        #[arg(long)]
        choices: Option<String>,
    },
    Remove {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ListAction {
    /// Every static list and segment.
    List,
    /// A static list: `leadflow lists create vip`; a segment: `--where temperature=hot --where city=Berlin`.
    Create {
        name: String,
        #[arg(long = "where", value_name = "FILTER=VALUE")]
        filters: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Add leads (ids or emails) to a static list.
    Add {
        name: String,
        leads: Vec<String>,
    },
    /// The leads of a list or segment.
    Members {
        name: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    Delete {
        name: String,
    },
}

/// Splits `field=value`.
fn pair(raw: &str, what: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = raw
        .split_once('=')
        .with_context(|| format!("{what} {raw:?} is not of the form FIELD=VALUE"))?;
    Ok((k.trim().to_string(), v.trim().to_string()))
}

/// `--set` pairs as a profile input object: lists for phones and tags, booleans as given, `custom.x` nested.
fn profile_input(set: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut input = Map::new();
    let mut custom = Map::new();
    for raw in set {
        let (field, value) = pair(raw, "--set")?;
        let value = if value.is_empty() {
            Value::Null
        } else if matches!(field.as_str(), "phones" | "tags") {
            json!(value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>())
        } else {
            Value::String(value)
        };
        match field.strip_prefix("custom.") {
            Some(name) => {
                custom.insert(name.to_string(), value);
            }
            None => {
                input.insert(field, value);
            }
        }
    }
    if !custom.is_empty() {
        input.insert("custom".into(), Value::Object(custom));
    }
    Ok(input)
}

fn filters(raw: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    raw.iter().map(|f| pair(f, "--where")).collect()
}

/// The id of the lead named by `lead` (an id, or an email looked up through search).
async fn lead_id(api: &ApiClient, lead: &str) -> anyhow::Result<i64> {
    if let Ok(id) = lead.trim().parse::<i64>() {
        return Ok(id);
    }
    let page = api
        .get(&format!("/v1/leads?email={}&limit=1", encode(lead.trim())))
        .await?;
    page["items"][0]["id"]
        .as_i64()
        .with_context(|| format!("no lead with the email {}", lead.trim()))
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn print_lead(lead: &Value) {
    let skip = ["consent", "custom", "attributes", "inquiries"];
    if let Some(map) = lead.as_object() {
        for (k, v) in map {
            if !skip.contains(&k.as_str()) && !v.is_null() && v != &json!([]) {
                println!("{k:<26} {}", text(v));
            }
        }
        for (k, v) in map.get("custom").and_then(Value::as_object).into_iter().flatten() {
            println!("{:<26} {}", format!("custom.{k}"), text(v));
        }
    }
    let consent = &lead["consent"];
    for mark in ["unsubscribed", "invalid_email", "suspended"] {
        if !consent[mark].is_null() {
            println!(
                "{:<26} yes (cause {}, reason {})",
                mark,
                text(&consent[mark]["cause"]),
                text(&consent[mark]["reason"])
            );
        }
    }
}

fn print_leads(items: &[Value]) {
    for lead in items {
        let name = format!("{} {}", text(&lead["first_name"]), text(&lead["last_name"]));
        println!(
            "{:<8} {:<36} {:<26} {:<10} {:>7} {}",
            text(&lead["id"]),
            text(&lead["email"]),
            name.trim(),
            text(&lead["status"]),
            lead["score"].as_f64().map_or("-".into(), |s| format!("{s:.1}")),
            text(&lead["temperature"])
        );
    }
}

pub async fn run(action: LeadAction, api: &ApiClient) -> anyhow::Result<()> {
    match action {
        LeadAction::Get { lead, json } => {
            let id = lead_id(api, &lead).await?;
            let answer = api.get(&format!("/v1/leads/{id}")).await?;
            if json {
                return print_json(&answer);
            }
            let shown = if answer["lead"].is_object() {
                &answer["lead"]
            } else {
                &answer
            };
            print_lead(shown);
            let inquiries = answer["inquiries"].as_array().or_else(|| shown["inquiries"].as_array());
            for inquiry in inquiries.into_iter().flatten() {
                println!(
                    "inquiry {:<6} {:<20} {:<12} follow-up {:<12} email {:<10} order {}",
                    text(&inquiry["id"]),
                    text(&inquiry["product_sku"]),
                    text(&inquiry["status"]),
                    text(&inquiry["follow_up_status"]),
                    text(&inquiry["email_status"]),
                    text(&inquiry["processed_order"])
                );
            }
        }
        LeadAction::Create {
            email,
            set,
            product,
            json,
        } => {
            let mut input = profile_input(&set)?;
            input.insert("email".into(), Value::String(email));
            if let Some(sku) = product {
                input.insert("inquiry".into(), json!({ "product_sku": sku }));
            }
            let answer = api.post("/v1/leads", &Value::Object(input)).await?;
            if json {
                return print_json(&answer);
            }
            let id = text(&answer["lead"]["id"]);
            if answer["existed"] == Value::Bool(true) {
                println!("lead {id} already existed; updated");
            } else {
                println!("lead {id} created");
            }
            if answer["inquiry"].is_object() {
                println!("inquiry {} added", text(&answer["inquiry"]["id"]));
            }
        }
        LeadAction::Update { lead, set, json } => {
            let id = lead_id(api, &lead).await?;
            let answer = api
                .patch(&format!("/v1/leads/{id}"), &Value::Object(profile_input(&set)?))
                .await?;
            if json {
                return print_json(&answer);
            }
            println!("lead {id} updated");
        }
        LeadAction::Search {
            filters: raw,
            sort,
            limit,
            all,
            json,
        } => {
            let mut params = filters(&raw)?;
            if let Some(sort) = sort {
                params.push(("sort".into(), sort));
            }
            params.push(("limit".into(), limit.to_string()));
            let mut cursor: Option<String> = None;
            let mut total = 0usize;
            loop {
                let mut page_params = params.clone();
                if let Some(c) = &cursor {
                    page_params.push(("cursor".into(), c.clone()));
                }
                let page = api.get(&format!("/v1/leads{}", query(&page_params))).await?;
                let items = page["items"].as_array().cloned().unwrap_or_default();
                total += items.len();
                if json {
                    for item in &items {
                        println!("{}", serde_json::to_string(item)?);
                    }
                } else {
                    print_leads(&items);
                }
                cursor = page["next_cursor"].as_str().map(str::to_string);
                if !all || cursor.is_none() {
                    break;
                }
            }
            if !json {
                eprintln!(
                    "{total} lead(s){}",
                    if cursor.is_some() { "; more with --all" } else { "" }
                );
            }
        }
        LeadAction::Timeline {
            lead,
            limit,
            cursor,
            json,
        } => {
            let id = lead_id(api, &lead).await?;
            let mut params = vec![("limit".to_string(), limit.to_string())];
            if let Some(c) = cursor {
                params.push(("cursor".into(), c));
            }
            let page = api.get(&format!("/v1/leads/{id}/timeline{}", query(&params))).await?;
            if json {
                return print_json(&page);
            }
            for entry in page["items"].as_array().into_iter().flatten() {
                println!(
                    "{:<26} {:<16} {}",
                    text(&entry["at"]),
                    text(&entry["kind"]),
                    text(&entry["summary"])
                );
            }
            if let Some(next) = page["next_cursor"].as_str() {
                eprintln!("older: --cursor {next}");
            }
        }
        LeadAction::Note { lead, text: body } => {
            let id = lead_id(api, &lead).await?;
            match body {
                Some(body) => {
                    let note = api
                        .post(&format!("/v1/leads/{id}/notes"), &json!({ "body": body }))
                        .await?;
                    println!("note {} added", text(&note["id"]));
                }
                None => {
                    let notes = api.get(&format!("/v1/leads/{id}/notes")).await?;
                    let items = notes["items"].as_array().or_else(|| notes.as_array());
                    for note in items.into_iter().flatten() {
                        println!(
                            "#{:<6} {:<26} {:<16} {}",
                            text(&note["id"]),
                            text(&note["updated_at"]),
                            text(&note["author"]),
                            text(&note["body"])
                        );
                    }
                }
            }
        }
        LeadAction::Email { lead, new_email } => {
            let id = lead_id(api, &lead).await?;
            api.put(&format!("/v1/leads/{id}/email"), &json!({ "email": new_email }))
                .await?;
            println!("lead {id}: email changed; its history stays with it");
        }
        LeadAction::Merge { survivor, other } => {
            let survivor = lead_id(api, &survivor).await?;
            let other = lead_id(api, &other).await?;
            api.post(&format!("/v1/leads/{survivor}/merge"), &json!({ "from": other }))
                .await?;
            println!("lead {other} merged into {survivor}");
        }
        LeadAction::Suspend { lead, reason } => {
            let id = lead_id(api, &lead).await?;
            api.post(&format!("/v1/leads/{id}/suspend"), &json!({ "reason": reason }))
                .await?;
            println!("lead {id} suspended: no email goes to it");
        }
        LeadAction::Unsuspend { lead, reason } => {
            let id = lead_id(api, &lead).await?;
            api.post(&format!("/v1/leads/{id}/unsuspend"), &json!({ "reason": reason }))
                .await?;
            println!("lead {id}: suspension lifted");
        }
        LeadAction::Score { lead, json } => {
            let id = lead_id(api, &lead).await?;
            let score = api.get(&format!("/v1/leads/{id}/score")).await?;
            if json {
                return print_json(&score);
            }
            println!(
                "score {} ({})",
                score["score"].as_f64().map_or("-".into(), |s| format!("{s:.1}")),
                text(&score["temperature"])
            );
            let ledger = score["ledger"]["items"]
                .as_array()
                .or_else(|| score["ledger"].as_array());
            for row in ledger.into_iter().flatten() {
                println!(
                    "{:<26} {:>+8.1} -> {:>7.1}  {}",
                    text(&row["created_at"]),
                    row["points"].as_f64().unwrap_or_default(),
                    row["score"].as_f64().unwrap_or_default(),
                    text(&row["reason"])
                );
            }
        }
        LeadAction::Import {
            file,
            source,
            list,
            map,
            no_wait,
        } => import(api, &file, source, list, &map, no_wait).await?,
        LeadAction::ImportStatus { id } => {
            let job = api.get(&format!("/v1/imports/{id}")).await?;
            print_job(&job);
            print_import_errors(api, id).await?;
        }
        LeadAction::Export {
            filters: raw,
            format,
            output,
        } => {
            if format != "csv" && output.is_none() {
                anyhow::bail!("--output is required for {format} (it is not text)");
            }
            let mut params = filters(&raw)?;
            params.push(("format".into(), format));
            let bytes = api
                .download(&format!("/v1/leads/export{}", query(&params)), output.as_deref())
                .await?;
            if let Some(file) = output {
                eprintln!("{bytes} bytes written to {}", file.display());
            }
        }
        LeadAction::Sample { format, output } => {
            if format != "csv" && output.is_none() {
                anyhow::bail!("--output is required for {format} (it is not text)");
            }
            api.download(&format!("/v1/imports/sample.{}", encode(&format)), output.as_deref())
                .await?;
        }
        LeadAction::Fields { action } => match action {
            FieldAction::List => {
                let fields = api.get("/v1/lead-fields").await?;
                let items = fields["items"].as_array().or_else(|| fields.as_array());
                for f in items.into_iter().flatten() {
                    println!(
                        "{:<24} {:<8} {:<24} {}",
                        text(&f["name"]),
                        text(&f["kind"]),
                        text(&f["label"]),
                        text(&f["choices"])
                    );
                }
            }
            FieldAction::Add {
                name,
                kind,
                label,
                choices,
            } => {
                let choices: Vec<String> = choices
                    .map(|c| {
                        c.split(',')
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .collect()
                    })
                    .unwrap_or_default();
                let label = label.unwrap_or_else(|| name.clone());
                api.post(
                    "/v1/lead-fields",
                    &json!({ "name": name, "label": label, "kind": kind, "choices": choices }),
                )
                .await?;
                println!("custom field {name} ({kind}) defined");
            }
            FieldAction::Remove { name } => {
                api.delete(&format!("/v1/lead-fields/{}", encode(&name))).await?;
                println!("custom field {name} removed");
            }
        },
        LeadAction::ExportData { email } => {
            let data = api.get(&format!("/v1/admin/leads/{}", encode(&email))).await?;
            print_json(&data)?;
        }
        LeadAction::Erase { email } => {
            let erased = api.delete(&format!("/v1/admin/leads/{}", encode(&email))).await?;
            if erased["lead_deleted"] == Value::Bool(true) {
                println!(
                    "lead erased: {} events, {} enrollments, {} deliveries, {} conversions deleted; \
                     kept a suppression by hash {}",
                    text(&erased["events"]),
                    text(&erased["enrollments"]),
                    text(&erased["deliveries"]),
                    text(&erased["conversions"]),
                    text(&erased["email_hash"])
                );
            } else {
                println!(
                    "no lead with that address; kept a suppression by hash {}",
                    text(&erased["email_hash"])
                );
            }
        }
    }
    Ok(())
}

fn print_job(job: &Value) {
    println!(
        "import #{} {}: {} of {} rows done, {} created, {} updated, {} rejected",
        text(&job["id"]),
        text(&job["state"]),
        text(&job["rows_done"]),
        text(&job["rows_total"]),
        text(&job["rows_created"]),
        text(&job["rows_updated"]),
        text(&job["rows_rejected"])
    );
    if let Some(columns) = job["unmapped_columns"].as_array().filter(|c| !c.is_empty()) {
        println!("columns not imported: {}", text(&Value::Array(columns.clone())));
    }
    if let Some(error) = job["error"].as_str() {
        println!("error: {error}");
    }
}

async fn print_import_errors(api: &ApiClient, id: i64) -> anyhow::Result<u64> {
    let mut count = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/imports/{id}/errors?limit=500");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", encode(c)));
        }
        let errors = api.get(&path).await?;
        let items = errors["items"].as_array().or_else(|| errors.as_array());
        for e in items.into_iter().flatten() {
            count += 1;
            println!(
                "line {}: {}: {}",
                text(&e["line"]),
                text(&e["field"]),
                text(&e["detail"])
            );
        }
        cursor = errors["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            return Ok(count);
        }
    }
}

async fn import(
    api: &ApiClient,
    file: &std::path::Path,
    source: Option<String>,
    list: Option<String>,
    map: &[String],
    no_wait: bool,
) -> anyhow::Result<()> {
    let extension = file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let (format, content_type) = match extension.as_str() {
        "xlsx" => (
            "xlsx",
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        ),
        "csv" | "txt" => ("csv", "text/csv"),
        other => anyhow::bail!("{}: .{other} is not an import format (csv or xlsx)", file.display()),
    };
    let mut params = vec![("format".to_string(), format.to_string())];
    if let Some(name) = file.file_name().and_then(|n| n.to_str()) {
        params.push(("file_name".into(), name.to_string()));
    }
    if let Some(source) = source {
        params.push(("source".into(), source));
    }
    if let Some(list) = list {
        params.push(("list".into(), list));
    }
    if !map.is_empty() {
        let mut mapping = Map::new();
        for raw in map {
            let (header, field) = pair(raw, "--map")?;
            mapping.insert(header, Value::String(field));
        }
        params.push(("mapping".into(), Value::Object(mapping).to_string()));
    }
    let job = api
        .upload(&format!("/v1/imports{}", query(&params)), content_type, file)
        .await?;
    let id = job["id"].as_i64().context("the API did not answer a job id")?;
    println!("import #{id} queued");
    if no_wait {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    let mut last_done = None;
    let job = loop {
        let job = api.get(&format!("/v1/imports/{id}")).await?;
        let state = job["state"].as_str().unwrap_or_default().to_string();
        if state == "done" || state == "failed" {
            break job;
        }
        if job["rows_done"] != Value::Null && last_done.as_ref() != Some(&job["rows_done"]) {
            eprintln!("{} of {} rows", text(&job["rows_done"]), text(&job["rows_total"]));
            last_done = Some(job["rows_done"].clone());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "import #{id} is still {state} after an hour; check it with `leadflow leads import-status {id}`"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    print_job(&job);
    let rejected = print_import_errors(api, id).await?;
    if job["state"] == "failed" {
        anyhow::bail!("import #{id} failed");
    }
    if rejected > 0 {
        anyhow::bail!("{rejected} row(s) rejected (lines above); the other rows were imported");
    }
    Ok(())
}

/// `leadflow lists ...`.
pub async fn lists(action: ListAction, api: &ApiClient) -> anyhow::Result<()> {
    match action {
        ListAction::List => {
            let lists = api.get("/v1/lists").await?;
            let items = lists["items"].as_array().or_else(|| lists.as_array());
            for l in items.into_iter().flatten() {
                println!(
                    "{:<28} {:<8} {}",
                    text(&l["name"]),
                    text(&l["kind"]),
                    text(&l["description"])
                );
            }
        }
        ListAction::Create {
            name,
            filters: raw,
            description,
        } => {
            let pairs = filters(&raw)?;
            let body = if pairs.is_empty() {
                json!({ "name": name, "kind": "static", "description": description })
            } else {
                let filter: Map<String, Value> = pairs.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
                json!({ "name": name, "kind": "segment", "filter": filter, "description": description })
            };
            api.post("/v1/lists", &body).await?;
            println!("list {name} created");
        }
        ListAction::Add { name, leads } => {
            let mut ids = Vec::new();
            for lead in &leads {
                ids.push(lead_id(api, lead).await?);
            }
            let answer = api
                .post(
                    &format!("/v1/lists/{}/members", encode(&name)),
                    &json!({ "lead_ids": ids }),
                )
                .await?;
            println!("{} lead(s) added to {name}", text(&answer["added"]));
        }
        ListAction::Members { name, limit, json } => {
            let page = api
                .get(&format!("/v1/lists/{}/members?limit={limit}", encode(&name)))
                .await?;
            let items = page["items"].as_array().cloned().unwrap_or_default();
            if json {
                return print_json(&Value::Array(items));
            }
            print_leads(&items);
        }
        ListAction::Delete { name } => {
            api.delete(&format!("/v1/lists/{}", encode(&name))).await?;
            println!("list {name} deleted");
        }
    }
    Ok(())
}
