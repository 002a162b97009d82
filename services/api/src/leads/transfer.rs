//! Import and export of leads under `/v1`: an uploaded CSV or XLSX file becomes a background job
//! (`POST /v1/imports`, run by [`worker`]) whose progress and rejected rows (by line) can be read; a sample sheet
//! shows every importable column; `GET /v1/leads/export` streams the leads a filter matches as CSV or XLSX
//! ([`export`]). Importing needs the `write` scope, reading jobs, samples and exports `read`.

mod columns;
mod export;
mod sheet;
pub mod worker;

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use deadpool_postgres::GenericClient;
use serde_json::{json, Map, Value};

use leadflow_shared::http::Problem;
use leadflow_shared::lead_filter::{LeadFilter, ResolveError, Sort};

use self::columns::Cell;
use self::sheet::Format;
use crate::auth::{Reader, Writer};
use crate::leads::profile::{self, CustomField, CustomKind};
use crate::problem::{self, PathParams};
use crate::ApiState;

/// The largest file `POST /v1/imports` takes (about a million rows of a typical sheet).
pub const IMPORT_FILE_BYTES: usize = 64 * 1024 * 1024;
/// Page sizes of the job and error lists.
const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 500;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route(
            "/v1/imports",
            post(create).layer(DefaultBodyLimit::max(IMPORT_FILE_BYTES)).get(list),
        )
        .route("/v1/imports/sample.csv", get(sample_csv))
        .route("/v1/imports/sample.xlsx", get(sample_xlsx))
        .route("/v1/imports/{id}", get(get_job))
        .route("/v1/imports/{id}/errors", get(errors))
        .route("/v1/leads/export", get(export))
}

/// The query string as pairs, in order (a key may repeat).
fn pairs(query: Option<String>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The query parameters by name, refusing any not in `known` and any given twice.
fn params(query: Option<String>, known: &[&str]) -> Result<HashMap<String, String>, Problem> {
    let mut params = HashMap::new();
    for (key, value) in pairs(query) {
        if !known.contains(&key.as_str()) {
            return Err(Problem::invalid_field(
                key,
                format!("unknown parameter; expected {}", known.join(", ")),
            ));
        }
        if params.insert(key.clone(), value).is_some() {
            return Err(Problem::invalid_field(key, "given twice"));
        }
    }
    Ok(params)
}

/// `limit` (default 50, at most 500).
fn limit(params: &HashMap<String, String>) -> Result<i64, Problem> {
    match params.get("limit") {
        None => Ok(DEFAULT_PAGE),
        Some(raw) => raw
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| Problem::invalid_field("limit", format!("must be a whole number from 1 to {MAX_PAGE}"))),
    }
}

/// An opaque cursor holding one number (a job id or a line).
fn encode_cursor(n: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("after:{n}"))
}

fn decode_cursor(params: &HashMap<String, String>) -> Result<Option<i64>, Problem> {
    let Some(raw) = params.get("cursor") else {
        return Ok(None);
    };
    URL_SAFE_NO_PAD
        .decode(raw.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.strip_prefix("after:").and_then(|n| n.parse::<i64>().ok()))
        .map(Some)
        .ok_or_else(|| Problem::invalid_field("cursor", "is not a cursor this list returned"))
}

/// A job as the API shows it (without the file): every column, `list` by name.
const JOB: &str = "(to_jsonb(j) - 'content' - 'lease_until') || jsonb_build_object('list', ll.name) AS job
    FROM import_jobs j LEFT JOIN lead_lists ll ON ll.id = j.list_id";

fn db_error(what: &str) -> impl FnOnce(tokio_postgres::Error) -> Problem + '_ {
    move |e| problem::internal(what, e.into())
}

/// A name given as a parameter: trimmed, 1 to `max` characters, no control characters.
fn name_param(params: &HashMap<String, String>, key: &str, max: usize) -> Result<Option<String>, Problem> {
    let Some(raw) = params.get(key) else {
        return Ok(None);
    };
    let name = raw.trim();
    if name.is_empty() || name.chars().count() > max || name.chars().any(char::is_control) {
        return Err(Problem::invalid_field(
            key,
            format!("must be 1 to {max} characters without control characters"),
        ));
    }
    Ok(Some(name.to_string()))
}

/// The import format: `format=`, else the content type, else the file name's extension.
fn import_format(params: &HashMap<String, String>, headers: &HeaderMap) -> Result<Format, Problem> {
    if let Some(raw) = params.get("format") {
        return Format::parse(raw).ok_or_else(|| Problem::invalid_field("format", "must be csv or xlsx"));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if content_type.starts_with("text/csv") {
        return Ok(Format::Csv);
    }
    if content_type.contains("spreadsheetml") {
        return Ok(Format::Xlsx);
    }
    let extension = params
        .get("file_name")
        .and_then(|name| name.rsplit_once('.'))
        .map(|(_, ext)| ext.to_ascii_lowercase());
    match extension.as_deref() {
        Some("csv" | "txt") => Ok(Format::Csv),
        Some("xlsx") => Ok(Format::Xlsx),
        _ => Err(Problem::invalid_field(
            "format",
            "give format=csv or format=xlsx (or send Content-Type text/csv or the XLSX type)",
        )),
    }
}

/// `POST /v1/imports?format=&file_name=&source=&list=&mapping=` with the file as the body: queues a job (202).
async fn create(
    Writer(key): Writer,
    State(state): State<ApiState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Response, Problem> {
    let params = params(query, &["format", "file_name", "source", "list", "mapping"])?;
    let format = import_format(&params, &headers)?;
    if body.is_empty() {
        return Err(Problem::bad_request(
            "the body is empty: send the file as the request body",
        ));
    }
    if format == Format::Xlsx && !body.starts_with(b"PK\x03\x04") {
        return Err(Problem::invalid_field(
            "format",
            "the body is not an XLSX workbook; send CSV with format=csv",
        ));
    }
    let file_name = name_param(&params, "file_name", 255)?;
    let source = name_param(&params, "source", 100)?;
    let list = name_param(&params, "list", 100)?;
    let mapping: Map<String, Value> = match params.get("mapping") {
        None => Map::new(),
        Some(raw) => match serde_json::from_str(raw) {
            Ok(Value::Object(mapping)) => mapping,
            _ => {
                return Err(Problem::invalid_field(
                    "mapping",
                    "must be a JSON object of column header to field name, e.g. {\"Mobile\": \"phones\"}",
                ))
            }
        },
    };
    let mut client = problem::client(&state).await?;
    let defs = profile::custom_fields(&client)
        .await
        .map_err(db_error("failed to read the custom fields"))?;
    for (header, field) in &mapping {
        let name = match field {
            Value::String(name) => name.as_str(),
            Value::Null => "",
            _ => {
                return Err(Problem::invalid_field(
                    "mapping",
                    format!("{header}: must map to a field name"),
                ))
            }
        };
        columns::parse_target(name, &defs)
            .map_err(|detail| Problem::invalid_field("mapping", format!("{header}: {detail}")))?;
    }
    let tx = client
        .transaction()
        .await
        .map_err(db_error("failed to begin a transaction"))?;
    if let Some(source) = &source {
        tx.execute(
            "INSERT INTO lead_sources (name, category) VALUES ($1, 'import') ON CONFLICT (name) DO NOTHING",
            &[source],
        )
        .await
        .map_err(db_error("failed to add the import's source"))?;
    }
    let list_id = match &list {
        Some(name) => Some(static_list(&tx, name).await?),
        None => None,
    };
    let id: i64 = tx
        .query_one(
            "INSERT INTO import_jobs (format, file_name, source, list_id, mapping, actor, content)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            &[
                &format.as_str(),
                &file_name,
                &source,
                &list_id,
                &Value::Object(mapping),
                &key.name,
                &body.as_ref(),
            ],
        )
        .await
        .map_err(db_error("failed to queue the import"))?
        .get(0);
    let row = tx
        .query_one(&format!("SELECT {JOB} WHERE j.id = $1"), &[&id])
        .await
        .map_err(db_error("failed to read the queued import"))?;
    tx.commit().await.map_err(db_error("failed to queue the import"))?;
    let job: Value = row.get("job");
    tracing::info!(job.id = %job["id"], bytes = body.len(), format = format.as_str(), "import queued");
    let location = format!("/v1/imports/{}", job["id"]);
    let mut response = (StatusCode::ACCEPTED, Json(job)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// The id of the static list `name`, created when missing; a saved filter of that name is refused.
async fn static_list(tx: &impl GenericClient, name: &str) -> Result<i64, Problem> {
    tx.execute(
        "INSERT INTO lead_lists (name, kind) VALUES ($1, 'static') ON CONFLICT (name) DO NOTHING",
        &[&name],
    )
    .await
    .map_err(db_error("failed to create the import's list"))?;
    let row = tx
        .query_one("SELECT id, kind FROM lead_lists WHERE name = $1", &[&name])
        .await
        .map_err(db_error("failed to read the import's list"))?;
    if row.get::<_, &str>("kind") != "static" {
        return Err(Problem::invalid_field(
            "list",
            format!("{name:?} is a saved filter; imports add leads to static lists only"),
        ));
    }
    Ok(row.get("id"))
}

/// `GET /v1/imports?limit=&cursor=`: jobs, newest first.
async fn list(_: Reader, State(state): State<ApiState>, RawQuery(query): RawQuery) -> Result<Response, Problem> {
    let params = params(query, &["limit", "cursor"])?;
    let limit = limit(&params)?;
    let after = decode_cursor(&params)?.unwrap_or(i64::MAX);
    let client = problem::client(&state).await?;
    let rows = client
        .query(
            &format!("SELECT j.id, {JOB} WHERE j.id < $1 ORDER BY j.id DESC LIMIT $2"),
            &[&after, &(limit + 1)],
        )
        .await
        .map_err(db_error("failed to list imports"))?;
    let more = rows.len() as i64 > limit;
    let items: Vec<Value> = rows.iter().take(limit as usize).map(|r| r.get("job")).collect();
    let next = more
        .then(|| rows.get(limit as usize - 1).map(|r| encode_cursor(r.get("id"))))
        .flatten();
    Ok(Json(json!({"items": items, "next_cursor": next})).into_response())
}

/// `GET /v1/imports/{id}`: the job with its progress.
async fn get_job(
    _: Reader,
    State(state): State<ApiState>,
    PathParams(id): PathParams<i64>,
) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    let row = client
        .query_opt(&format!("SELECT {JOB} WHERE j.id = $1"), &[&id])
        .await
        .map_err(db_error("failed to read the import"))?
        .ok_or_else(|| problem::not_found(format!("no import #{id}")))?;
    Ok(Json(row.get::<_, Value>("job")).into_response())
}

/// `GET /v1/imports/{id}/errors?limit=&cursor=`: the rejected rows by line.
async fn errors(
    _: Reader,
    State(state): State<ApiState>,
    PathParams(id): PathParams<i64>,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    let params = params(query, &["limit", "cursor"])?;
    let limit = limit(&params)?;
    let after = decode_cursor(&params)?.unwrap_or(0);
    let after = i32::try_from(after).unwrap_or(i32::MAX);
    let client = problem::client(&state).await?;
    let exists = client
        .query_opt("SELECT 1 FROM import_jobs WHERE id = $1", &[&id])
        .await
        .map_err(db_error("failed to read the import"))?;
    if exists.is_none() {
        return Err(problem::not_found(format!("no import #{id}")));
    }
    let rows = client
        .query(
            "SELECT line, field, detail FROM import_errors WHERE job_id = $1 AND line > $2 ORDER BY line LIMIT $3",
            &[&id, &after, &(limit + 1)],
        )
        .await
        .map_err(db_error("failed to read the import's errors"))?;
    let more = rows.len() as i64 > limit;
    let items: Vec<Value> = rows
        .iter()
        .take(limit as usize)
        .map(|r| {
            json!({
                "line": r.get::<_, i32>("line"),
                "field": r.get::<_, Option<String>>("field"),
                "detail": r.get::<_, String>("detail"),
            })
        })
        .collect();
    let next = more
        .then(|| {
            rows.get(limit as usize - 1)
                .map(|r| encode_cursor(i64::from(r.get::<_, i32>("line"))))
        })
        .flatten();
    Ok(Json(json!({"items": items, "next_cursor": next})).into_response())
}

/// Example values for the sample sheet's two rows, by column.
fn example(column: &str, second: bool, defs: &[CustomField]) -> Cell {
    if let Some(name) = column.strip_prefix("custom.") {
        let Some(def) = defs.iter().find(|d| d.name == name) else {
            return Cell::Text(String::new());
        };
        return match def.kind {
            CustomKind::Text => Cell::Text(if second { "other text" } else { "some text" }.into()),
            CustomKind::Number => Cell::Number(if second { 7.5 } else { 42.0 }),
            CustomKind::Date => Cell::Text(if second { "1985-11-30" } else { "1990-01-12" }.into()),
            CustomKind::Boolean => Cell::Text(if second { "false" } else { "true" }.into()),
            CustomKind::Choice => Cell::Text(
                def.choices
                    .get(usize::from(second))
                    .or(def.choices.first())
                    .cloned()
                    .unwrap_or_default(),
            ),
        };
    }
    let (first, other) = match column {
        "email" => ("ann.example@example.com", "bob.sample@example.org"),
        "first_name" => ("Ann", "Bob"),
        "last_name" => ("Example", "Sample"),
        "gender" => ("female", "male"),
        "title" => ("Dr.", ""),
        "phones" => ("+49 30 1234567, +49 171 7654321", "+43 1 2345678"),
        "address" => ("Hauptstraße 1", "Ringstraße 12"),
        "city" => ("Berlin", "Wien"),
        "region" => ("Berlin", "Wien"),
        "district" => ("Mitte", "Innere Stadt"),
        "division" => ("", ""),
        "postal_code" => ("10115", "1010"),
        "country" => ("DE", "AT"),
        "language" => ("de", "de-AT"),
        "timezone" => ("Europe/Berlin", "Europe/Vienna"),
        "profession" => ("Architect", "Carpenter"),
        "company_name" => ("Example GmbH", "Sample KG"),
        "company_size" => ("11-50", "1-10"),
        "company_website" => ("https://example.com", "https://example.org"),
        "company_sector" => ("Construction", "Crafts"),
        "customer_id" => ("", "C-1002"),
        "external_id" => ("crm-0001", "crm-0002"),
        "status" => ("Active", "Active"),
        "source" => ("web form", "New prospect"),
        "contact_method" => ("Email", "Telephone"),
        "agent" => ("", ""),
        "is_customer" => ("false", "true"),
        "tags" => ("fair-2026, newsletter", "vip"),
        "do_not_call" => ("false", "false"),
        "original_source" => ("web form", "New prospect"),
        "original_source_category" => ("form", "manual"),
        "search_keyword" => ("garden house", ""),
        _ => ("", ""),
    };
    Cell::Text(if second { other } else { first }.to_string())
}

async fn sample(state: &ApiState, format: Format) -> Result<Response, Problem> {
    let client = problem::client(state).await?;
    let defs = profile::custom_fields(&client)
        .await
        .map_err(db_error("failed to read the custom fields"))?;
    let header = columns::importable(&defs);
    let rows: Vec<Vec<Cell>> = [false, true]
        .into_iter()
        .map(|second| header.iter().map(|c| example(c, second, &defs)).collect())
        .collect();
    let body = match format {
        Format::Csv => {
            let mut out = Vec::new();
            export::csv_line(header.iter().cloned(), &mut out);
            for row in &rows {
                export::csv_line(row.iter().map(Cell::text), &mut out);
            }
            out
        }
        Format::Xlsx => sample_workbook(&header, &rows)
            .map_err(|e| problem::internal("failed to write the sample workbook", e.into()))?,
    };
    Ok(download(format, "leadflow-import-sample", Body::from(body), None))
}

fn sample_workbook(header: &[String], rows: &[Vec<Cell>]) -> Result<Vec<u8>, rust_xlsxwriter::XlsxError> {
    let mut workbook = rust_xlsxwriter::Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.set_name("Leads")?;
    for (col, name) in header.iter().enumerate() {
        sheet.write_string(0, col as u16, name)?;
    }
    for (index, row) in rows.iter().enumerate() {
        for (col, cell) in row.iter().enumerate() {
            let at = (index as u32 + 1, col as u16);
            match cell {
                Cell::Number(n) => {
                    sheet.write_number(at.0, at.1, *n)?;
                }
                Cell::Text(text) if !text.is_empty() => {
                    sheet.write_string(at.0, at.1, text)?;
                }
                Cell::Text(_) => {}
            }
        }
    }
    workbook.save_to_buffer()
}

/// `GET /v1/imports/sample.csv`: every importable column and two example rows.
async fn sample_csv(_: Reader, State(state): State<ApiState>) -> Result<Response, Problem> {
    sample(&state, Format::Csv).await
}

/// `GET /v1/imports/sample.xlsx`.
async fn sample_xlsx(_: Reader, State(state): State<ApiState>) -> Result<Response, Problem> {
    sample(&state, Format::Xlsx).await
}

/// A file answer: its type, `Content-Disposition: attachment`, and its length when known.
fn download(format: Format, stem: &str, body: Body, length: Option<u64>) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
    if let Ok(value) = HeaderValue::from_str(&format!("attachment; filename=\"{stem}.{}\"", format.as_str())) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    response
}

/// `GET /v1/leads/export?format=csv|xlsx&sort=&<filters>`: every lead the filters match (the search's filters,
/// see `GET /v1/leads`), streamed; ordered by id unless `sort` is given.
async fn export(_: Reader, State(state): State<ApiState>, RawQuery(query): RawQuery) -> Result<Response, Problem> {
    let mut format = Format::Csv;
    let mut sort = None;
    let mut filters = Vec::new();
    for (key, value) in pairs(query) {
        match key.as_str() {
            "format" => {
                format = Format::parse(&value).ok_or_else(|| Problem::invalid_field("format", "must be csv or xlsx"))?
            }
            "sort" => sort = Some(Sort::parse(&value).map_err(|e| Problem::invalid_field(e.field, e.detail))?),
            _ => filters.push((key, value)),
        }
    }
    let mut filter = LeadFilter::from_pairs(&filters).map_err(|e| Problem::invalid_field(e.field, e.detail))?;
    let client = problem::client(&state).await?;
    filter.resolve_lists(&client).await.map_err(|e| match e {
        ResolveError::Invalid(e) => Problem::invalid_field(e.field, e.detail),
        ResolveError::Database(e) => problem::internal("failed to read the filter's lists", e.into()),
    })?;
    let defs = profile::custom_fields(&client)
        .await
        .map_err(db_error("failed to read the custom fields"))?;
    let columns = columns::exported(&defs);
    let (condition, params) = filter.to_sql(1);
    let selection = export::Selection {
        condition,
        params,
        order_by: sort.map_or_else(|| "l.id ASC".to_string(), |s| s.order_by()),
    };
    let stem = format!("leads-{}", chrono::Utc::now().format("%Y%m%d-%H%M%S"));
    let (body, length) = match format {
        Format::Csv => (export::csv(client, columns, selection).await, None),
        Format::Xlsx => match export::xlsx(client, columns, selection).await {
            Ok((body, length)) => (Ok(body), Some(length)),
            Err(e) => (Err(e), None),
        },
    };
    let body = body.map_err(|e| problem::internal("failed to export leads", e))?;
    Ok(download(format, &stem, body, length))
}
