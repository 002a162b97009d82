//! Leads keyed on the customer id (`LEADFLOW_IDENTITY_KEY=customer_id`) for `POST /v1/leads` and imports.
//!
//! The customer id finds the lead; the email travels with it and follows the customer's latest address (the
//! lead keeps its id and history, an opt-out of the old address stays in force). A lead with the address and no
//! customer id yet (from before the deployment keyed on customer ids) is the customer's; one with the address
//! under another customer id is a conflict naming `email`. In email mode none of this runs.

use anyhow::Context as _;
use deadpool_postgres::GenericClient;
use serde_json::{json, Map, Value};

use leadflow_scheduler::notify;
use leadflow_shared::domain::EmailAddress;
use leadflow_shared::suppression;

use super::profile::{self, FieldError, ProfileInput};

/// Why the customer's lead could not be found or created.
#[derive(Debug)]
pub enum KeyError {
    /// The caller can fix it: the address belongs to another lead (`email`), or the customer id was taken
    /// meanwhile (`customer_id`).
    Field(FieldError),
    Failed(anyhow::Error),
}

impl From<tokio_postgres::Error> for KeyError {
    fn from(e: tokio_postgres::Error) -> Self {
        match profile::field_error(&e) {
            Some(field) => Self::Field(field),
            None => Self::Failed(e.into()),
        }
    }
}

/// The customer id of an input object (an API body or an import row): required, checked like the profile field.
pub fn check_customer_id(input: &Map<String, Value>) -> Result<String, FieldError> {
    let checked = match (profile::field("customer_id"), input.get("customer_id")) {
        (Some(field), Some(value)) => profile::check_standard(field, value)?,
        _ => Value::Null,
    };
    match checked {
        Value::String(customer_id) => Ok(customer_id),
        _ => Err(FieldError::new(
            "customer_id",
            "required: leads are identified by customer id here (LEADFLOW_IDENTITY_KEY=customer_id)",
        )),
    }
}

/// Refuses checked edits that would leave the lead without its customer id.
pub fn check_keeps_customer_id(input: &ProfileInput) -> Result<(), FieldError> {
    match input.standard.get("customer_id") {
        Some(Value::Null) => Err(FieldError::new(
            "customer_id",
            "cannot be cleared: leads are identified by customer id here (LEADFLOW_IDENTITY_KEY=customer_id)",
        )),
        _ => Ok(()),
    }
}

/// The lead of `customer_id`, locked, with `email` as its address (changed, logged with `actor`, when the
/// customer's address changed); or the lead with `email` and no customer id; or a new lead with both. Returns
/// the lead's id and whether it was created. The caller writes the rest of the profile (the customer id included,
/// so a claimed lead's change log shows it).
pub async fn find_or_create(
    tx: &impl GenericClient,
    customer_id: &str,
    email: &EmailAddress,
    actor: &str,
) -> Result<(i64, bool), KeyError> {
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT id, email, customer_id FROM leads WHERE customer_id = $1 OR email = $2 ORDER BY id FOR UPDATE",
            )
            .await?,
            &[&customer_id, &email.as_str()],
        )
        .await?;
    let mut by_customer = None;
    let mut by_email = None;
    for row in &rows {
        let (id, stored_email, stored_customer): (i64, String, Option<String>) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        if stored_customer.as_deref() == Some(customer_id) {
            by_customer = Some((id, stored_email.clone()));
        }
        if stored_email == email.as_str() {
            by_email = Some((id, stored_customer));
        }
    }
    match (by_customer, by_email) {
        (Some((lead, _)), Some((holder, _))) if lead == holder => Ok((lead, false)),
        (Some(_), Some((holder, _))) | (None, Some((holder, Some(_)))) => Err(KeyError::Field(FieldError::new(
            "email",
            format!(
                "another lead (id {holder}) has this email under another customer id; change that lead's email \
                 or merge the two leads first"
            ),
        ))),
        (Some((lead, old)), None) => {
            change_email(tx, lead, &old, email, actor).await?;
            Ok((lead, false))
        }
        (None, Some((holder, None))) => Ok((holder, false)),
        (None, None) => {
            let row = tx
                .query_one(
                    &tx.prepare_cached("INSERT INTO leads (email, customer_id) VALUES ($1, $2) RETURNING id")
                        .await?,
                    &[&email.as_str(), &customer_id],
                )
                .await?;
            Ok((row.try_get(0)?, true))
        }
    }
}

/// The customer's lead takes the new address, keeping its id and history; the suppressions of the old address are
/// carried over to the new one.
async fn change_email(
    tx: &impl GenericClient,
    lead_id: i64,
    old: &str,
    new: &EmailAddress,
    actor: &str,
) -> Result<(), KeyError> {
    tx.execute(
        "UPDATE leads SET email = $2, updated_at = now() WHERE id = $1",
        &[&lead_id, &new.as_str()],
    )
    .await?;
    if let Ok(old) = EmailAddress::parse(old) {
        let ended = suppression::carry_over(tx, &old, new, "email-change")
            .await
            .context("failed to carry the suppressions over to the new email")
            .map_err(KeyError::Failed)?;
        for (reason, enrollment) in ended {
            if let Some(kind) = notify::Kind::for_reason(reason.as_str()) {
                let details = json!({ "reason": reason.as_str(), "source": "email-change" });
                notify::enqueue(tx, notify::About::Enrollment(enrollment), kind, details)
                    .await
                    .map_err(KeyError::Failed)?;
            }
        }
    }
    tx.execute(
        "INSERT INTO lead_changes (lead_id, kind, changes, actor) VALUES ($1, 'email', $2, $3)",
        &[
            &lead_id,
            &json!({ "email": { "from": old, "to": new.as_str() } }),
            &actor,
        ],
    )
    .await?;
    tracing::info!(lead.id = lead_id, email = %new.masked(), actor, "the customer's email changed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn the_customer_id_is_required_trimmed_and_never_cleared() {
        assert_eq!(
            check_customer_id(&input(json!({"customer_id": " C-1 "}))),
            Ok("C-1".to_string())
        );
        for missing in [json!({}), json!({"customer_id": null}), json!({"customer_id": "  "})] {
            assert_eq!(check_customer_id(&input(missing)).unwrap_err().field, "customer_id");
        }
        assert_eq!(
            check_customer_id(&input(json!({"customer_id": 17}))).unwrap_err().field,
            "customer_id"
        );
        let mut clearing = ProfileInput::default();
        clearing.standard.insert("customer_id".into(), Value::Null);
        assert!(check_keeps_customer_id(&clearing).is_err());
        assert!(check_keeps_customer_id(&ProfileInput::default()).is_ok());
    }
}
