//! `/v1/lists`: static lists (members added and removed by hand or import) and segments (a saved filter, its
//! members the leads matching it when read). Either can be a campaign's audience; a list a campaign or a segment
//! uses cannot be deleted.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_postgres::error::SqlState;

use leadflow_shared::http::Problem;
use leadflow_shared::lead_filter::LeadFilter;

use super::search::{self, PageRequest, Pairs};
use crate::auth::{Reader, Writer};
use crate::problem::{self, PathParams};
use crate::ApiState;

/// The most lead ids one request may add.
const MAX_MEMBERS_PER_REQUEST: usize = 10_000;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/lists", get(list_all).post(create))
        .route("/v1/lists/{name}", get(get_one).delete(remove))
        .route("/v1/lists/{name}/members", get(members).post(add_members))
        .route("/v1/lists/{name}/members/{lead_id}", delete(remove_member))
}

/// A new list as a request gives it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewList {
    name: String,
    /// `static` or `segment`; left out: a segment when a filter is given, else static.
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    filter: Option<Value>,
    #[serde(default)]
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewMembers {
    lead_ids: Vec<i64>,
}

/// A list as stored.
struct ListRow {
    id: i64,
    name: String,
    kind: String,
    filter: Option<Value>,
    description: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// Static lists only: how many members it has.
    member_count: Option<i64>,
}

impl ListRow {
    const SELECT: &'static str = "SELECT ll.id, ll.name, ll.kind, ll.filter, ll.description, ll.created_at,
            ll.updated_at,
            CASE WHEN ll.kind = 'static'
                 THEN (SELECT count(*) FROM lead_list_members m WHERE m.list_id = ll.id) END AS member_count
       FROM lead_lists ll";

    fn from_row(r: &tokio_postgres::Row) -> Self {
        Self {
            id: r.get("id"),
            name: r.get("name"),
            kind: r.get("kind"),
            filter: r.get("filter"),
            description: r.get("description"),
            created_at: r.get("created_at"),
            updated_at: r.get("updated_at"),
            member_count: r.get("member_count"),
        }
    }

    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "filter": self.filter,
            "description": self.description,
            "member_count": self.member_count,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        })
    }
}

async fn load(client: &impl GenericClient, name: &str) -> Result<ListRow, Problem> {
    client
        .query_opt(&format!("{} WHERE ll.name = $1", ListRow::SELECT), &[&name])
        .await
        .map_err(|e| problem::internal("failed to load the list", e.into()))?
        .map(|r| ListRow::from_row(&r))
        .ok_or_else(|| problem::not_found(format!("no list named {name:?}")))
}

/// `GET /v1/lists`: `{items: [list...]}` by name.
async fn list_all(_: Reader, State(state): State<ApiState>) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    let rows = client
        .query(&format!("{} ORDER BY ll.name", ListRow::SELECT), &[])
        .await
        .map_err(|e| problem::internal("failed to load lists", e.into()))?;
    let items: Vec<Value> = rows.iter().map(|r| ListRow::from_row(r).json()).collect();
    Ok(Json(json!({ "items": items })).into_response())
}

/// `GET /v1/lists/{name}`
async fn get_one(
    _: Reader,
    State(state): State<ApiState>,
    PathParams(name): PathParams<String>,
) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    Ok(Json(load(&client, &name).await?.json()).into_response())
}

/// `POST /v1/lists` with `{name, kind, filter, description}`: 201; 409 when the name is taken. A segment's
/// filter is checked as a search would check it (errors name `filter.<key>`) and stored in its canonical form.
async fn create(_: Writer, State(state): State<ApiState>, body: Bytes) -> Result<Response, Problem> {
    let request: NewList = match problem::json_body(&body)? {
        Value::Null => return Err(Problem::invalid_field("name", "required (the body is empty)")),
        value => problem::from_value(value)?,
    };
    let name = request.name.trim().to_string();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(Problem::invalid_field("name", "must be 1 to 100 characters"));
    }
    let kind = match (request.kind.as_deref(), &request.filter) {
        (Some("static"), None) | (None, None) => "static",
        (Some("segment"), Some(_)) | (None, Some(_)) => "segment",
        (Some("static"), Some(_)) => {
            return Err(Problem::invalid_field(
                "filter",
                "a static list has no filter; use kind segment for a saved filter",
            ))
        }
        (Some("segment"), None) => return Err(Problem::invalid_field("filter", "a segment needs a filter")),
        (Some(_), _) => return Err(Problem::invalid_field("kind", "must be static or segment")),
    };
    let client = problem::client(&state).await?;
    let filter = match &request.filter {
        None => None,
        Some(value) => {
            let mut filter = LeadFilter::from_json(value).map_err(|e| {
                let field = if e.field == "filter" {
                    e.field
                } else {
                    format!("filter.{}", e.field)
                };
                Problem::invalid_field(field, e.detail)
            })?;
            if filter.is_empty() {
                return Err(Problem::invalid_field(
                    "filter",
                    "a segment needs at least one condition",
                ));
            }
            if filter.list_names().contains(&name.as_str()) {
                return Err(Problem::invalid_field("filter.list", "a segment cannot contain itself"));
            }
            filter.resolve_lists(&client).await.map_err(|e| {
                let mut p = search::unresolved(e);
                if let Some(field) = &mut p.field {
                    *field = format!("filter.{field}");
                }
                p
            })?;
            Some(filter.to_json())
        }
    };
    let inserted = client
        .query_one(
            "INSERT INTO lead_lists (name, kind, filter, description) VALUES ($1, $2, $3, $4) RETURNING id",
            &[&name, &kind, &filter, &request.description.trim()],
        )
        .await;
    if let Err(e) = &inserted {
        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
            return Err(problem::conflict("name", format!("a list named {name:?} exists")));
        }
    }
    inserted.map_err(|e| problem::internal("failed to create the list", e.into()))?;
    tracing::info!(list = %name, kind, "list created over the API");
    let list = load(&client, &name).await?;
    let location = format!(
        "/v1/lists/{}",
        url::form_urlencoded::byte_serialize(name.as_bytes()).collect::<String>()
    );
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(list.json())).into_response())
}

/// `DELETE /v1/lists/{name}`: 204; 409 naming the campaign (or segment) that uses it.
async fn remove(
    _: Writer,
    State(state): State<ApiState>,
    PathParams(name): PathParams<String>,
) -> Result<Response, Problem> {
    let failed = |e: tokio_postgres::Error| problem::internal("failed to delete the list", e.into());
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(failed)?;
    let list = load(&tx, &name).await?;
    let campaigns: Vec<String> = tx
        .query(
            "SELECT name FROM campaigns WHERE audience_list = $1 ORDER BY name",
            &[&list.id],
        )
        .await
        .map_err(failed)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !campaigns.is_empty() {
        return Err(problem::conflict(
            "name",
            format!(
                "list {name:?} is the audience of campaign {}; change the campaign's audience first",
                campaigns.join(", ")
            ),
        ));
    }
    let segments: Vec<String> = tx
        .query(
            "SELECT name FROM lead_lists WHERE kind = 'segment' AND filter ->> 'list' = $1 ORDER BY name",
            &[&name],
        )
        .await
        .map_err(failed)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !segments.is_empty() {
        return Err(problem::conflict(
            "name",
            format!("list {name:?} is used by segment {}", segments.join(", ")),
        ));
    }
    let deleted = tx.execute("DELETE FROM lead_lists WHERE id = $1", &[&list.id]).await;
    if let Err(e) = &deleted {
        // A campaign took it as its audience meanwhile (campaigns.audience_list is ON DELETE RESTRICT).
        if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) {
            return Err(problem::conflict(
                "name",
                format!("list {name:?} is a campaign's audience"),
            ));
        }
    }
    deleted.map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    tracing::info!(list = %name, "list deleted over the API");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/lists/{name}/members` with `{lead_ids: [...]}`: `{added}` (leads already members are not counted).
/// Static lists only; an unknown lead id refuses the whole request, naming `lead_ids`.
async fn add_members(
    _: Writer,
    State(state): State<ApiState>,
    PathParams(name): PathParams<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    let request: NewMembers = match problem::json_body(&body)? {
        Value::Null => return Err(Problem::invalid_field("lead_ids", "required (the body is empty)")),
        value => problem::from_value(value)?,
    };
    if request.lead_ids.is_empty() || request.lead_ids.len() > MAX_MEMBERS_PER_REQUEST {
        return Err(Problem::invalid_field(
            "lead_ids",
            format!("must list 1 to {MAX_MEMBERS_PER_REQUEST} lead ids"),
        ));
    }
    let failed = |e: tokio_postgres::Error| problem::internal("failed to add list members", e.into());
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(failed)?;
    let list = load(&tx, &name).await?;
    if list.kind != "static" {
        return Err(problem::conflict(
            "kind",
            format!("{name:?} is a segment: its members are the leads matching its filter"),
        ));
    }
    let missing: Vec<i64> = tx
        .query(
            "SELECT DISTINCT wanted.id FROM unnest($1::bigint[]) AS wanted (id)
             WHERE NOT EXISTS (SELECT 1 FROM leads l WHERE l.id = wanted.id)
             ORDER BY wanted.id",
            &[&request.lead_ids],
        )
        .await
        .map_err(failed)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !missing.is_empty() {
        let shown: Vec<String> = missing.iter().take(20).map(i64::to_string).collect();
        return Err(Problem::invalid_field(
            "lead_ids",
            format!("no lead with id {}", shown.join(", ")),
        ));
    }
    let added = tx
        .execute(
            "INSERT INTO lead_list_members (list_id, lead_id)
             SELECT DISTINCT $1::bigint, wanted.id FROM unnest($2::bigint[]) AS wanted (id)
             ON CONFLICT DO NOTHING",
            &[&list.id, &request.lead_ids],
        )
        .await
        .map_err(failed)?;
    if added > 0 {
        tx.execute("UPDATE lead_lists SET updated_at = now() WHERE id = $1", &[&list.id])
            .await
            .map_err(failed)?;
    }
    tx.commit().await.map_err(failed)?;
    Ok(Json(json!({ "added": added })).into_response())
}

/// `DELETE /v1/lists/{name}/members/{lead_id}`: 204; 404 when the lead is not a member.
async fn remove_member(
    _: Writer,
    State(state): State<ApiState>,
    PathParams((name, lead_id)): PathParams<(String, i64)>,
) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    let list = load(&client, &name).await?;
    if list.kind != "static" {
        return Err(problem::conflict(
            "kind",
            format!("{name:?} is a segment: change its filter instead"),
        ));
    }
    let removed = client
        .execute(
            "DELETE FROM lead_list_members WHERE list_id = $1 AND lead_id = $2",
            &[&list.id, &lead_id],
        )
        .await
        .map_err(|e| problem::internal("failed to remove the list member", e.into()))?;
    if removed == 0 {
        return Err(problem::not_found(format!("lead {lead_id} is not in list {name:?}")));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /v1/lists/{name}/members?sort=&limit=&cursor=`: `{items, next_cursor}`, a segment evaluated now.
async fn members(
    _: Reader,
    State(state): State<ApiState>,
    PathParams(name): PathParams<String>,
    query: Pairs,
) -> Result<Response, Problem> {
    let mut pairs = search::pairs(query)?;
    let request = PageRequest::take(&mut pairs)?;
    if let Some((unknown, _)) = pairs.first() {
        return Err(Problem::invalid_field(
            unknown.clone(),
            "unknown parameter; expected sort, limit, cursor",
        ));
    }
    let client = problem::client(&state).await?;
    load(&client, &name).await?;
    let mut filter = LeadFilter::from_pairs(&[("list".to_string(), name.clone())]).map_err(search::invalid)?;
    filter.resolve_lists(&client).await.map_err(search::unresolved)?;
    let page = search::page(&client, &filter, &request)
        .await
        .map_err(|e| problem::internal("failed to read the list's members", e))?;
    Ok(Json(page).into_response())
}
