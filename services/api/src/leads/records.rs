//! Lead records under `/v1`: creating a lead (or adding what is new to the one that exists), reading and editing it,
//! inquiries, notes with their history, changing the email, merging two leads, suspending, the timeline, and the
//! definitions a profile refers to (custom fields, statuses, sources, contact methods, agents).
//!
//! Every change runs in one transaction, writes a `lead_changes` row naming the API key, and moves `updated_at`.
//! Values are checked by [`profile`] whichever door they come in by.

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use deadpool_postgres::GenericClient;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio_postgres::error::SqlState;

use leadflow_shared::config::IdentityKey;
use leadflow_shared::domain::EmailAddress;
use leadflow_shared::http::Problem;
use leadflow_shared::suppression::{self, Reason};

use super::identity;
use super::profile::{self, Access, FieldError, Kind, ProfileInput, WriteError};
use crate::auth::{Administrator, Reader, Writer};
use crate::problem::{self, PathParams};
use crate::{consent, ApiState};

/// Timeline entries per page unless `limit` says otherwise, and the most one page holds.
pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;
/// The longest suspension reason kept.
const MAX_REASON_CHARS: usize = 500;

/// Every records route.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/leads", post(create))
        .route("/v1/leads/{id}", get(read).patch(update))
        .route("/v1/leads/{id}/notes", get(notes).post(add_note))
        .route("/v1/leads/{id}/notes/{note_id}", put(edit_note).delete(delete_note))
        .route("/v1/leads/{id}/email", put(change_email))
        .route("/v1/leads/{id}/merge", post(merge))
        .route("/v1/leads/{id}/suspend", post(suspend))
        .route("/v1/leads/{id}/unsuspend", post(unsuspend))
        .route("/v1/leads/{id}/timeline", get(timeline))
        .route("/v1/lead-fields", get(list_fields).post(define_field))
        .route("/v1/lead-fields/{name}", axum::routing::delete(remove_field))
        .route(
            "/v1/lead-statuses",
            get(|r: Reader, s: State<ApiState>| list_definitions(&STATUSES, r, s))
                .post(|a: Administrator, s: State<ApiState>, b: Bytes| define(&STATUSES, a, s, b)),
        )
        .route(
            "/v1/lead-sources",
            get(|r: Reader, s: State<ApiState>| list_definitions(&SOURCES, r, s))
                .post(|a: Administrator, s: State<ApiState>, b: Bytes| define(&SOURCES, a, s, b)),
        )
        .route(
            "/v1/contact-methods",
            get(|r: Reader, s: State<ApiState>| list_definitions(&CONTACT_METHODS, r, s))
                .post(|a: Administrator, s: State<ApiState>, b: Bytes| define(&CONTACT_METHODS, a, s, b)),
        )
        .route(
            "/v1/agents",
            get(|r: Reader, s: State<ApiState>| list_definitions(&AGENTS, r, s))
                .post(|a: Administrator, s: State<ApiState>, b: Bytes| define(&AGENTS, a, s, b)),
        )
}

// ---------------------------------------------------------------------------------------------------------------
// Shared pieces

/// A database failure: the field it is about when the caller can fix it (409 for a value another lead has or an
/// origin field already set, 400 otherwise), else 500.
fn db_problem(what: &str, e: tokio_postgres::Error) -> Problem {
    match profile::field_error(&e) {
        Some(field) => field_problem(field),
        None => problem::internal(what, e.into()),
    }
}

fn field_problem(e: FieldError) -> Problem {
    let conflict = profile::field(&e.field).is_some_and(|f| f.access == Access::Origin)
        || matches!(e.field.as_str(), "created_at" | "email" | "customer_id");
    if conflict {
        problem::conflict(&e.field, format!("{}: {}", e.field, e.detail))
    } else {
        e.into_problem()
    }
}

fn write_problem(e: WriteError) -> Problem {
    match e {
        WriteError::Field(field) => field_problem(field),
        WriteError::Database(e) => problem::internal("failed to write the lead", e.into()),
    }
}

fn internal(what: &str) -> impl FnOnce(tokio_postgres::Error) -> Problem + '_ {
    move |e| problem::internal(what, e.into())
}

/// The body as a JSON object.
fn object_body(body: &[u8]) -> Result<Map<String, Value>, Problem> {
    match problem::json_body(body)? {
        Value::Object(map) => Ok(map),
        _ => Err(Problem::bad_request("the body must be a JSON object")),
    }
}

/// A required, trimmed, one-line text of at most `max` characters in `field`.
fn required_text(input: &Map<String, Value>, field: &str, max: usize) -> Result<String, Problem> {
    let text = match input.get(field) {
        Some(Value::String(s)) => s.trim().to_string(),
        Some(Value::Null) | None => String::new(),
        Some(_) => return Err(Problem::invalid_field(field, "must be a string")),
    };
    if text.is_empty() {
        return Err(Problem::invalid_field(field, "required"));
    }
    if text.chars().count() > max {
        return Err(Problem::invalid_field(field, format!("at most {max} characters")));
    }
    Ok(text)
}

/// Refuses keys of `input` other than `allowed`, naming the first.
fn only(input: &Map<String, Value>, allowed: &[&str]) -> Result<(), Problem> {
    match input.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(unknown) => Err(Problem::invalid_field(
            unknown.as_str(),
            format!("unknown field; expected {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

/// The lead as the API shows it, or 404.
async fn lead_json(client: &impl GenericClient, id: i64) -> Result<Value, Problem> {
    let row = client
        .query_opt(
            &format!("SELECT {} FROM leads l WHERE l.id = $1", profile::SELECT),
            &[&id],
        )
        .await
        .map_err(internal("failed to read the lead"))?;
    row.as_ref().map(profile::lead_json).ok_or_else(|| not_found(id))
}

async fn inquiries_of(client: &impl GenericClient, id: i64) -> Result<Vec<Value>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT to_jsonb(i) FROM inquiries i WHERE i.lead_id = $1 ORDER BY i.created_at, i.id",
            &[&id],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Locks the lead for the rest of the transaction; returns its email, or 404.
async fn lock_lead(tx: &impl GenericClient, id: i64) -> Result<String, Problem> {
    tx.query_opt("SELECT email FROM leads WHERE id = $1 FOR UPDATE", &[&id])
        .await
        .map_err(internal("failed to read the lead"))?
        .map(|r| r.get(0))
        .ok_or_else(|| not_found(id))
}

fn not_found(id: i64) -> Problem {
    problem::not_found(format!("no lead with id {id}"))
}

/// Writes a change log row.
async fn record_change(
    tx: &impl GenericClient,
    lead_id: i64,
    kind: &str,
    changes: &Value,
    actor: &str,
) -> Result<(), Problem> {
    tx.execute(
        "INSERT INTO lead_changes (lead_id, kind, changes, actor) VALUES ($1, $2, $3, $4)",
        &[&lead_id, &kind, changes, &actor],
    )
    .await
    .map_err(internal("failed to record the change"))?;
    Ok(())
}

/// Last updated moves with every action on the lead.
async fn touch(tx: &impl GenericClient, lead_id: i64) -> Result<(), Problem> {
    tx.execute("UPDATE leads SET updated_at = now() WHERE id = $1", &[&lead_id])
        .await
        .map_err(internal("failed to update the lead"))?;
    Ok(())
}

async fn rescore(tx: &impl GenericClient, lead_id: i64, actor: &str) -> Result<(), Problem> {
    leadflow_scheduler::scoring::rescore_lead(tx, lead_id, actor)
        .await
        .map_err(|e| problem::internal("failed to rescore the lead", e))
}

async fn commit(tx: deadpool_postgres::Transaction<'_>) -> Result<(), Problem> {
    tx.commit().await.map_err(internal("failed to commit"))
}

// ---------------------------------------------------------------------------------------------------------------
// Create, read, edit

/// The inquiry a create request may carry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct InquiryInput {
    product_sku: Option<String>,
    product_name: Option<String>,
    lead_source: Option<String>,
}

fn inquiry_input(value: Value) -> Result<InquiryInput, Problem> {
    let input: InquiryInput = problem::from_value(value).map_err(|p| match p.field {
        Some(f) => Problem::invalid_field(format!("inquiry.{f}"), p.detail),
        None => Problem::invalid_field("inquiry", p.detail),
    })?;
    let clean = |field: &str, v: Option<String>| -> Result<Option<String>, Problem> {
        let Some(v) = v.map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        if v.chars().count() > 200 || v.chars().any(char::is_control) {
            return Err(Problem::invalid_field(
                format!("inquiry.{field}"),
                "at most 200 characters, one line",
            ));
        }
        Ok(Some(v))
    };
    Ok(InquiryInput {
        product_sku: clean("product_sku", input.product_sku)?,
        product_name: clean("product_name", input.product_name)?,
        lead_source: clean("lead_source", input.lead_source)?,
    })
}

/// For a lead that exists: list values are added to (not replaced), origin fields already set are left alone.
async fn as_addition(tx: &impl GenericClient, id: i64, input: &mut ProfileInput) -> Result<(), Problem> {
    let current: Value = tx
        .query_one("SELECT to_jsonb(l) FROM leads l WHERE l.id = $1", &[&id])
        .await
        .map_err(internal("failed to read the lead"))?
        .get(0);
    for (name, value) in input.standard.iter_mut() {
        let Some(field) = profile::field(name) else { continue };
        if field.access == Access::Origin && !current[name.as_str()].is_null() {
            *value = current[name.as_str()].clone();
        }
        if let Kind::TextList { items, .. } = field.kind {
            let mut list: Vec<Value> = current[name.as_str()].as_array().cloned().unwrap_or_default();
            for v in value.as_array().into_iter().flatten() {
                if !list.contains(v) {
                    list.push(v.clone());
                }
            }
            list.truncate(items);
            *value = Value::Array(list);
        }
    }
    Ok(())
}

/// The lead with `email`, locked, created when there is none; and whether it existed.
async fn lead_by_email(tx: &impl GenericClient, email: &EmailAddress) -> Result<(i64, bool), Problem> {
    let inserted = tx
        .query_opt(
            "INSERT INTO leads (email) VALUES ($1) ON CONFLICT (email) DO NOTHING RETURNING id",
            &[&email.as_str()],
        )
        .await
        .map_err(|e| db_problem("failed to create the lead", e))?;
    match inserted {
        Some(row) => Ok((row.get(0), false)),
        None => {
            let row = tx
                .query_one("SELECT id FROM leads WHERE email = $1 FOR UPDATE", &[&email.as_str()])
                .await
                .map_err(internal("failed to read the lead"))?;
            Ok((row.get(0), true))
        }
    }
}

/// `POST /v1/leads`: creates a lead from a profile object, or, when a lead has the email, adds what is new to it
/// (200 with `existed: true`). An `inquiry` opens an inquiry (another product is a new inquiry on the same lead).
/// Keyed on customer ids (`LEADFLOW_IDENTITY_KEY=customer_id`), `customer_id` is required and finds the lead, whose
/// email follows the request's ([`identity::find_or_create`]).
pub async fn create(Writer(key): Writer, State(state): State<ApiState>, body: Bytes) -> Result<Response, Problem> {
    let mut input = object_body(&body)?;
    let inquiry = match input.remove("inquiry") {
        None | Some(Value::Null) => None,
        Some(value) => Some(inquiry_input(value)?),
    };
    let email = profile::check_email(&input).map_err(FieldError::into_problem)?;
    let customer_id = match state.identity {
        IdentityKey::Email => None,
        IdentityKey::CustomerId => Some(identity::check_customer_id(&input).map_err(FieldError::into_problem)?),
    };
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(internal("failed to begin"))?;
    let defs = profile::custom_fields(&tx)
        .await
        .map_err(internal("failed to read the custom fields"))?;
    let mut checked = profile::check_input(&input, &defs).map_err(FieldError::into_problem)?;
    let (id, existed) = match &customer_id {
        // Keyed on customer ids: the customer's lead (its email following the request's), else a new one.
        Some(customer_id) => {
            let (id, created) = identity::find_or_create(&tx, customer_id, &email, &key.name)
                .await
                .map_err(|e| match e {
                    identity::KeyError::Field(field) => field_problem(field),
                    identity::KeyError::Failed(e) => problem::internal("failed to find the customer's lead", e),
                })?;
            (id, !created)
        }
        None => lead_by_email(&tx, &email).await?,
    };
    if existed {
        as_addition(&tx, id, &mut checked).await?;
    }
    let changes = profile::write(&tx, id, &checked).await.map_err(write_problem)?;
    if !existed {
        // The origin is written once, now: what the request gave, else the lead's source, else the API itself.
        tx.execute(
            "UPDATE leads l SET source = coalesce(l.source,
                        (SELECT name FROM lead_sources WHERE name = l.original_source), 'api'),
                    original_source = coalesce(l.original_source, l.source, 'api'),
                    original_source_category = coalesce(l.original_source_category,
                        (SELECT category FROM lead_sources WHERE name = coalesce(l.original_source, l.source, 'api')))
              WHERE l.id = $1",
            &[&id],
        )
        .await
        .map_err(|e| db_problem("failed to set the lead's origin", e))?;
    }
    if !existed || !changes.is_empty() {
        let kind = if existed { "updated" } else { "created" };
        record_change(&tx, id, kind, &Value::Object(changes), &key.name).await?;
    }
    let inquiry = match inquiry {
        Some(inquiry) => Some(open_inquiry(&tx, id, &inquiry).await?),
        None => None,
    };
    if existed {
        touch(&tx, id).await?;
    }
    rescore(&tx, id, &key.name).await?;
    let lead = lead_json(&tx, id).await?;
    commit(tx).await?;
    tracing::info!(lead.id = id, email = %email.masked(), existed, actor = key.name, "lead created or updated");
    let status = if existed { StatusCode::OK } else { StatusCode::CREATED };
    let answer = json!({ "lead": lead, "existed": existed, "inquiry": inquiry });
    Ok((status, [(header::LOCATION, format!("/v1/leads/{id}"))], Json(answer)).into_response())
}

/// Opens the inquiry about the product (keyed like enrollments: `product:<sku>`), or returns the open one.
async fn open_inquiry(tx: &impl GenericClient, lead_id: i64, inquiry: &InquiryInput) -> Result<Value, Problem> {
    let subject = inquiry
        .product_sku
        .as_deref()
        .map(|sku| format!("product:{sku}"))
        .unwrap_or_default();
    let row = tx
        .query_one(
            "INSERT INTO inquiries (lead_id, subject, product_sku, product_name, lead_source)
             VALUES ($1, $2, $3, $4, coalesce($5, 'api'))
             ON CONFLICT (lead_id, subject) DO UPDATE SET
                 product_name = coalesce(EXCLUDED.product_name, inquiries.product_name),
                 updated_at = now()
             RETURNING to_jsonb(inquiries), (xmax = 0)",
            &[
                &lead_id,
                &subject,
                &inquiry.product_sku,
                &inquiry.product_name,
                &inquiry.lead_source,
            ],
        )
        .await
        .map_err(internal("failed to record the inquiry"))?;
    let mut value: Value = row.get(0);
    value["new"] = Value::Bool(row.get(1));
    Ok(value)
}

/// `GET /v1/leads/{id}`: the lead and its inquiries.
pub async fn read(
    _: Reader,
    State(state): State<ApiState>,
    PathParams(id): PathParams<i64>,
) -> Result<Json<Value>, Problem> {
    let client = problem::client(&state).await?;
    let lead = lead_json(&client, id).await?;
    let inquiries = inquiries_of(&client, id)
        .await
        .map_err(internal("failed to read the inquiries"))?;
    Ok(Json(json!({ "lead": lead, "inquiries": inquiries })))
}

/// `PATCH /v1/leads/{id}`: changes profile fields; an origin field already set is refused (409 naming it).
pub async fn update(
    Writer(key): Writer,
    State(state): State<ApiState>,
    PathParams(id): PathParams<i64>,
    body: Bytes,
) -> Result<Json<Value>, Problem> {
    let input = object_body(&body)?;
    if input.contains_key("email") {
        return Err(Problem::invalid_field(
            "email",
            "the email is changed with PUT /v1/leads/{id}/email, which keeps the lead's history",
        ));
    }
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(internal("failed to begin"))?;
    let defs = profile::custom_fields(&tx)
        .await
        .map_err(internal("failed to read the custom fields"))?;
    let checked = profile::check_input(&input, &defs).map_err(FieldError::into_problem)?;
    if state.identity == IdentityKey::CustomerId {
        identity::check_keeps_customer_id(&checked).map_err(FieldError::into_problem)?;
    }
    if checked.is_empty() {
        return Err(Problem::bad_request("nothing to change: give at least one field"));
    }
    lock_lead(&tx, id).await?;
    let changes = profile::write(&tx, id, &checked).await.map_err(write_problem)?;
    if !changes.is_empty() {
        let kind = if changes.len() == 1 && changes.contains_key("status") {
            "status"
        } else {
            "updated"
        };
        record_change(&tx, id, kind, &Value::Object(changes.clone()), &key.name).await?;
        rescore(&tx, id, &key.name).await?;
    }
    let lead = lead_json(&tx, id).await?;
    commit(tx).await?;
    Ok(Json(json!({ "lead": lead, "changes": changes })))
}

// ---------------------------------------------------------------------------------------------------------------
// Notes

fn note_json(row: &tokio_postgres::Row) -> Value {
    row.get(0)
}

const NOTE: &str = "jsonb_build_object('id', n.id, 'lead_id', n.lead_id, 'body', n.body, 'author', n.author,
    'created_at', n.created_at, 'updated_at', n.updated_at,
    'revisions', (SELECT coalesce(jsonb_agg(jsonb_build_object('body', r.body, 'author', r.author,
                                                              'replaced_at', r.replaced_at) ORDER BY r.replaced_at, r.id), '[]')
                    FROM lead_note_revisions r WHERE r.note_id = n.id))";

fn note_body(body: &[u8]) -> Result<String, Problem> {
    let input = object_body(body)?;
    only(&input, &["body"])?;
    let text = required_text(&input, "body", 10_000)?;
    Ok(text)
}

/// `POST /v1/leads/{id}/notes`
pub async fn add_note(
    Writer(key): Writer,
    State(state): State<ApiState>,
    PathParams(id): PathParams<i64>,
    body: Bytes,
) -> Result<Response, Problem> {
    let text = note_body(&body)?;
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(internal("failed to begin"))?;
    lock_lead(&tx, id).await?;
    let row = tx
        .query_one(
            &format!(
                "WITH n AS (INSERT INTO lead_notes (lead_id, body, author) VALUES ($1, $2, $3) RETURNING *)
                 SELECT {NOTE} FROM n"
            ),
            &[&id, &text, &key.name],
        )
        .await
        .map_err(internal("failed to add the note"))?;
    touch(&tx, id).await?;
    commit(tx).await?;
    Ok((StatusCode::CREATED, Json(note_json(&row))).into_response())
}

/// `GET /v1/leads/{id}/notes`: notes not deleted, newest first, each with its earlier texts.
pub async fn notes(
    _: Reader,
    State(state): State<ApiState>,
    PathParams(id): PathParams<i64>,
) -> Result<Json<Value>, Problem> {
    let client = problem::client(&state).await?;
    lead_json(&client, id).await?;
    let rows = client
        .query(
            &format!(
                "SELECT {NOTE} FROM lead_notes n WHERE n.lead_id = $1 AND n.deleted_at IS NULL
                 ORDER BY n.created_at DESC, n.id DESC"
            ),
            &[&id],
        )
        .await
        .map_err(internal("failed to read the notes"))?;
    Ok(Json(json!({ "items": rows.iter().map(note_json).collect::<Vec<_>>() })))
}

/// `PUT /v1/leads/{id}/notes/{note_id}`: the previous text is kept as a revision.
pub async fn edit_note(
    Writer(key): Writer,
    State(state): State<ApiState>,
    PathParams((id, note_id)): PathParams<(i64, i64)>,
    body: Bytes,
) -> Result<Json<Value>, Problem> {
    let text = note_body(&body)?;
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(internal("failed to begin"))?;
    lock_lead(&tx, id).await?;
    let kept = tx
        .execute(
            "INSERT INTO lead_note_revisions (note_id, body, author)
             SELECT id, body, author FROM lead_notes
              WHERE id = $1 AND lead_id = $2 AND deleted_at IS NULL AND body <> $3",
            &[&note_id, &id, &text],
        )
        .await
        .map_err(internal("failed to keep the note's text"))?;
    let row = tx
        .query_opt(
            &format!(
                "WITH n AS (UPDATE lead_notes SET body = $3, author = CASE WHEN $5 THEN $4 ELSE author END,
                                   updated_at = CASE WHEN $5 THEN now() ELSE updated_at END
                             WHERE id = $1 AND lead_id = $2 AND deleted_at IS NULL RETURNING *)
                 SELECT {NOTE} FROM n"
            ),
            &[&note_id, &id, &text, &key.name, &(kept > 0)],
        )
        .await
        .map_err(internal("failed to edit the note"))?
        .ok_or_else(|| problem::not_found(format!("lead {id} has no note {note_id}")))?;
    touch(&tx, id).await?;
    commit(tx).await?;
    Ok(Json(note_json(&row)))
}

/// `DELETE /v1/leads/{id}/notes/{note_id}`: the note is hidden, not erased (the timeline keeps that it was).
pub async fn delete_note(
    Writer(_): Writer,
    State(state): State<ApiState>,
    PathParams((id, note_id)): PathParams<(i64, i64)>,
) -> Result<Response, Problem> {
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(internal("failed to begin"))?;
    lock_lead(&tx, id).await?;
    let deleted = tx
        .execute(
            "UPDATE lead_notes SET deleted_at = now() WHERE id = $1 AND lead_id = $2 AND deleted_at IS NULL",
            &[&note_id, &id],
        )
        .await
        .map_err(internal("failed to delete the note"))?;
    if deleted == 0 {
        return Err(problem::not_found(format!("lead {id} has no note {note_id}")));
    }
    touch(&tx, id).await?;
    commit(tx).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ---------------------------------------------------------------------------------------------------------------
// Email change, merge

/// Carries the suppressions of `from` (global and per campaign) over to `to`: a person who opted out stays out
/// whichever address the lead has now.
async fn carry_suppressions(
    tx: &impl GenericClient,
    from: &EmailAddress,
    to: &EmailAddress,
    why: &str,
) -> Result<(), Problem> {
    let ended = suppression::carry_over(tx, from, to, why)
        .await
        .map_err(|e| problem::internal("failed to carry the suppressions over", e))?;
    // As with any suppression made over the API: the sequences it ends are notified.
    for (reason, enrollment) in ended {
        consent::notify_ended(tx, reason, why, enrollment)
            .await
            .map_err(|e| problem::internal("failed to queue the notification", e))?;
    }
    Ok(())
}

/// `PUT /v1/leads/{id}/email`: the lead keeps its id, so its events, enrollments, notes and scores stay with it.
pub async fn change_email(
    Writer(key): Writer,
    State(state): State<ApiState>,
    PathParams(id): PathParams<i64>,
    body: Bytes,
) -> Result<Json<Value>, Problem> {
    let input = object_body(&body)?;
    only(&input, &["email"])?;
    let email = profile::check_email(&input).map_err(FieldError::into_problem)?;
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(internal("failed to begin"))?;
    let old = lock_lead(&tx, id).await?;
    if old != email.as_str() {
        tx.execute(
            "UPDATE leads SET email = $2, updated_at = now() WHERE id = $1",
            &[&id, &email.as_str()],
        )
        .await
        .map_err(|e| db_problem("failed to change the email", e))?;
        if let Ok(old_email) = EmailAddress::parse(&old) {
            carry_suppressions(&tx, &old_email, &email, "email-change").await?;
        }
        record_change(
            &tx,
            id,
            "email",
            &json!({ "email": { "from": old, "to": email.as_str() } }),
            &key.name,
        )
        .await?;
        rescore(&tx, id, &key.name).await?;
    }
    let lead = lead_json(&tx, id).await?;
    commit(tx).await?;
    tracing::info!(lead.id = id, email = %email.masked(), actor = key.name, "lead email changed");
    Ok(Json(json!({ "lead": lead })))
}

/// Which columns reference `leads` (every `lead_id`, whatever table it is in), for a merge to move.
async fn lead_references(tx: &impl GenericClient) -> Result<Vec<(String, String)>, Problem> {
    let rows = tx
        .query(
            "SELECT c.conrelid::regclass::text, a.attname::text
               FROM pg_constraint c
               JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
              WHERE c.contype = 'f' AND c.confrelid = 'leads'::regclass AND cardinality(c.conkey) = 1
              ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(internal("failed to read the tables that reference leads"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

fn ident(name: &str) -> String {
    // regclass text is already quoted when it needs to be; a column name is quoted here.
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `POST /v1/leads/{survivor}/merge` `{"from": other}`: everything of `other` moves to the survivor, which keeps
/// its own values and takes the other's where it has none; scores add up; `other` is deleted.
pub async fn merge(
    Writer(key): Writer,
    State(state): State<ApiState>,
    PathParams(survivor): PathParams<i64>,
    body: Bytes,
) -> Result<Json<Value>, Problem> {
    let input = object_body(&body)?;
    only(&input, &["from"])?;
    let other = input
        .get("from")
        .and_then(Value::as_i64)
        .ok_or_else(|| Problem::invalid_field("from", "required: the id of the lead to merge into this one"))?;
    if other == survivor {
        return Err(Problem::invalid_field("from", "a lead cannot be merged into itself"));
    }
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(internal("failed to begin"))?;
    // Both locked, in id order so two opposite merges cannot deadlock.
    let locked = tx
        .query(
            "SELECT id, to_jsonb(l) FROM leads l WHERE id = ANY ($1) ORDER BY id FOR UPDATE",
            &[&vec![survivor, other]],
        )
        .await
        .map_err(internal("failed to read the leads"))?;
    let row_of = |id: i64| {
        locked
            .iter()
            .find(|r| r.get::<_, i64>(0) == id)
            .map(|r| r.get::<_, Value>(1))
    };
    let kept = row_of(survivor).ok_or_else(|| not_found(survivor))?;
    let gone = row_of(other).ok_or_else(|| Problem::invalid_field("from", format!("no lead with id {other}")))?;

    // The other's score first, while its rows are its own: its fading points are carried (decayed to now, with a
    // ledger row); the attribute rules it held are not, the survivor's rescore decides those from the merged
    // profile.
    leadflow_scheduler::scoring::merge_scores(&tx, survivor, other, &key.name)
        .await
        .map_err(|e| problem::internal("failed to carry the merged lead's score", e))?;
    tx.execute("DELETE FROM lead_rule_state WHERE lead_id = $1", &[&other])
        .await
        .map_err(internal("failed to drop the merged lead's rule state"))?;

    // Rows that would clash with the survivor's own: the same inquiry subject, the same enrollment, the same list.
    tx.batch_execute(&format!(
        "UPDATE enrollments e SET inquiry_id = s.id
           FROM inquiries o JOIN inquiries s ON s.lead_id = {survivor} AND s.subject = o.subject
          WHERE o.lead_id = {other} AND e.inquiry_id = o.id;
         UPDATE inquiries s SET product_sku = coalesce(s.product_sku, o.product_sku),
                product_name = coalesce(s.product_name, o.product_name),
                email_status = coalesce(s.email_status, o.email_status),
                processed_order = coalesce(s.processed_order, o.processed_order),
                updated_at = now()
           FROM inquiries o WHERE s.lead_id = {survivor} AND o.lead_id = {other} AND o.subject = s.subject;
         DELETE FROM inquiries o USING inquiries s
          WHERE o.lead_id = {other} AND s.lead_id = {survivor} AND s.subject = o.subject;
         UPDATE enrollments o SET subject = o.subject || ' (lead {other})'
          WHERE o.lead_id = {other} AND EXISTS (SELECT 1 FROM enrollments s WHERE s.lead_id = {survivor}
                                                AND s.campaign_id = o.campaign_id AND s.subject = o.subject);
         DELETE FROM lead_list_members o USING lead_list_members s
          WHERE o.lead_id = {other} AND s.lead_id = {survivor} AND s.list_id = o.list_id;"
    ))
    .await
    .map_err(internal("failed to resolve the merge's clashes"))?;
    let mut moved = Map::new();
    for (table, column) in lead_references(&tx).await? {
        let sql = format!("UPDATE {table} SET {col} = $1 WHERE {col} = $2", col = ident(&column));
        let count = tx.execute(&sql, &[&survivor, &other]).await.map_err(|e| {
            if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                problem::conflict("from", format!("the two leads' {table} rows clash; merge refused"))
            } else {
                problem::internal("failed to move the lead's rows", e.into())
            }
        })?;
        if count > 0 {
            moved.insert(table, json!(count));
        }
    }

    // The survivor takes the other's values where it has none; lists are joined; flags are kept if either had them.
    let mut fill = ProfileInput::default();
    for field in profile::FIELDS {
        let (mine, theirs) = (&kept[field.name], &gone[field.name]);
        let value = match field.kind {
            Kind::TextList { items, .. } => {
                let mut list: Vec<Value> = mine.as_array().cloned().unwrap_or_default();
                for v in theirs.as_array().into_iter().flatten() {
                    if !list.contains(v) {
                        list.push(v.clone());
                    }
                }
                list.truncate(items);
                (Value::Array(list.clone()) != *mine).then_some(Value::Array(list))
            }
            Kind::Boolean => (theirs == &Value::Bool(true) && mine != &Value::Bool(true)).then_some(Value::Bool(true)),
            _ => (mine.is_null() && !theirs.is_null()).then(|| theirs.clone()),
        };
        if let Some(value) = value {
            fill.standard.insert(field.name.to_string(), value);
        }
    }
    for (name, value) in gone["custom"].as_object().into_iter().flatten() {
        if kept["custom"].get(name).is_none() {
            fill.custom.insert(name.clone(), value.clone());
        }
    }
    // The customer id is unique: the other lead must let go of it first.
    tx.execute(
        "UPDATE leads SET customer_id = NULL WHERE id = $1 AND customer_id IS NOT NULL",
        &[&other],
    )
    .await
    .map_err(internal("failed to release the customer id"))?;
    let mut changes = profile::write(&tx, survivor, &fill).await.map_err(write_problem)?;
    tx.execute(
        "UPDATE leads SET attributes = $2::jsonb || attributes,
                suppressed_reason = coalesce(suppressed_reason, $3), suppressed_at = coalesce(suppressed_at, $4),
                updated_at = now()
          WHERE id = $1",
        &[
            &survivor,
            &gone["attributes"],
            &gone["suppressed_reason"].as_str(),
            &gone["suppressed_at"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc)),
        ],
    )
    .await
    .map_err(internal("failed to merge the attributes"))?;
    let (kept_email, gone_email) = (kept["email"].as_str(), gone["email"].as_str());
    if let (Some(Ok(to)), Some(Ok(from))) = (kept_email.map(EmailAddress::parse), gone_email.map(EmailAddress::parse)) {
        carry_suppressions(&tx, &from, &to, "merge").await?;
    }
    changes.insert(
        "merged_from".into(),
        json!({ "id": other, "email": gone["email"], "created_at": gone["created_at"], "score": gone["score"] }),
    );
    record_change(&tx, survivor, "merged", &Value::Object(changes), &key.name).await?;
    tx.execute("DELETE FROM leads WHERE id = $1", &[&other])
        .await
        .map_err(internal("failed to delete the merged lead"))?;
    rescore(&tx, survivor, &key.name).await?;
    let lead = lead_json(&tx, survivor).await?;
    let inquiries = inquiries_of(&tx, survivor)
        .await
        .map_err(internal("failed to read the inquiries"))?;
    commit(tx).await?;
    tracing::info!(lead.id = survivor, merged = other, actor = key.name, "leads merged");
    Ok(Json(
        json!({ "lead": lead, "inquiries": inquiries, "merged_from": other, "moved": moved }),
    ))
}

// ---------------------------------------------------------------------------------------------------------------
// Suspension

fn reason_of(body: &[u8]) -> Result<String, Problem> {
    let input = object_body(body)?;
    only(&input, &["reason"])?;
    let reason = required_text(&input, "reason", MAX_REASON_CHARS)?;
    if reason.chars().any(char::is_control) {
        return Err(Problem::invalid_field(
            "reason",
            "must be one line without control characters",
        ));
    }
    Ok(reason)
}

async fn lead_email(tx: &impl GenericClient, id: i64) -> Result<EmailAddress, Problem> {
    let raw = lock_lead(tx, id).await?;
    EmailAddress::parse(&raw).map_err(|e| problem::internal("the stored email is not valid", anyhow::anyhow!(e.0)))
}

/// `POST /v1/leads/{id}/suspend` `{"reason"}`: no email goes to the lead (its open follow-ups are cancelled) until
/// an administrator lifts it. Shown in the lead's consent.
pub async fn suspend(
    Writer(key): Writer,
    State(state): State<ApiState>,
    PathParams(id): PathParams<i64>,
    body: Bytes,
) -> Result<Json<Value>, Problem> {
    let reason = reason_of(&body)?;
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(internal("failed to begin"))?;
    let email = lead_email(&tx, id).await?;
    let done = consent::suppress_in(&tx, &email, Reason::Suspended, "api", None, Some(&reason))
        .await
        .map_err(|e| problem::internal("failed to suspend the lead", e))?;
    if !done.new {
        let current = suppression::suppressed_reason(&tx, &email, None)
            .await
            .map_err(|e| problem::internal("failed to read the suppression", e))?;
        if current.as_deref() != Some(Reason::Suspended.as_str()) {
            return Err(problem::conflict(
                "reason",
                format!(
                    "the lead is already suppressed ({}): no email goes to it; that mark stays as it is",
                    current.unwrap_or_default()
                ),
            ));
        }
    }
    record_change(&tx, id, "suspended", &json!({ "reason": reason }), &key.name).await?;
    touch(&tx, id).await?;
    let lead = lead_json(&tx, id).await?;
    commit(tx).await?;
    tracing::info!(
        lead.id = id,
        actor = key.name,
        ended = done.ended_enrollments.len(),
        "lead suspended"
    );
    Ok(Json(json!({
        "lead": lead,
        "ended_enrollments": done.ended_enrollments.len(),
        "cancelled_deliveries": done.cancelled_deliveries,
    })))
}

/// `POST /v1/leads/{id}/unsuspend` `{"reason"}` (admin): lifts a suspension, and nothing else (an unsubscribe or
/// a bounce is lifted only by a resubscription).
pub async fn unsuspend(
    Administrator(key): Administrator,
    State(state): State<ApiState>,
    PathParams(id): PathParams<i64>,
    body: Bytes,
) -> Result<Json<Value>, Problem> {
    let reason = reason_of(&body)?;
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(internal("failed to begin"))?;
    let email = lead_email(&tx, id).await?;
    let current = suppression::suppressed_reason(&tx, &email, None)
        .await
        .map_err(|e| problem::internal("failed to read the suppression", e))?;
    match current.as_deref() {
        Some("suspended") => {}
        None => return Err(problem::not_found(format!("lead {id} is not suspended"))),
        Some(other) => {
            return Err(problem::conflict(
                "reason",
                format!("lead {id} is {other}, not suspended; that is lifted by a resubscription, not here"),
            ))
        }
    }
    // Only a global entry is a suspension; suppressed_reason above looked at the global one first.
    suppression::resubscribe(&tx, &email, None, &reason, &key.name)
        .await
        .map_err(|e| problem::internal("failed to lift the suspension", e))?;
    record_change(&tx, id, "unsuspended", &json!({ "reason": reason }), &key.name).await?;
    touch(&tx, id).await?;
    let lead = lead_json(&tx, id).await?;
    commit(tx).await?;
    tracing::info!(lead.id = id, actor = key.name, "lead suspension lifted");
    Ok(Json(json!({ "lead": lead })))
}

// ---------------------------------------------------------------------------------------------------------------
// Timeline

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimelineQuery {
    limit: Option<i64>,
    cursor: Option<String>,
}

/// Where a page ends: the last entry's time and key (entries are ordered by time, then key, newest first).
fn encode_cursor(at: &DateTime<Utc>, key: &str) -> String {
    hex::encode(json!([at.to_rfc3339_opts(SecondsFormat::Micros, true), key]).to_string())
}

fn decode_cursor(raw: &str) -> Option<(DateTime<Utc>, String)> {
    let bytes = hex::decode(raw.trim()).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    let at = DateTime::parse_from_rfc3339(value.get(0)?.as_str()?)
        .ok()?
        .with_timezone(&Utc);
    Some((at, value.get(1)?.as_str()?.to_string()))
}

/// Every kind of entry, as one union over the lead's rows: (at, key, kind, summary, data). `$1` is the lead id,
/// `$2` its email hash. Each part reads by an index on the lead (or the hash).
const TIMELINE: &str = "
    SELECT e.occurred_at AS at, 'ev' || lpad(e.id::text, 20, '0') AS key, 'event' AS kind,
           e.type || coalesce(' (' || coalesce(e.data -> 'product' ->> 'name', e.data -> 'product' ->> 'sku') || ')', '')
             AS summary,
           jsonb_build_object('event_id', e.id, 'type', e.type, 'source', e.source, 'data', e.data) AS data
      FROM events e WHERE e.lead_id = $1
    UNION ALL
    SELECT n.created_at, 'en' || lpad(n.id::text, 20, '0'), 'enrolled',
           'enrolled in ' || c.name || CASE WHEN n.holdout THEN ' (holdout: no email)' ELSE '' END,
           jsonb_build_object('enrollment_id', n.id, 'campaign', c.name, 'subject', n.subject, 'variant', n.variant)
      FROM enrollments n JOIN campaigns c ON c.id = n.campaign_id WHERE n.lead_id = $1
    UNION ALL
    SELECT n.ended_at, 'ex' || lpad(n.id::text, 20, '0'), 'enrollment ended',
           c.name || ' ' || n.status || coalesce(' (' || n.reason || ')', ''),
           jsonb_build_object('enrollment_id', n.id, 'campaign', c.name, 'status', n.status, 'reason', n.reason)
      FROM enrollments n JOIN campaigns c ON c.id = n.campaign_id WHERE n.lead_id = $1 AND n.ended_at IS NOT NULL
    UNION ALL
    SELECT d.sent_at, 'ds' || lpad(d.id::text, 20, '0'), 'email sent',
           'step ' || d.step || ' of ' || c.name || ' sent',
           jsonb_build_object('delivery_id', d.id, 'campaign', c.name, 'step', d.step, 'variant', d.variant)
      FROM deliveries d JOIN campaigns c ON c.id = d.campaign_id WHERE d.lead_id = $1 AND d.sent_at IS NOT NULL
    UNION ALL
    SELECT d.updated_at, 'df' || lpad(d.id::text, 20, '0'),
           CASE WHEN d.state = 'failed' AND d.reason LIKE 'bounced%' THEN 'email bounced'
                ELSE 'email ' || d.state END,
           'step ' || d.step || ' of ' || c.name || ' ' || d.state || coalesce(': ' || d.reason, ''),
           jsonb_build_object('delivery_id', d.id, 'campaign', c.name, 'step', d.step, 'state', d.state,
                              'reason', d.reason)
      FROM deliveries d JOIN campaigns c ON c.id = d.campaign_id
     WHERE d.lead_id = $1 AND d.state IN ('failed', 'cancelled', 'uncertain')
    UNION ALL
    SELECT v.created_at, 'cv' || lpad(v.id::text, 20, '0'), 'order',
           'order ' || coalesce(v.order_id, '?') || coalesce(' (' || v.amount::text || coalesce(' ' || v.currency, '') || ')', '')
             || coalesce(' after ' || c.name || ' step ' || v.step, ''),
           jsonb_build_object('conversion_id', v.id, 'order_id', v.order_id, 'amount', v.amount,
                              'currency', v.currency, 'campaign', c.name, 'step', v.step)
      FROM conversions v LEFT JOIN campaigns c ON c.id = v.campaign_id WHERE v.lead_id = $1
    UNION ALL
    SELECT q.created_at, 'iq' || lpad(q.id::text, 20, '0'), 'inquiry',
           'inquiry about ' || coalesce(q.product_name, q.product_sku, nullif(q.subject, ''), 'no product')
             || coalesce(' (' || q.lead_source || ')', ''),
           jsonb_build_object('inquiry_id', q.id, 'subject', q.subject, 'product_sku', q.product_sku,
                              'lead_source', q.lead_source, 'status', q.status)
      FROM inquiries q WHERE q.lead_id = $1
    UNION ALL
    SELECT s.created_at, 'su' || lpad(s.id::text, 20, '0'), s.reason,
           s.reason || coalesce(' from ' || c.name, '') || ' (' || s.source || ')' || coalesce(': ' || s.note, ''),
           jsonb_build_object('reason', s.reason, 'source', s.source, 'note', s.note, 'campaign', c.name)
      FROM suppressions s LEFT JOIN campaigns c ON c.id = s.campaign_id WHERE s.email_hash = $2
    UNION ALL
    SELECT g.created_at, 'sl' || lpad(g.id::text, 20, '0'), 'resubscribed',
           'mailable again: ' || g.reason || ' (' || g.actor || ')',
           jsonb_build_object('reason', g.reason, 'actor', g.actor, 'campaign_id', g.campaign_id)
      FROM suppression_log g WHERE g.email_hash = $2 AND g.action = 'resubscribed'
    UNION ALL
    SELECT r.created_at, 'sc' || lpad(r.id::text, 20, '0'), 'score',
           to_char(r.points, 'SG999990.0') || ' -> ' || to_char(r.score, 'FM999990.0') || ': ' || r.reason,
           jsonb_build_object('points', r.points, 'score', r.score, 'reason', r.reason, 'rule_id', r.rule_id,
                              'event_id', r.event_id)
      FROM score_ledger r WHERE r.lead_id = $1
    UNION ALL
    SELECT n.created_at, 'no' || lpad(n.id::text, 20, '0'), 'note',
           n.author || ': ' || left(coalesce((SELECT r.body FROM lead_note_revisions r WHERE r.note_id = n.id
                                               ORDER BY r.replaced_at, r.id LIMIT 1), n.body), 200),
           jsonb_build_object('note_id', n.id, 'author', n.author)
      FROM lead_notes n WHERE n.lead_id = $1
    UNION ALL
    SELECT r.replaced_at, 'nr' || lpad(r.id::text, 20, '0'), 'note edited',
           'note ' || n.id || ' edited',
           jsonb_build_object('note_id', n.id, 'previous', r.body, 'previous_author', r.author)
      FROM lead_note_revisions r JOIN lead_notes n ON n.id = r.note_id WHERE n.lead_id = $1
    UNION ALL
    SELECT n.deleted_at, 'nd' || lpad(n.id::text, 20, '0'), 'note deleted', 'note ' || n.id || ' deleted',
           jsonb_build_object('note_id', n.id)
      FROM lead_notes n WHERE n.lead_id = $1 AND n.deleted_at IS NOT NULL
    UNION ALL
    SELECT h.created_at, 'ch' || lpad(h.id::text, 20, '0'),
           CASE h.kind WHEN 'created' THEN 'created' WHEN 'updated' THEN 'profile update'
                       WHEN 'status' THEN 'status change' WHEN 'email' THEN 'email change'
                       WHEN 'merged' THEN 'merge' ELSE h.kind END,
           CASE h.kind
               WHEN 'status' THEN 'status ' || coalesce(h.changes #>> '{status,from}', '-') || ' -> '
                                  || coalesce(h.changes #>> '{status,to}', '-')
               WHEN 'email' THEN 'email changed'
               WHEN 'merged' THEN 'lead ' || coalesce(h.changes #>> '{merged_from,id}', '?') || ' merged in'
               WHEN 'suspended' THEN 'suspended: ' || coalesce(h.changes ->> 'reason', '')
               WHEN 'unsuspended' THEN 'suspension lifted: ' || coalesce(h.changes ->> 'reason', '')
               ELSE h.kind || coalesce(': ' || (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(h.changes) k), '')
           END || ' by ' || h.actor,
           jsonb_build_object('changes', h.changes, 'actor', h.actor)
      FROM lead_changes h WHERE h.lead_id = $1";

/// `GET /v1/leads/{id}/timeline?limit&cursor`: everything that happened to the lead, newest first.
pub async fn timeline(
    _: Reader,
    State(state): State<ApiState>,
    PathParams(id): PathParams<i64>,
    query: Result<Query<TimelineQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Problem> {
    let Query(query) = query.map_err(|e| Problem::bad_request(format!("the query is not valid: {e}")))?;
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(Problem::invalid_field(
            "limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        ));
    }
    let after = match query.cursor.as_deref().filter(|c| !c.trim().is_empty()) {
        Some(raw) => {
            Some(decode_cursor(raw).ok_or_else(|| Problem::invalid_field("cursor", "not a cursor this API gave out"))?)
        }
        None => None,
    };
    let client = problem::client(&state).await?;
    let email: String = client
        .query_opt("SELECT email FROM leads WHERE id = $1", &[&id])
        .await
        .map_err(internal("failed to read the lead"))?
        .map(|r| r.get(0))
        .ok_or_else(|| not_found(id))?;
    let hash = EmailAddress::parse(&email)
        .map(|e| suppression::email_hash(&e))
        .unwrap_or_default();
    let (after_at, after_key) = match &after {
        Some((at, key)) => (Some(*at), Some(key.clone())),
        None => (None, None),
    };
    let rows = client
        .query(
            &format!(
                "SELECT at, key, kind, summary, data FROM ({TIMELINE}) t
                  WHERE at IS NOT NULL AND ($3::timestamptz IS NULL OR (at, key) < ($3, $4::text))
                  ORDER BY at DESC, key DESC LIMIT $5"
            ),
            &[&id, &hash, &after_at, &after_key, &(limit + 1)],
        )
        .await
        .map_err(internal("failed to read the timeline"))?;
    let more = rows.len() as i64 > limit;
    let page = &rows[..rows.len().min(limit as usize)];
    let next_cursor = if more {
        page.last()
            .map(|r| encode_cursor(&r.get::<_, DateTime<Utc>>(0), r.get(1)))
    } else {
        None
    };
    let items: Vec<Value> = page
        .iter()
        .map(|r| {
            json!({
                "at": r.get::<_, DateTime<Utc>>(0).to_rfc3339_opts(SecondsFormat::Micros, true),
                "kind": r.get::<_, String>(2),
                "summary": r.get::<_, Option<String>>(3),
                "data": r.get::<_, Value>(4),
            })
        })
        .collect();
    Ok(Json(json!({ "items": items, "next_cursor": next_cursor })))
}

// ---------------------------------------------------------------------------------------------------------------
// Custom fields

fn field_json(f: &profile::CustomField) -> Value {
    json!({ "name": f.name, "label": f.label, "kind": f.kind.as_str(), "choices": f.choices })
}

/// `GET /v1/lead-fields`: the custom fields and the standard ones.
pub async fn list_fields(_: Reader, State(state): State<ApiState>) -> Result<Json<Value>, Problem> {
    let client = problem::client(&state).await?;
    let defs = profile::custom_fields(&client)
        .await
        .map_err(internal("failed to read the custom fields"))?;
    Ok(Json(json!({
        "items": defs.iter().map(field_json).collect::<Vec<_>>(),
        "limit": profile::MAX_CUSTOM_FIELDS,
        "standard": profile::FIELDS,
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewField {
    name: String,
    label: Option<String>,
    kind: String,
    #[serde(default)]
    choices: Vec<String>,
}

/// `POST /v1/lead-fields` (admin): defines a custom field; at most 30 exist.
pub async fn define_field(_: Administrator, State(state): State<ApiState>, body: Bytes) -> Result<Response, Problem> {
    let new: NewField = problem::from_value(problem::json_body(&body)?)?;
    let name = new.name.trim().to_string();
    let valid_name = name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid_name {
        return Err(Problem::invalid_field(
            "name",
            "a lower-case name of letters, digits and _ (at most 40, starting with a letter), e.g. plan",
        ));
    }
    let kind = profile::CustomKind::parse(new.kind.trim())
        .ok_or_else(|| Problem::invalid_field("kind", "one of text, number, date, boolean, choice"))?;
    let label = new
        .label
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| name.clone());
    if label.chars().count() > 100 || label.chars().any(char::is_control) {
        return Err(Problem::invalid_field("label", "at most 100 characters, one line"));
    }
    let mut choices: Vec<String> = Vec::new();
    for (i, c) in new.choices.iter().enumerate() {
        let c = c.trim();
        if c.is_empty() || c.chars().count() > 100 || c.chars().any(char::is_control) {
            return Err(Problem::invalid_field(
                format!("choices[{i}]"),
                "1 to 100 characters, one line",
            ));
        }
        if !choices.iter().any(|x| x.eq_ignore_ascii_case(c)) {
            choices.push(c.to_string());
        }
    }
    match kind {
        profile::CustomKind::Choice if choices.is_empty() => {
            return Err(Problem::invalid_field(
                "choices",
                "a choice field needs at least one choice",
            ))
        }
        profile::CustomKind::Choice => {}
        _ if !choices.is_empty() => return Err(Problem::invalid_field("choices", "only a choice field has choices")),
        _ => {}
    }
    let client = problem::client(&state).await?;
    client
        .execute(
            "INSERT INTO lead_fields (name, label, kind, choices) VALUES ($1, $2, $3, $4)",
            &[&name, &label, &kind.as_str(), &choices],
        )
        .await
        .map_err(|e| match e.code() {
            Some(c) if *c == SqlState::UNIQUE_VIOLATION => {
                problem::conflict("name", format!("a custom field named {name} exists already"))
            }
            Some(c) if *c == SqlState::CHECK_VIOLATION => problem::conflict(
                "name",
                format!(
                    "at most {} custom fields can be defined; remove one first (DELETE /v1/lead-fields/{{name}})",
                    profile::MAX_CUSTOM_FIELDS
                ),
            ),
            _ => problem::internal("failed to define the field", e.into()),
        })?;
    let field = profile::CustomField {
        name: name.clone(),
        label,
        kind,
        choices,
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/lead-fields/{name}"))],
        Json(field_json(&field)),
    )
        .into_response())
}

/// `DELETE /v1/lead-fields/{name}` (admin): removes the definition and every lead's value of it.
pub async fn remove_field(
    _: Administrator,
    State(state): State<ApiState>,
    PathParams(name): PathParams<String>,
) -> Result<Json<Value>, Problem> {
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(internal("failed to begin"))?;
    let removed = tx
        .execute("DELETE FROM lead_fields WHERE name = $1", &[&name])
        .await
        .map_err(internal("failed to remove the field"))?;
    if removed == 0 {
        return Err(problem::not_found(format!("no custom field named {name}")));
    }
    let cleared = tx
        .execute("UPDATE leads SET custom = custom - $1 WHERE custom ? $1", &[&name])
        .await
        .map_err(internal("failed to clear the field's values"))?;
    commit(tx).await?;
    Ok(Json(json!({ "removed": name, "leads_cleared": cleared })))
}

// ---------------------------------------------------------------------------------------------------------------
// Statuses, sources, contact methods, agents

/// A table of values a profile field refers to.
pub struct Definition {
    table: &'static str,
    /// What one is called, for messages.
    what: &'static str,
    max_name: usize,
    /// Extra text columns besides `name` (`category`, `email`).
    extra: &'static [&'static str],
}

static STATUSES: Definition = Definition {
    table: "lead_statuses",
    what: "status",
    max_name: 60,
    extra: &[],
};
static SOURCES: Definition = Definition {
    table: "lead_sources",
    what: "source",
    max_name: 100,
    extra: &["category"],
};
static CONTACT_METHODS: Definition = Definition {
    table: "contact_methods",
    what: "contact method",
    max_name: 60,
    extra: &[],
};
static AGENTS: Definition = Definition {
    table: "agents",
    what: "agent",
    max_name: 100,
    extra: &["email"],
};

async fn list_definitions(def: &Definition, _: Reader, State(state): State<ApiState>) -> Result<Json<Value>, Problem> {
    let client = problem::client(&state).await?;
    // Table names are constants of this module.
    let rows = client
        .query(
            &format!("SELECT to_jsonb(t) FROM {} t ORDER BY t.created_at, t.name", def.table),
            &[],
        )
        .await
        .map_err(internal("failed to read the definitions"))?;
    Ok(Json(
        json!({ "items": rows.iter().map(|r| r.get::<_, Value>(0)).collect::<Vec<_>>() }),
    ))
}

async fn define(
    def: &Definition,
    _: Administrator,
    State(state): State<ApiState>,
    body: Bytes,
) -> Result<Response, Problem> {
    let input = object_body(&body)?;
    let mut allowed = vec!["name"];
    allowed.extend_from_slice(def.extra);
    only(&input, &allowed)?;
    let name = required_text(&input, "name", def.max_name)?;
    if name.chars().any(char::is_control) {
        return Err(Problem::invalid_field("name", "must be one line"));
    }
    let mut values: Vec<Option<String>> = Vec::new();
    for column in def.extra {
        let value = match input.get(*column) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
            Some(Value::String(_) | Value::Null) | None => None,
            Some(_) => return Err(Problem::invalid_field(*column, "must be a string")),
        };
        if value
            .as_ref()
            .is_some_and(|v| v.chars().count() > 200 || v.chars().any(char::is_control))
        {
            return Err(Problem::invalid_field(*column, "at most 200 characters, one line"));
        }
        if *column == "email" {
            if let Some(raw) = &value {
                EmailAddress::parse(raw).map_err(|e| Problem::invalid_field("email", e.0))?;
            }
        }
        values.push(value);
    }
    let columns: String = def.extra.iter().map(|c| format!(", {c}")).collect();
    let placeholders: String = (0..def.extra.len()).map(|i| format!(", ${}", i + 2)).collect();
    let sql = format!(
        "INSERT INTO {} (name{columns}) VALUES ($1{placeholders}) RETURNING to_jsonb({}.*)",
        def.table, def.table
    );
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    params.push(&name);
    for v in &values {
        params.push(v);
    }
    let client = problem::client(&state).await?;
    let row = client.query_one(&sql, &params).await.map_err(|e| {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            problem::conflict("name", format!("the {} {name:?} exists already", def.what))
        } else {
            problem::internal("failed to add the definition", e.into())
        }
    })?;
    Ok((StatusCode::CREATED, Json(row.get::<_, Value>(0))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_what_it_was_made_of() {
        let at = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let cursor = encode_cursor(&at, "ev00000000000000000042");
        assert_eq!(decode_cursor(&cursor), Some((at, "ev00000000000000000042".to_string())));
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor(&hex::encode("[1,2]")), None);
    }

    #[test]
    fn an_origin_field_or_a_taken_email_is_a_conflict_and_a_bad_value_a_bad_request() {
        assert_eq!(
            field_problem(FieldError::new("original_source", "set once")).status_code,
            409
        );
        assert_eq!(field_problem(FieldError::new("email", "taken")).status_code, 409);
        assert_eq!(field_problem(FieldError::new("status", "not defined")).status_code, 400);
    }
}
