//! `/v1/admin/campaigns`: list, read, create, create-or-replace, activate, deactivate. A campaign's JSON has the
//! shape of its YAML file (`CampaignSpec`) plus what the database adds (id, A/B outcome, timestamps).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::{json, Value};

use leadflow_scheduler::campaigns::{
    self as scheduler, AbEnd, AbTestSpec, Applied, Campaign, CampaignSpec, SendWindow, StepSpec, VariantSpec,
};
use leadflow_shared::domain::format_delay;
use leadflow_shared::http::Problem;

use crate::auth::{Reader, Writer};
use crate::problem::{self, PathParams};
use crate::ApiState;

/// Fields a response carries that a request may send back unchanged; they are ignored on input.
const READ_ONLY: [&str; 5] = ["id", "ab_winner", "ab_ended_at", "created_at", "updated_at"];

/// A campaign as the API shows it: the spec, plus what the database keeps about it.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignView {
    pub id: i64,
    #[serde(flatten)]
    pub spec: CampaignSpec,
    /// The winning variant once an A/B test has ended.
    pub ab_winner: Option<String>,
    pub ab_ended_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Loads campaigns with their steps and variants: all of them (by name), or the one named.
pub async fn load(client: &impl GenericClient, name: Option<&str>) -> anyhow::Result<Vec<CampaignView>> {
    let rows = client
        .query(
            "SELECT id, name, description, status, coalesce(lead_source, 'all'), language, products, languages,
                    countries, notify_url, bcc, override_coupons, use_default_template, holdout_percent, ab_end,
                    ab_keep_best, send_window, ab_winner, ab_ended_at, created_at, updated_at,
                    (SELECT ll.name FROM lead_lists ll WHERE ll.id = campaigns.audience_list) AS audience
             FROM campaigns WHERE $1::text IS NULL OR name = $1 ORDER BY name",
            &[&name],
        )
        .await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let mut steps: BTreeMap<(i64, String), Vec<StepSpec>> = BTreeMap::new();
    for r in client
        .query(
            "SELECT campaign_id, variant, delay_seconds, discount_percent, template, code_source
             FROM campaign_steps WHERE campaign_id = ANY($1) ORDER BY campaign_id, variant, step",
            &[&ids],
        )
        .await?
    {
        let delay: i64 = r.get(2);
        let discount: i16 = r.get(3);
        steps.entry((r.get(0), r.get(1))).or_default().push(StepSpec {
            delay: format_delay(Duration::from_secs(delay.max(0) as u64)),
            discount: u8::try_from(discount).unwrap_or(0),
            template: Some(r.get(4)),
            code: r.get(5),
        });
    }
    let mut weights: BTreeMap<(i64, String), u32> = BTreeMap::new();
    for r in client
        .query(
            "SELECT campaign_id, name, weight FROM campaign_variants WHERE campaign_id = ANY($1)",
            &[&ids],
        )
        .await?
    {
        let weight: i32 = r.get(2);
        weights.insert((r.get(0), r.get(1)), u32::try_from(weight).unwrap_or(1));
    }

    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let id: i64 = r.get(0);
        let mut variants: Vec<VariantSpec> = steps
            .range((id, String::new())..)
            .take_while(|((cid, _), _)| *cid == id)
            .map(|((_, variant), specs)| VariantSpec {
                name: variant.clone(),
                weight: weights.get(&(id, variant.clone())).copied().unwrap_or(1),
                steps: specs.clone(),
            })
            .collect();
        let ab_end: Option<Value> = r.get(14);
        let ab_test = ab_end
            .map(serde_json::from_value::<AbEnd>)
            .transpose()?
            .map(|end| AbTestSpec {
                end,
                keep_best: r.get(15),
            });
        let send_window: Option<Value> = r.get(16);
        let send_window = send_window.map(serde_json::from_value::<SendWindow>).transpose()?;
        // A campaign without a test has one variant, "A": shown as plain `steps`, as it is written in a file.
        let plain = ab_test.is_none() && variants.len() == 1 && variants[0].name == "A";
        let steps = if plain {
            variants.pop().map(|v| v.steps).unwrap_or_default()
        } else {
            Vec::new()
        };
        let holdout: i16 = r.get(13);
        out.push(CampaignView {
            id,
            spec: CampaignSpec {
                name: r.get(1),
                description: r.get(2),
                status: r.get(3),
                lead_source: r.get(4),
                language: r.get(5),
                products: r.get(6),
                languages: r.get(7),
                countries: r.get(8),
                notify_url: r.get(9),
                bcc: r.get(10),
                override_coupons: r.get(11),
                use_default_template: r.get(12),
                steps,
                variants,
                holdout_percent: u8::try_from(holdout).unwrap_or(0),
                ab_test,
                send_window,
                audience: r.get(21),
            },
            ab_winner: r.get(17),
            ab_ended_at: r.get(18),
            created_at: r.get(19),
            updated_at: r.get(20),
        });
    }
    Ok(out)
}

async fn load_one(client: &impl GenericClient, name: &str) -> Result<CampaignView, Problem> {
    load(client, Some(name))
        .await
        .map_err(|e| problem::internal("failed to load the campaign", e))?
        .pop()
        .ok_or_else(|| problem::not_found(format!("no campaign named {name:?}")))
}

/// `GET /v1/admin/campaigns`
pub async fn list(_: Reader, State(state): State<ApiState>) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    let all = load(&client, None)
        .await
        .map_err(|e| problem::internal("failed to load campaigns", e))?;
    Ok(Json(all).into_response())
}

/// `GET /v1/admin/campaigns/{name}`
pub async fn get(
    _: Reader,
    State(state): State<ApiState>,
    PathParams(name): PathParams<String>,
) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    Ok(Json(load_one(&client, &name).await?).into_response())
}

/// `POST /v1/admin/campaigns`: creates a campaign; 409 when the name is taken.
pub async fn create(_: Writer, State(state): State<ApiState>, body: Bytes) -> Result<Response, Problem> {
    let spec = spec_from(&body, None)?;
    let (view, _) = store(&state, &spec, false).await?;
    let location = format!("/v1/admin/campaigns/{}", view.spec.name);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(view)).into_response())
}

/// `PUT /v1/admin/campaigns/{name}`: creates the campaign or replaces it; steps already scheduled keep their times.
pub async fn put(
    _: Writer,
    State(state): State<ApiState>,
    PathParams(name): PathParams<String>,
    body: Bytes,
) -> Result<Response, Problem> {
    let spec = spec_from(&body, Some(&name))?;
    let (view, applied) = store(&state, &spec, true).await?;
    let status = if applied == Applied::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)).into_response())
}

/// `POST /v1/admin/campaigns/{name}/activate`
pub async fn activate(
    _: Writer,
    State(state): State<ApiState>,
    PathParams(name): PathParams<String>,
) -> Result<Response, Problem> {
    set_status(&state, &name, true).await
}

/// `POST /v1/admin/campaigns/{name}/deactivate`: open follow-ups are cancelled with reason `campaign stopped`.
pub async fn deactivate(
    _: Writer,
    State(state): State<ApiState>,
    PathParams(name): PathParams<String>,
) -> Result<Response, Problem> {
    set_status(&state, &name, false).await
}

async fn set_status(state: &ApiState, name: &str, active: bool) -> Result<Response, Problem> {
    let failed = |e| problem::internal("failed to change the campaign's status", e);
    let mut client = problem::client(state).await?;
    let tx = client.transaction().await.map_err(|e| failed(e.into()))?;
    let exists = tx
        .query_opt("SELECT 1 FROM campaigns WHERE name = $1 FOR UPDATE", &[&name])
        .await
        .map_err(|e| failed(e.into()))?
        .is_some();
    if !exists {
        return Err(problem::not_found(format!("no campaign named {name:?}")));
    }
    let cancelled = scheduler::set_status(&tx, name, active).await.map_err(failed)?;
    tx.commit().await.map_err(|e| failed(e.into()))?;
    tracing::info!(
        campaign = name,
        active,
        cancelled,
        "campaign status changed over the admin API"
    );
    Ok(Json(json!({
        "name": name,
        "status": if active { "active" } else { "inactive" },
        "cancelled": cancelled,
    }))
    .into_response())
}

/// Reads a campaign from a request body. With `path_name` (PUT) the body's `name` may be left out, and must match
/// when given. Fields only responses carry (`id`, timestamps) are ignored, so a GET's answer can be sent back.
fn spec_from(body: &[u8], path_name: Option<&str>) -> Result<CampaignSpec, Problem> {
    let mut value = problem::json_body(body)?;
    let Value::Object(map) = &mut value else {
        return Err(Problem::bad_request("the body must be a JSON object: a campaign"));
    };
    for field in READ_ONLY {
        map.remove(field);
    }
    if let Some(name) = path_name {
        match map.get("name") {
            None => {
                map.insert("name".into(), Value::String(name.to_string()));
            }
            Some(Value::String(given)) if given.trim() == name => {}
            Some(_) => {
                return Err(Problem::invalid_field(
                    "name",
                    format!("must be {name:?}, the name in the URL"),
                ))
            }
        }
    }
    problem::from_value(value)
}

/// Validates and applies a campaign in one transaction; `replace: false` refuses an existing name.
async fn store(state: &ApiState, spec: &CampaignSpec, replace: bool) -> Result<(CampaignView, Applied), Problem> {
    let campaign = spec.check().map_err(|e| Problem::invalid_field(e.field, e.reason))?;
    let failed = |e| problem::internal("failed to store the campaign", e);
    let mut client = problem::client(state).await?;
    let tx = client.transaction().await.map_err(|e| failed(e.into()))?;
    // Two creates of one name at once: the second waits here, then sees the first.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('leadflow.campaign:' || $1)::bigint)",
        &[&campaign.name],
    )
    .await
    .map_err(|e| failed(e.into()))?;
    if !replace {
        let exists = tx
            .query_opt("SELECT 1 FROM campaigns WHERE name = $1", &[&campaign.name])
            .await
            .map_err(|e| failed(e.into()))?
            .is_some();
        if exists {
            return Err(problem::conflict(
                "name",
                format!(
                    "a campaign named {:?} exists; change it with PUT /v1/admin/campaigns/{}",
                    campaign.name, campaign.name
                ),
            ));
        }
    }
    check_templates_exist(&tx, spec, &campaign).await?;
    scheduler::audience_list(&tx, &campaign)
        .await
        .map_err(failed)?
        .map_err(|e| Problem::invalid_field(e.field, e.reason))?;
    let applied = scheduler::apply(&tx, &campaign).await.map_err(failed)?;
    let view = load_one(&tx, &campaign.name).await?;
    tx.commit().await.map_err(|e| failed(e.into()))?;
    tracing::info!(campaign = %campaign.name, ?applied, "campaign stored over the admin API");
    Ok((view, applied))
}

/// Every step's template must exist (in some language); the error names `steps[i].template`.
async fn check_templates_exist(
    client: &impl GenericClient,
    spec: &CampaignSpec,
    campaign: &Campaign,
) -> Result<(), Problem> {
    for (vi, variant) in campaign.variants.iter().enumerate() {
        for (i, step) in variant.steps.iter().enumerate() {
            let exists = client
                .query_opt("SELECT 1 FROM templates WHERE name = $1 LIMIT 1", &[&step.template])
                .await
                .map_err(|e| problem::internal("failed to look up templates", e.into()))?
                .is_some();
            if !exists {
                let block = if spec.steps.is_empty() {
                    format!("variants[{vi}].steps")
                } else {
                    "steps".to_string()
                };
                return Err(Problem::invalid_field(
                    format!("{block}[{i}].template"),
                    format!(
                        "template {:?} does not exist: store it first (PUT /v1/admin/templates/{}/<language>)",
                        step.template, step.template
                    ),
                ));
            }
        }
    }
    Ok(())
}
