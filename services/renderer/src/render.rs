//! Rendering one delivery: the template context, the language choice, and strict Handlebars with HTML escaping
//! for the HTML body only. Compiled templates are cached by (name, language, version).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};

use handlebars::{Handlebars, RenderContext, RenderErrorReason, Renderable, StringOutput, Template};
use serde_json::{json, Map, Value};

use crate::templates::{compile, BODY_HTML_FILE, BODY_TEXT_FILE, SUBJECT_FILE};

/// The language tried last, when neither the lead's nor the campaign's has a template.
pub const FALLBACK_LANGUAGE: &str = "en";

/// Subjects and text bodies: strict, nothing escaped (a subject must never read `Tom &amp; Jerry`).
static PLAIN: LazyLock<Handlebars<'static>> = LazyLock::new(|| {
    let mut registry = Handlebars::new();
    registry.set_strict_mode(true);
    registry.register_escape_fn(handlebars::no_escape);
    registry
});

/// HTML bodies: strict, `{{ }}` HTML-escaped (the default escape function).
static HTML: LazyLock<Handlebars<'static>> = LazyLock::new(|| {
    let mut registry = Handlebars::new();
    registry.set_strict_mode(true);
    registry
});

/// Why a delivery could not be rendered; every variant is permanent for that delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// No template of that name exists in any of the languages tried.
    #[error("template {template} has no language {}", tried.join(", "))]
    NoLanguage { template: String, tried: Vec<String> },
    /// The campaign step the delivery belongs to was removed.
    #[error("step {step} of the campaign no longer exists")]
    NoStep { step: i16 },
    /// The stored template does not compile.
    #[error("{0}")]
    Compile(String),
    /// The template uses a variable the context does not have (strict mode).
    #[error("{origin}{}: missing variable {variable}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    MissingVariable {
        origin: String,
        variable: String,
        line: Option<usize>,
    },
    /// Any other rendering failure (a helper given the wrong argument, ...).
    #[error("{origin}: {message}")]
    Render { origin: String, message: String },
}

impl RenderError {
    /// The reason recorded on the failed delivery.
    pub fn reason(&self) -> String {
        match self {
            // Already says "template <name> ..." in full.
            Self::NoLanguage { .. } => self.to_string(),
            other => format!("template: {other}"),
        }
    }
}

/// A template row as stored in the `templates` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTemplate {
    pub name: String,
    pub language: String,
    pub version: i32,
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
}

/// The three compiled parts of one template version.
pub struct CompiledTemplate {
    pub source: StoredTemplate,
    subject: Template,
    body_text: Template,
    body_html: Template,
}

impl CompiledTemplate {
    pub fn compile(source: StoredTemplate) -> Result<Self, RenderError> {
        let origin = |part: &str| format!("{}/{}/{part}", source.name, source.language);
        let subject = compile(&source.subject, &origin(SUBJECT_FILE)).map_err(RenderError::Compile)?;
        let body_text = compile(&source.body_text, &origin(BODY_TEXT_FILE)).map_err(RenderError::Compile)?;
        let body_html = compile(&source.body_html, &origin(BODY_HTML_FILE)).map_err(RenderError::Compile)?;
        Ok(Self {
            source,
            subject,
            body_text,
            body_html,
        })
    }

    /// Renders subject, text and HTML with `context`; a missing variable in any part is an error.
    pub fn render(&self, context: &Value) -> Result<RenderedParts, RenderError> {
        let context = handlebars::Context::wraps(context).map_err(|e| RenderError::Render {
            origin: format!("{}/{}", self.source.name, self.source.language),
            message: e.to_string(),
        })?;
        let subject = render_part(&PLAIN, &self.subject, &context)?;
        Ok(RenderedParts {
            subject: one_line(&subject),
            body_text: render_part(&PLAIN, &self.body_text, &context)?,
            body_html: render_part(&HTML, &self.body_html, &context)?,
        })
    }
}

fn render_part(
    registry: &Handlebars<'static>,
    template: &Template,
    ctx: &handlebars::Context,
) -> Result<String, RenderError> {
    let origin = template.name.clone().unwrap_or_default();
    let mut out = StringOutput::new();
    let mut rc = RenderContext::new(template.name.as_ref());
    let rendered = template
        .render(registry, ctx, &mut rc, &mut out)
        .and_then(|()| out.into_string().map_err(handlebars::RenderError::from));
    rendered.map_err(|e| match e.reason() {
        RenderErrorReason::MissingVariable(variable) => RenderError::MissingVariable {
            origin,
            variable: variable.clone().unwrap_or_else(|| "(unnamed)".into()),
            line: e.line_no,
        },
        reason => RenderError::Render {
            message: match e.line_no {
                Some(line) => format!("line {line}: {reason}"),
                None => reason.to_string(),
            },
            origin,
        },
    })
}

/// A subject is one line: line breaks and runs of whitespace become single spaces, the ends are trimmed.
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What the renderer stores for the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedParts {
    pub subject: String,
    pub body_text: String,
    pub body_html: String,
}

/// Compiled templates by (name, language, version), shared by every render in the process.
///
/// An entry is used only while its stored source is identical to the row read from the database, so two
/// databases served by one process (or a template rewritten without a version bump) never mix.
#[derive(Default)]
pub struct TemplateCache {
    entries: RwLock<HashMap<(String, String, i32), Arc<CompiledTemplate>>>,
}

impl TemplateCache {
    /// Entries kept at most; past this the cache starts over (old versions are never used again).
    const MAX_ENTRIES: usize = 4096;

    /// The process-wide cache.
    pub fn global() -> &'static TemplateCache {
        static CACHE: LazyLock<TemplateCache> = LazyLock::new(TemplateCache::default);
        &CACHE
    }

    pub fn get_or_compile(&self, stored: &StoredTemplate) -> Result<Arc<CompiledTemplate>, RenderError> {
        let key = (stored.name.clone(), stored.language.clone(), stored.version);
        {
            let entries = self.entries.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(hit) = entries.get(&key).filter(|hit| hit.source == *stored) {
                return Ok(hit.clone());
            }
        }
        let compiled = Arc::new(CompiledTemplate::compile(stored.clone())?);
        let mut entries = self.entries.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= Self::MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key, compiled.clone());
        Ok(compiled)
    }

    pub fn len(&self) -> usize {
        self.entries.read().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The languages to try for a lead, best first: the lead's (`de-AT` -> `de-at`, `de`), the campaign's, then `en`.
pub fn language_candidates(lead_language: Option<&str>, campaign_language: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for tag in [lead_language.unwrap_or(""), campaign_language, FALLBACK_LANGUAGE] {
        let tag = tag.trim().to_ascii_lowercase().replace('_', "-");
        let parts: Vec<&str> = tag.split('-').filter(|p| !p.is_empty()).collect();
        for n in (1..=parts.len()).rev() {
            let candidate = parts[..n].join("-");
            if !out.contains(&candidate) {
                out.push(candidate);
            }
        }
    }
    out
}

/// Picks the best of `candidates` among `available` (the languages a template exists in); returns it as stored.
pub fn choose_language<'a>(
    template: &str,
    candidates: &[String],
    available: impl IntoIterator<Item = &'a str> + Clone,
) -> Result<String, RenderError> {
    candidates
        .iter()
        .find_map(|c| available.clone().into_iter().find(|a| a.eq_ignore_ascii_case(c)))
        .map(str::to_string)
        .ok_or_else(|| RenderError::NoLanguage {
            template: template.to_string(),
            tried: candidates.to_vec(),
        })
}

/// The lead as templates see it.
#[derive(Debug, Clone, Default)]
pub struct LeadFields {
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub country: Option<String>,
    pub language: Option<String>,
    pub attributes: Value,
}

impl LeadFields {
    /// "first last", trimmed; `None` when the lead has no name.
    pub fn display_name(&self) -> Option<String> {
        let name = format!(
            "{} {}",
            self.first_name.as_deref().unwrap_or("").trim(),
            self.last_name.as_deref().unwrap_or("").trim()
        );
        let name = name.trim();
        (!name.is_empty()).then(|| name.to_string())
    }
}

/// Everything a delivery's templates may refer to.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFacts {
    pub lead: LeadFields,
    /// `enrollments.product`: the product of the event that enrolled the lead.
    pub product: Option<Value>,
    pub discount_percent: i16,
    pub step: i16,
    pub steps: i64,
    pub campaign_name: String,
    /// The lead's code for this step, when the step gives codes (`discount.code`).
    pub discount_code: Option<String>,
    /// The campaign's "override previous coupon discounts with the lead discount" (`discount.override_coupons`).
    pub override_coupons: bool,
    /// The delivery's unsubscribe page (`unsubscribe_url`); `None` in previews, which show
    /// [`PREVIEW_UNSUBSCRIBE_URL`] instead.
    pub unsubscribe_url: Option<String>,
}

/// What `{{unsubscribe_url}}` shows where no delivery exists (template previews).
pub const PREVIEW_UNSUBSCRIBE_URL: &str = "https://unsubscribe.invalid/u/preview";

/// The unsubscribe page of a delivery: `{public_url}/u/{token}`, the token signing `d:<delivery id>`. The
/// `List-Unsubscribe` header of the same email names the same URL.
pub fn unsubscribe_url(mail: &leadflow_shared::config::MailConfig, delivery_id: i64) -> String {
    let token = mail.keyring.sign(
        leadflow_shared::tokens::Purpose::Unsubscribe,
        &format!("d:{delivery_id}"),
    );
    format!("{}/u/{token}", mail.public_url.trim_end_matches('/'))
}

/// Builds the template context: `lead`, `product`, `discount`, `step`, `campaign`, `unsubscribe_url`.
///
/// Lead fields the lead lacks are `null` (a template may test them with `{{#if}}`); product keys the event did not
/// carry are absent, so strict mode fails a template that needs them instead of sending a hole.
pub fn template_context(facts: &DeliveryFacts) -> Value {
    let lead = &facts.lead;
    let first_name = lead.first_name.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let mut product = Map::new();
    if let Some(Value::Object(given)) = &facts.product {
        for key in ["sku", "name", "price", "currency", "url"] {
            if let Some(value) = given.get(key).filter(|v| !v.is_null()) {
                product.insert(key.to_string(), value.clone());
            }
        }
    }
    let attributes = match &lead.attributes {
        Value::Object(_) => lead.attributes.clone(),
        _ => Value::Object(Map::new()),
    };
    let mut discount = json!({
        "percent": facts.discount_percent,
        "has": facts.discount_percent > 0,
        "override_coupons": facts.override_coupons,
    });
    // `discount.code` exists only for a step that gives codes: strict mode fails any other template using it.
    if let (Some(code), Some(d)) = (&facts.discount_code, discount.as_object_mut()) {
        d.insert("code".to_string(), Value::from(code.as_str()));
    }
    json!({
        "lead": {
            "email": lead.email,
            "first_name": first_name,
            "last_name": lead.last_name.as_deref().map(str::trim).filter(|s| !s.is_empty()),
            "name": first_name.unwrap_or("there"),
            "country": lead.country,
            "language": lead.language,
            "attributes": attributes,
        },
        "product": Value::Object(product),
        "discount": discount,
        "step": {
            "number": facts.step,
            "of": facts.steps,
        },
        "campaign": {
            "name": facts.campaign_name,
        },
        "unsubscribe_url": facts.unsubscribe_url.as_deref().unwrap_or(PREVIEW_UNSUBSCRIBE_URL),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(subject: &str, text: &str, html: &str) -> StoredTemplate {
        StoredTemplate {
            name: "cart".into(),
            language: "en".into(),
            version: 1,
            subject: subject.into(),
            body_text: text.into(),
            body_html: html.into(),
        }
    }

    fn facts() -> DeliveryFacts {
        DeliveryFacts {
            lead: LeadFields {
                email: "ann@example.com".into(),
                first_name: Some("Tom & <Jerry>".into()),
                last_name: Some("Lee".into()),
                country: Some("DE".into()),
                language: Some("de-AT".into()),
                attributes: json!({"plan": "pro"}),
            },
            product: Some(json!({"sku": "A-1", "name": "Boots \"Alpine\"", "price": 89.5, "currency": "EUR"})),
            discount_percent: 10,
            step: 2,
            steps: 3,
            campaign_name: "Cart recovery".into(),
            discount_code: None,
            override_coupons: false,
            unsubscribe_url: Some("https://mail.shop.example/u/t1.ZDo0Mg.mac".into()),
        }
    }

    #[test]
    fn the_unsubscribe_url_reaches_templates() {
        let out = render(
            "x",
            "Unsubscribe: {{unsubscribe_url}}",
            "<a href=\"{{unsubscribe_url}}\">x</a>",
        )
        .unwrap();
        assert_eq!(out.body_text, "Unsubscribe: https://mail.shop.example/u/t1.ZDo0Mg.mac");
        assert_eq!(
            out.body_html,
            "<a href=\"https://mail.shop.example/u/t1.ZDo0Mg.mac\">x</a>"
        );
        let mut preview = facts();
        preview.unsubscribe_url = None;
        assert_eq!(
            template_context(&preview)["unsubscribe_url"],
            json!(PREVIEW_UNSUBSCRIBE_URL)
        );
    }

    #[test]
    fn the_unsubscribe_url_signs_the_delivery() {
        let mail = leadflow_shared::config::MailConfig {
            public_url: "https://mail.shop.example/".into(),
            keyring: leadflow_shared::tokens::Keyring::parse("k1:0123456789abcdef0123456789abcdef").unwrap(),
            keyring_configured: true,
            bounce_domain: "shop.example".into(),
        };
        let url = unsubscribe_url(&mail, 42);
        let token = url.strip_prefix("https://mail.shop.example/u/").unwrap();
        assert_eq!(
            mail.keyring
                .verify(leadflow_shared::tokens::Purpose::Unsubscribe, token)
                .as_deref(),
            Some("d:42")
        );
    }

    #[test]
    fn the_discount_code_and_coupon_override_reach_templates() {
        let mut f = facts();
        let context = template_context(&f);
        assert!(
            context["discount"].get("code").is_none(),
            "no code unless the step gives one"
        );
        assert_eq!(context["discount"]["override_coupons"], json!(false));
        f.discount_code = Some("LF-ABC".into());
        f.override_coupons = true;
        let context = template_context(&f);
        assert_eq!(context["discount"]["code"], json!("LF-ABC"));
        assert_eq!(context["discount"]["override_coupons"], json!(true));
    }

    fn render(subject: &str, text: &str, html: &str) -> Result<RenderedParts, RenderError> {
        CompiledTemplate::compile(stored(subject, text, html))?.render(&template_context(&facts()))
    }

    #[test]
    fn html_is_escaped_but_subject_and_text_are_not() {
        let out = render(
            "Hi {{lead.name}}, {{product.name}}",
            "Hi {{lead.name}}: {{product.name}}",
            "<p>Hi {{lead.name}}: {{product.name}}</p>",
        )
        .unwrap();
        assert_eq!(out.subject, "Hi Tom & <Jerry>, Boots \"Alpine\"");
        assert_eq!(out.body_text, "Hi Tom & <Jerry>: Boots \"Alpine\"");
        assert_eq!(
            out.body_html,
            "<p>Hi Tom &amp; &lt;Jerry&gt;: Boots &quot;Alpine&quot;</p>"
        );
    }

    #[test]
    fn every_context_field_is_available() {
        let out = render(
            "{{step.number}}/{{step.of}} {{campaign.name}}",
            "{{lead.email}} {{lead.first_name}} {{lead.last_name}} {{lead.country}} {{lead.language}} \
             {{lead.attributes.plan}} {{product.sku}} {{product.price}} {{product.currency}} \
             {{#if discount.has}}{{discount.percent}}% off{{/if}}",
            "<p></p>",
        )
        .unwrap();
        assert_eq!(out.subject, "2/3 Cart recovery");
        assert_eq!(
            out.body_text,
            "ann@example.com Tom & <Jerry> Lee DE de-AT pro A-1 89.5 EUR 10% off"
        );
    }

    #[test]
    fn a_missing_variable_is_an_error_naming_it() {
        let err = render("Hello", "line one\nyour link: {{product.url}}", "<p></p>").unwrap_err();
        match &err {
            RenderError::MissingVariable { origin, variable, line } => {
                assert_eq!(origin, "cart/en/body.txt.hbs");
                assert_eq!(variable, "product.url");
                assert_eq!(*line, Some(2));
            }
            other => panic!("unexpected {other:?}"),
        }
        let reason = err.reason();
        assert!(reason.starts_with("template: "), "{reason}");
        assert!(reason.contains("product.url"), "{reason}");
        assert!(reason.contains("body.txt.hbs"), "{reason}");

        let err = render("Hi {{lead.nickname}}", "x", "x").unwrap_err();
        assert!(err.to_string().contains("lead.nickname"), "{err}");
        let err = render("Hi", "x", "<a href=\"{{product.url}}\">").unwrap_err();
        assert!(err.to_string().contains("body.html.hbs"), "{err}");
    }

    #[test]
    fn a_lead_without_a_first_name_is_greeted_as_there() {
        let mut facts = facts();
        facts.lead.first_name = None;
        facts.lead.last_name = Some("  ".into());
        let compiled = CompiledTemplate::compile(stored(
            "Hi {{lead.name}}",
            "{{#if lead.first_name}}named{{else}}anonymous{{/if}} {{lead.last_name}}.",
            "x",
        ))
        .unwrap();
        let out = compiled.render(&template_context(&facts)).unwrap();
        assert_eq!(out.subject, "Hi there");
        assert_eq!(out.body_text, "anonymous .");
        assert_eq!(facts.lead.display_name(), None);
        assert_eq!(self::facts().lead.display_name().as_deref(), Some("Tom & <Jerry> Lee"));
    }

    #[test]
    fn an_optional_product_field_can_be_tested_with_if() {
        let out = render("x", "{{#if product.url}}{{product.url}}{{else}}no link{{/if}}", "x").unwrap();
        assert_eq!(out.body_text, "no link");
    }

    #[test]
    fn a_subject_is_one_line() {
        let out = render("Your cart\n  is waiting\n", "x", "x").unwrap();
        assert_eq!(out.subject, "Your cart is waiting");
    }

    #[test]
    fn no_discount_means_has_is_false() {
        let mut facts = facts();
        facts.discount_percent = 0;
        let compiled = CompiledTemplate::compile(stored("x", "{{#if discount.has}}yes{{else}}no{{/if}}", "x")).unwrap();
        assert_eq!(compiled.render(&template_context(&facts)).unwrap().body_text, "no");
    }

    #[test]
    fn languages_fall_back_from_the_lead_to_the_campaign_to_english() {
        assert_eq!(
            language_candidates(Some("de-AT"), "fr"),
            vec!["de-at", "de", "fr", "en"]
        );
        assert_eq!(language_candidates(Some("pt_BR"), "en"), vec!["pt-br", "pt", "en"]);
        assert_eq!(language_candidates(None, "de"), vec!["de", "en"]);
        assert_eq!(language_candidates(Some(""), "en"), vec!["en"]);

        let candidates = language_candidates(Some("de-AT"), "fr");
        assert_eq!(choose_language("cart", &candidates, ["en", "de"]).unwrap(), "de");
        assert_eq!(choose_language("cart", &candidates, ["en", "es"]).unwrap(), "en");
        let err = choose_language("cart", &candidates, ["es"]).unwrap_err();
        assert_eq!(err.reason(), "template cart has no language de-at, de, fr, en");
    }

    #[test]
    fn a_compiled_template_is_cached_by_version_and_content() {
        let cache = TemplateCache::default();
        let v1 = stored("A {{lead.name}}", "x", "x");
        let first = cache.get_or_compile(&v1).unwrap();
        let again = cache.get_or_compile(&v1).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let mut other = v1.clone();
        other.subject = "B {{lead.name}}".into();
        let replaced = cache.get_or_compile(&other).unwrap();
        assert!(!Arc::ptr_eq(&first, &replaced));
        assert_eq!(cache.len(), 1);
        let mut v2 = other.clone();
        v2.version = 2;
        cache.get_or_compile(&v2).unwrap();
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn a_broken_stored_template_is_a_compile_error() {
        let err = CompiledTemplate::compile(stored("{{#if x}}", "x", "x")).err().unwrap();
        assert!(
            err.reason().starts_with("template: cart/en/subject.hbs"),
            "{}",
            err.reason()
        );
    }
}
