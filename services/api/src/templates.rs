//! `/v1/admin/templates`: list, read, store (compiled first; an error names the part and line) and preview, which
//! renders a stored template for a sample lead exactly as the renderer would, strict about missing variables.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use leadflow_renderer::render::{
    template_context, CompiledTemplate, DeliveryFacts, LeadFields, RenderError, StoredTemplate,
};
use leadflow_renderer::templates::{
    self, check_compiles, validate_language, validate_name, Change, TemplateSpec, BODY_HTML_FILE, BODY_TEXT_FILE,
    SUBJECT_FILE,
};
use leadflow_shared::http::Problem;

use crate::auth::{Reader, Writer};
use crate::problem::{self, PathParams};
use crate::ApiState;

/// A template in one language, without its content: what the listing shows.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateSummary {
    pub name: String,
    pub language: String,
    pub version: i32,
    pub updated_at: DateTime<Utc>,
}

/// The three parts of a template: the body of `PUT /v1/admin/templates/{name}/{language}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateBody {
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
}

/// `GET /v1/admin/templates`
pub async fn list(_: Reader, State(state): State<ApiState>) -> Result<Response, Problem> {
    let client = problem::client(&state).await?;
    let rows = client
        .query(
            "SELECT name, language, version, updated_at FROM templates ORDER BY name, language",
            &[],
        )
        .await
        .map_err(|e| problem::internal("failed to list templates", e.into()))?;
    let all: Vec<TemplateSummary> = rows
        .iter()
        .map(|r| TemplateSummary {
            name: r.get(0),
            language: r.get(1),
            version: r.get(2),
            updated_at: r.get(3),
        })
        .collect();
    Ok(Json(all).into_response())
}

async fn load(state: &ApiState, name: &str, language: &str) -> Result<(StoredTemplate, DateTime<Utc>), Problem> {
    let client = problem::client(state).await?;
    let row = client
        .query_opt(
            "SELECT version, subject, body_text, body_html, updated_at FROM templates
             WHERE name = $1 AND language = $2",
            &[&name, &language],
        )
        .await
        .map_err(|e| problem::internal("failed to load the template", e.into()))?
        .ok_or_else(|| problem::not_found(format!("no template {name:?} in language {language:?}")))?;
    Ok((
        StoredTemplate {
            name: name.to_string(),
            language: language.to_string(),
            version: row.get(0),
            subject: row.get(1),
            body_text: row.get(2),
            body_html: row.get(3),
        },
        row.get(4),
    ))
}

/// `GET /v1/admin/templates/{name}/{language}`
pub async fn get(
    _: Reader,
    State(state): State<ApiState>,
    PathParams((name, language)): PathParams<(String, String)>,
) -> Result<Response, Problem> {
    let (t, updated_at) = load(&state, &name, &language).await?;
    Ok(Json(json!({
        "name": t.name,
        "language": t.language,
        "version": t.version,
        "subject": t.subject,
        "body_text": t.body_text,
        "body_html": t.body_html,
        "updated_at": updated_at,
    }))
    .into_response())
}

/// `PUT /v1/admin/templates/{name}/{language}`: stores a new version when the content changed.
pub async fn put(
    _: Writer,
    State(state): State<ApiState>,
    PathParams((name, language)): PathParams<(String, String)>,
    body: Bytes,
) -> Result<Response, Problem> {
    validate_name(&name).map_err(|e| Problem::invalid_field("name", e))?;
    validate_language(&language).map_err(|e| Problem::invalid_field("language", e))?;
    let body: TemplateBody = problem::from_value(problem::json_body(&body)?)?;
    if body.subject.trim().is_empty() {
        return Err(Problem::invalid_field("subject", "is empty"));
    }
    for (field, file, source) in [
        ("subject", SUBJECT_FILE, &body.subject),
        ("body_text", BODY_TEXT_FILE, &body.body_text),
        ("body_html", BODY_HTML_FILE, &body.body_html),
    ] {
        // The message names the part and the line: `welcome/en/body.txt.hbs: line 3, column 7: ...`.
        check_compiles(source, &format!("{name}/{language}/{file}"))
            .map_err(|e| Problem::invalid_field(field, e.to_string()))?;
    }
    let spec = TemplateSpec {
        name,
        language,
        subject: body.subject,
        body_text: body.body_text,
        body_html: body.body_html,
    };
    let failed = |e| problem::internal("failed to store the template", e);
    let mut client = problem::client(&state).await?;
    let tx = client.transaction().await.map_err(|e| failed(e.into()))?;
    let applied = templates::apply(&tx, std::slice::from_ref(&spec))
        .await
        .map_err(failed)?;
    tx.commit().await.map_err(|e| failed(e.into()))?;
    let Some(applied) = applied.into_iter().next() else {
        return Err(failed(anyhow::anyhow!("applying one template reported nothing")));
    };
    tracing::info!(
        template = %applied.name,
        language = %applied.language,
        version = applied.version,
        change = applied.change.as_str(),
        "template stored over the admin API"
    );
    let status = if applied.change == Change::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({
            "name": applied.name,
            "language": applied.language,
            "version": applied.version,
            "change": applied.change.as_str(),
        })),
    )
        .into_response())
}

/// What a preview may change about the sample: every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    #[serde(default)]
    pub lead: SampleLead,
    /// Replaces the sample product as a whole (`sku`, `name`, `price`, `currency`, `url`): leave a key out to see
    /// what a lead whose event lacked it would get.
    #[serde(default)]
    pub product: Option<Value>,
    /// Percent off.
    #[serde(default)]
    pub discount: Option<i16>,
    /// The discount code templates see as `discount.code` (default a sample code).
    #[serde(default)]
    pub code: Option<String>,
    /// The step number, and how many steps the campaign has.
    #[serde(default)]
    pub step: Option<i16>,
    #[serde(default)]
    pub steps: Option<i64>,
    /// The campaign name templates see as `campaign.name`.
    #[serde(default)]
    pub campaign: Option<String>,
}

/// Lead fields of the sample; each left out keeps the sample's value ("Alex Sample").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleLead {
    pub email: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub country: Option<String>,
    pub language: Option<String>,
    pub attributes: Option<Value>,
}

/// The facts a preview renders with: the sample lead, product and step, with the request's overrides.
// `..Default::default()` on purpose: facts the renderer learns to use later start from their defaults here.
#[allow(clippy::needless_update)]
pub fn sample_facts(request: PreviewRequest, language: &str) -> DeliveryFacts {
    let lead = request.lead;
    DeliveryFacts {
        lead: LeadFields {
            email: lead.email.unwrap_or_else(|| "alex.sample@example.com".into()),
            first_name: Some(lead.first_name.unwrap_or_else(|| "Alex".into())),
            last_name: Some(lead.last_name.unwrap_or_else(|| "Sample".into())),
            country: Some(lead.country.unwrap_or_else(|| "US".into())),
            language: Some(lead.language.unwrap_or_else(|| language.to_string())),
            attributes: lead.attributes.unwrap_or_else(|| json!({})),
        },
        product: Some(request.product.unwrap_or_else(|| {
            json!({
                "sku": "SAMPLE-1",
                "name": "Sample Product",
                "price": 49.9,
                "currency": "EUR",
                "url": "https://shop.example/p/sample-product",
            })
        })),
        discount_percent: request.discount.unwrap_or(10),
        step: request.step.unwrap_or(1),
        steps: request.steps.unwrap_or(3),
        campaign_name: request.campaign.unwrap_or_else(|| "Sample campaign".into()),
        discount_code: Some(request.code.unwrap_or_else(|| "LF-SAMPLE2345".into())),
        ..DeliveryFacts::default()
    }
}

/// `POST /v1/admin/templates/{name}/{language}/preview`: the stored template rendered for a sample lead.
pub async fn preview(
    _: Reader,
    State(state): State<ApiState>,
    PathParams((name, language)): PathParams<(String, String)>,
    body: Bytes,
) -> Result<Response, Problem> {
    let request = match problem::json_body(&body)? {
        Value::Null => PreviewRequest::default(),
        value => problem::from_value::<PreviewRequest>(value)?,
    };
    if let Some(discount) = request.discount {
        if !(0..=100).contains(&discount) {
            return Err(Problem::invalid_field("discount", "must be 0 to 100"));
        }
    }
    let (stored, _) = load(&state, &name, &language).await?;
    let facts = sample_facts(request, &language);
    let rendered = CompiledTemplate::compile(stored)
        .and_then(|compiled| compiled.render(&template_context(&facts)))
        .map_err(unrenderable)?;
    Ok(Json(json!({
        "subject": rendered.subject,
        "body_text": rendered.body_text,
        "body_html": rendered.body_html,
    }))
    .into_response())
}

/// A template that cannot be rendered for the sample: 422, naming the missing variable when that is why.
fn unrenderable(e: RenderError) -> Problem {
    let status = StatusCode::UNPROCESSABLE_ENTITY;
    match &e {
        RenderError::MissingVariable { variable, .. } => Problem {
            field: Some(variable.clone()),
            ..Problem::new(status, "missing-variable", e.to_string())
        },
        _ => Problem::new(status, "render-failed", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(text: &str) -> StoredTemplate {
        StoredTemplate {
            name: "t".into(),
            language: "en".into(),
            version: 1,
            subject: "Hi {{lead.first_name}}".into(),
            body_text: text.into(),
            body_html: "<p>{{product.name}}</p>".into(),
        }
    }

    fn render(text: &str, request: PreviewRequest) -> Result<leadflow_renderer::render::RenderedParts, RenderError> {
        let facts = sample_facts(request, "en");
        CompiledTemplate::compile(stored(text))?.render(&template_context(&facts))
    }

    #[test]
    fn the_sample_lead_is_alex_sample() {
        let out = render(
            "{{lead.first_name}} {{lead.last_name}} {{discount.percent}}% {{product.url}}",
            PreviewRequest::default(),
        )
        .unwrap();
        assert_eq!(out.subject, "Hi Alex");
        assert_eq!(out.body_text, "Alex Sample 10% https://shop.example/p/sample-product");
    }

    #[test]
    fn overrides_replace_the_sample() {
        let request: PreviewRequest = serde_json::from_value(json!({
            "lead": {"first_name": "Bo"},
            "product": {"name": "Boots"},
            "discount": 25,
        }))
        .unwrap();
        let out = render(
            "{{lead.first_name}} {{product.name}} {{discount.percent}}",
            request.clone(),
        )
        .unwrap();
        assert_eq!(out.body_text, "Bo Boots 25");
        let err = render("{{product.url}}", request).unwrap_err();
        let problem = unrenderable(err);
        assert_eq!(problem.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(problem.field.as_deref(), Some("product.url"));
    }
}
