//! `GET /v1/leads`: lead search with the filters of [`leadflow_shared::lead_filter`], a sort order and keyset
//! cursor pages. The page reading here also serves list members ([`super::lists`]).

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;

use leadflow_shared::http::Problem;
use leadflow_shared::lead_filter::{self, Cursor, FilterError, LeadFilter, ResolveError, Sort};

use super::profile;
use crate::auth::Reader;
use crate::problem;
use crate::ApiState;

/// Leads per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: i64 = 50;
/// The largest page a request may ask for.
pub const MAX_LIMIT: i64 = 500;

pub fn routes() -> Router<ApiState> {
    Router::new().route("/v1/leads", get(search))
}

/// Query pairs in their order, repeated keys kept (`tag=a&tag=b`).
pub type Pairs = Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>;

/// The query pairs, or a 400 when the query string cannot be read.
pub fn pairs(raw: Pairs) -> Result<Vec<(String, String)>, Problem> {
    let Query(pairs) = raw.map_err(|e| Problem::bad_request(format!("the query string is not valid: {e}")))?;
    Ok(pairs)
}

/// A filter or sort error as a 400 naming the parameter.
pub fn invalid(e: FilterError) -> Problem {
    Problem::invalid_field(e.field, e.detail)
}

/// A failed segment lookup: 400 naming `list`, or 500.
pub fn unresolved(e: ResolveError) -> Problem {
    match e {
        ResolveError::Invalid(e) => invalid(e),
        ResolveError::Database(e) => problem::internal("failed to load a list", e.into()),
    }
}

/// Which page of a sorted search: `sort`, `limit` and `cursor` taken out of the query pairs.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub sort: Sort,
    pub limit: i64,
    pub cursor: Option<Cursor>,
}

impl PageRequest {
    /// Takes `sort`, `limit` and `cursor` out of `pairs` (each at most once), leaving the filters.
    pub fn take(pairs: &mut Vec<(String, String)>) -> Result<Self, Problem> {
        let mut take = |name: &str| -> Result<Option<String>, Problem> {
            let found: Vec<String> = pairs
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
                .collect();
            pairs.retain(|(k, _)| k != name);
            match found.len() {
                0 => Ok(None),
                1 => Ok(found.into_iter().next()),
                _ => Err(Problem::invalid_field(name, "is given more than once")),
            }
        };
        let sort = take("sort")?;
        let limit = take("limit")?;
        let cursor = take("cursor")?;
        let sort = match sort {
            Some(raw) => Sort::parse(&raw).map_err(invalid)?,
            None => Sort::default(),
        };
        let limit = match limit {
            None => DEFAULT_LIMIT,
            Some(raw) => raw
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    Problem::invalid_field("limit", format!("must be a whole number from 1 to {MAX_LIMIT}"))
                })?,
        };
        let cursor = cursor
            .map(|raw| sort.decode_cursor(&raw))
            .transpose()
            .map_err(invalid)?;
        Ok(Self { sort, limit, cursor })
    }
}

/// A page of leads as the API shows them; `next_cursor` is null on the last page.
#[derive(Debug, Serialize)]
pub struct Page {
    pub items: Vec<Value>,
    pub next_cursor: Option<String>,
}

/// The query of a page of leads matching `filter` (already resolved, see [`LeadFilter::resolve_lists`]): one row
/// more than the limit, so the caller knows whether another page follows. The benchmark explains this same text.
pub fn page_sql(filter: &LeadFilter, request: &PageRequest) -> (String, Vec<lead_filter::Param>) {
    let (mut condition, mut params) = filter.to_sql(1);
    if let Some(cursor) = &request.cursor {
        let (after, more) = request.sort.after_sql(cursor, params.len() + 1);
        condition = format!("{condition} AND {after}");
        params.extend(more);
    }
    params.push(Box::new(request.limit + 1));
    // The page's ids first, narrow rows sorted; the profile and its consent look-up only for those rows.
    let order_by = request.sort.order_by();
    let sql = format!(
        "SELECT {}, l.id AS id, {}
           FROM (SELECT l.id AS page_id FROM leads l WHERE {condition} ORDER BY {order_by} LIMIT ${}) page
           JOIN leads l ON l.id = page.page_id
          ORDER BY {order_by}",
        profile::SELECT,
        request.sort.select_key(),
        params.len(),
    );
    (sql, params)
}

/// The page of leads matching `filter` (already resolved, see [`LeadFilter::resolve_lists`]).
pub async fn page(client: &impl GenericClient, filter: &LeadFilter, request: &PageRequest) -> anyhow::Result<Page> {
    let (sql, params) = page_sql(filter, request);
    let rows = client.query(&sql, &lead_filter::param_refs(&params)).await?;
    let more = rows.len() as i64 > request.limit;
    let shown = &rows[..rows.len().min(request.limit as usize)];
    let next_cursor = match (more, shown.last()) {
        (true, Some(last)) => Some(request.sort.cursor_after(last)?),
        _ => None,
    };
    Ok(Page {
        items: shown.iter().map(profile::lead_json).collect(),
        next_cursor,
    })
}

/// `GET /v1/leads?<filters>&sort=&limit=&cursor=`: `{items, next_cursor}`.
pub async fn search(_: Reader, State(state): State<ApiState>, query: Pairs) -> Result<Response, Problem> {
    let mut pairs = pairs(query)?;
    let request = PageRequest::take(&mut pairs)?;
    let mut filter = LeadFilter::from_pairs(&pairs).map_err(invalid)?;
    let client = problem::client(&state).await?;
    filter.resolve_lists(&client).await.map_err(unresolved)?;
    let page = page(&client, &filter, &request)
        .await
        .map_err(|e| problem::internal("failed to search leads", e))?;
    Ok(Json(page).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn paging_parameters_are_taken_out_and_the_filters_stay() {
        let mut given = pairs(&[
            ("city", "Berlin"),
            ("sort", "score:desc"),
            ("limit", "20"),
            ("tag", "vip"),
        ]);
        let request = PageRequest::take(&mut given).unwrap();
        assert_eq!(request.sort.to_string(), "score:desc");
        assert_eq!(request.limit, 20);
        assert!(request.cursor.is_none());
        assert_eq!(given, pairs(&[("city", "Berlin"), ("tag", "vip")]));
    }

    #[test]
    fn the_limit_defaults_to_50_and_is_at_most_500() {
        assert_eq!(PageRequest::take(&mut Vec::new()).unwrap().limit, DEFAULT_LIMIT);
        for bad in ["0", "501", "-1", "ten", ""] {
            let e = PageRequest::take(&mut pairs(&[("limit", bad)])).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("limit"), "limit={bad}");
        }
        let e = PageRequest::take(&mut pairs(&[("sort", "email"), ("sort", "score")])).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sort"));
    }
}
