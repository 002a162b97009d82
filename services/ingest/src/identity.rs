//! Leads keyed on the customer id (`LEADFLOW_IDENTITY_KEY=customer_id`).
//!
//! The store upserts an event's lead by email. Keyed on the customer id, [`prepare`] runs first and makes the
//! event's email lead to the customer's lead: the customer's lead takes the event's address when it changed (its
//! suppressions carried over, the change logged), or a lead with that address and no customer id yet is claimed
//! for the customer. A customer new to leadflow gets its lead from the upsert, and [`claim`] keys it. An address
//! another lead holds is refused naming `data.email`. In email mode both are no-ops: nothing is read.

use anyhow::Context as _;
use deadpool_postgres::GenericClient;
use serde_json::json;

use leadflow_scheduler::notify;
use leadflow_shared::amqp::Outcome;
use leadflow_shared::config::IdentityKey;
use leadflow_shared::domain::EmailAddress;
use leadflow_shared::http::Problem;
use leadflow_shared::suppression;

use crate::events::LeadEvent;

/// Who logs the changes an event makes to a lead (`lead_changes.actor`).
const ACTOR: &str = "event";

/// An event the stored leads do not allow: refused like an invalid event (HTTP 409 naming the field, or the
/// dead-letter queue), never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Refused {
    /// A JSON pointer into the event, such as `/data/email`.
    pub field: String,
    pub reason: String,
    /// The event's position in its batch, once known.
    pub index: Option<usize>,
}

impl Refused {
    /// Marks a refusal of the `index`-th event of a batch; other failures pass through unchanged.
    pub fn locate(e: anyhow::Error, index: usize) -> anyhow::Error {
        match e.downcast::<Refused>() {
            Ok(refused) => anyhow::Error::new(Refused {
                index: Some(index),
                ..refused
            }),
            Err(e) => e,
        }
    }

    /// The answer to an HTTP request: 409 naming the field (`/<index>/data/email` in a batch).
    pub fn problem(&self, batch: bool) -> Problem {
        let field = match (batch, self.index) {
            (true, Some(i)) => format!("/{i}{}", self.field),
            _ => self.field.clone(),
        };
        let problem = Problem {
            field: Some(field.clone()),
            ..Problem::new(
                axum::http::StatusCode::CONFLICT,
                "conflict",
                format!("{field}: {}", self.reason),
            )
        };
        match (batch, self.index) {
            (true, Some(i)) => problem.with_index(i),
            _ => problem,
        }
    }
}

/// What a failed attempt to store a message's events means for the message: a refusal goes to the dead-letter
/// queue (storing it again would be refused again), anything else is retried.
pub fn outcome_of_failure(e: anyhow::Error) -> Outcome {
    match e.downcast_ref::<Refused>() {
        Some(refused) => Outcome::DeadLetter(refused.to_string()),
        None => Outcome::Retry(e),
    }
}

/// What [`prepare`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyed {
    /// Email mode, or the lead with the event's email is the customer's already: the upsert finds it.
    Found,
    /// No lead has the customer id or the email: the upsert creates one, [`claim`] gives it the customer id.
    New,
}

/// Makes the lead with the event's email the lead of the event's customer id, before the upsert by email. Runs in
/// the batch's transaction, after the repeat check (a replayed event changes nothing).
pub async fn prepare(tx: &impl GenericClient, event: &LeadEvent) -> anyhow::Result<Keyed> {
    let (IdentityKey::CustomerId, Some(customer_id)) = (event.identity, event.customer_id.as_deref()) else {
        return Ok(Keyed::Found);
    };
    let email = event.email.as_str();
    // At most two rows: the customer's lead and the lead with the address (often the same one). Locked, so a
    // concurrent batch about the same customer waits for this one.
    let rows = tx
        .query(
            &tx.prepare_cached(
                "SELECT id, email, customer_id FROM leads WHERE customer_id = $1 OR email = $2 ORDER BY id FOR UPDATE",
            )
            .await?,
            &[&customer_id, &email],
        )
        .await
        .context("failed to find the customer's lead")?;
    let mut by_customer = None;
    let mut by_email = None;
    for row in &rows {
        let (id, stored_email, stored_customer): (i64, String, Option<String>) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        if stored_customer.as_deref() == Some(customer_id) {
            by_customer = Some((id, stored_email.clone()));
        }
        if stored_email == email {
            by_email = Some((id, stored_customer));
        }
    }
    match (by_customer, by_email) {
        (Some((lead, _)), Some((holder, _))) if lead == holder => Ok(Keyed::Found),
        (Some(_), Some((holder, _))) => Err(taken(holder)),
        (Some((lead, old_email)), None) => {
            change_email(tx, lead, &old_email, &event.email).await?;
            Ok(Keyed::Found)
        }
        (None, Some((holder, None))) => {
            // A lead from before the deployment keyed on customer ids (or from a path that did not know it):
            // the customer with its address is that person.
            key(tx, holder, customer_id).await?;
            Ok(Keyed::Found)
        }
        (None, Some((holder, Some(_)))) => Err(taken(holder)),
        (None, None) => Ok(Keyed::New),
    }
}

/// Gives the lead the upsert just created the event's customer id.
pub async fn claim(tx: &impl GenericClient, keyed: Keyed, lead_id: i64, event: &LeadEvent) -> anyhow::Result<()> {
    match (keyed, event.customer_id.as_deref()) {
        (Keyed::New, Some(customer_id)) => key(tx, lead_id, customer_id).await,
        _ => Ok(()),
    }
}

fn taken(holder: i64) -> anyhow::Error {
    anyhow::Error::new(Refused {
        field: "/data/email".into(),
        reason: format!(
            "another lead (id {holder}) has this email under another customer id; change that lead's email or \
             merge the two leads first"
        ),
        index: None,
    })
}

async fn key(tx: &impl GenericClient, lead_id: i64, customer_id: &str) -> anyhow::Result<()> {
    tx.execute(
        &tx.prepare_cached("UPDATE leads SET customer_id = $2 WHERE id = $1 AND customer_id IS NULL")
            .await?,
        &[&lead_id, &customer_id],
    )
    .await
    .context("failed to key the lead on its customer id")?;
    Ok(())
}

/// The customer's lead takes the event's address, keeping its id and history; an opt-out of the old address
/// stays in force for the new one.
async fn change_email(tx: &impl GenericClient, lead_id: i64, old: &str, new: &EmailAddress) -> anyhow::Result<()> {
    tx.execute(
        "UPDATE leads SET email = $2, updated_at = now() WHERE id = $1",
        &[&lead_id, &new.as_str()],
    )
    .await
    .context("failed to change the lead's email")?;
    if let Ok(old) = EmailAddress::parse(old) {
        let ended = suppression::carry_over(tx, &old, new, "email-change")
            .await
            .context("failed to carry the suppressions over to the new email")?;
        for (reason, enrollment) in ended {
            if let Some(kind) = notify::Kind::for_reason(reason.as_str()) {
                let details = json!({ "reason": reason.as_str(), "source": "email-change" });
                notify::enqueue(tx, notify::About::Enrollment(enrollment), kind, details).await?;
            }
        }
    }
    tx.execute(
        "INSERT INTO lead_changes (lead_id, kind, changes, actor) VALUES ($1, 'email', $2, $3)",
        &[
            &lead_id,
            &json!({ "email": { "from": old, "to": new.as_str() } }),
            &ACTOR,
        ],
    )
    .await
    .context("failed to log the email change")?;
    tracing::info!(lead.id = lead_id, email = %new.masked(), "the customer's email changed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> anyhow::Error {
        taken(7)
    }

    #[test]
    fn a_refusal_names_the_field_of_its_event_in_a_batch() {
        let located = Refused::locate(refused(), 3);
        let refusal = located.downcast_ref::<Refused>().cloned().unwrap();
        let batch = refusal.problem(true);
        assert_eq!(batch.field.as_deref(), Some("/3/data/email"));
        assert_eq!(batch.index, Some(3));
        assert_eq!(batch.status_code, 409);
        assert_eq!(refusal.problem(false).field.as_deref(), Some("/data/email"));
        let other = Refused::locate(anyhow::anyhow!("database away"), 1);
        assert!(other.downcast_ref::<Refused>().is_none());
    }

    #[test]
    fn a_refused_message_is_dead_lettered_and_a_failed_one_retried() {
        assert!(matches!(outcome_of_failure(refused()), Outcome::DeadLetter(r) if r.starts_with("/data/email: ")));
        assert!(matches!(
            outcome_of_failure(anyhow::anyhow!("database away")),
            Outcome::Retry(_)
        ));
    }
}
