//! The suppression list: people who are never mailed (globally or for one campaign), checked at enrollment, when a
//! step comes due and right before SMTP. Entries are keyed by a SHA-256 hash of the normalised address, so an
//! erased lead stays suppressed without its address being kept.

use deadpool_postgres::GenericClient;
use sha2::{Digest, Sha256};

use crate::domain::EmailAddress;

/// Why an address is suppressed; also the `reason` of the follow-ups it cancels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Unsubscribed,
    Bounced,
    Complained,
    Suspended,
    Manual,
    Erased,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unsubscribed => "unsubscribed",
            Self::Bounced => "bounced",
            Self::Complained => "complained",
            Self::Suspended => "suspended",
            Self::Manual => "manual",
            Self::Erased => "erased",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [
            Self::Unsubscribed,
            Self::Bounced,
            Self::Complained,
            Self::Suspended,
            Self::Manual,
            Self::Erased,
        ]
        .into_iter()
        .find(|r| r.as_str() == raw)
    }
}

/// The hex SHA-256 of the normalised address.
pub fn email_hash(email: &EmailAddress) -> String {
    hex::encode(Sha256::digest(email.as_str().as_bytes()))
}

/// What suppressing did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Suppressed {
    /// False when the address was already suppressed in that scope.
    pub new: bool,
    /// Enrollments ended (their open follow-ups cancelled with the reason).
    pub ended_enrollments: Vec<i64>,
    pub cancelled_deliveries: u64,
}

/// Suppresses `email` globally (`campaign_id` None) or for one campaign, and ends the matching sequences of the
/// lead with that address: open follow-ups become `cancelled` with the reason. Run it inside the caller's
/// transaction; the caller sends notifications for `ended_enrollments` if it wants to.
pub async fn suppress(
    tx: &impl GenericClient,
    email: &EmailAddress,
    reason: Reason,
    source: &str,
    campaign_id: Option<i64>,
    note: Option<&str>,
) -> anyhow::Result<Suppressed> {
    let hash = email_hash(email);
    let inserted = tx
        .execute(
            "INSERT INTO suppressions (email_hash, email, campaign_id, reason, source, note)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (email_hash, coalesce(campaign_id, 0)) DO NOTHING",
            &[&hash, &email.as_str(), &campaign_id, &reason.as_str(), &source, &note],
        )
        .await?;
    tx.execute(
        "INSERT INTO suppression_log (email_hash, campaign_id, action, reason, actor) VALUES ($1, $2, 'suppressed', $3, $4)",
        &[&hash, &campaign_id, &reason.as_str(), &source],
    )
    .await?;
    if campaign_id.is_none() {
        tx.execute(
            "UPDATE leads SET suppressed_reason = $2, suppressed_at = now()
             WHERE email = $1 AND suppressed_reason IS NULL",
            &[&email.as_str(), &reason.as_str()],
        )
        .await?;
    }
    let ended = tx
        .query(
            "UPDATE enrollments e SET status = 'cancelled', reason = $3, ended_at = now()
             FROM leads l
             WHERE l.id = e.lead_id AND l.email = $1 AND e.status = 'active'
               AND ($2::bigint IS NULL OR e.campaign_id = $2)
             RETURNING e.id",
            &[&email.as_str(), &campaign_id, &reason.as_str()],
        )
        .await?;
    let ended_enrollments: Vec<i64> = ended.iter().map(|r| r.get(0)).collect();
    let cancelled_deliveries = tx
        .execute(
            "UPDATE deliveries SET state = 'cancelled', reason = $2, updated_at = now()
             WHERE enrollment_id = ANY ($1) AND state IN ('pending', 'queued', 'rendered', 'retrying')",
            &[&ended_enrollments, &reason.as_str()],
        )
        .await?;
    Ok(Suppressed {
        new: inserted > 0,
        ended_enrollments,
        cancelled_deliveries,
    })
}

/// The reason `email` may not be mailed by `campaign_id` (a global entry, or one for that campaign), if any.
pub async fn suppressed_reason(
    client: &impl GenericClient,
    email: &EmailAddress,
    campaign_id: Option<i64>,
) -> anyhow::Result<Option<String>> {
    let row = client
        .query_opt(
            "SELECT reason FROM suppressions
             WHERE email_hash = $1 AND (campaign_id IS NULL OR campaign_id = $2)
             ORDER BY campaign_id NULLS FIRST LIMIT 1",
            &[&email_hash(email), &campaign_id],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Removes a suppression (an explicit admin action), recording who and why. Returns false when there was none.
pub async fn resubscribe(
    tx: &impl GenericClient,
    email: &EmailAddress,
    campaign_id: Option<i64>,
    reason: &str,
    actor: &str,
) -> anyhow::Result<bool> {
    if reason.trim().is_empty() {
        anyhow::bail!("a resubscription needs a reason");
    }
    let hash = email_hash(email);
    let removed = tx
        .execute(
            "DELETE FROM suppressions WHERE email_hash = $1 AND coalesce(campaign_id, 0) = coalesce($2::bigint, 0)",
            &[&hash, &campaign_id],
        )
        .await?;
    if removed == 0 {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO suppression_log (email_hash, campaign_id, action, reason, actor) VALUES ($1, $2, 'resubscribed', $3, $4)",
        &[&hash, &campaign_id, &reason, &actor],
    )
    .await?;
    if campaign_id.is_none() {
        tx.execute(
            "UPDATE leads SET suppressed_reason = NULL, suppressed_at = NULL WHERE email = $1",
            &[&email.as_str()],
        )
        .await?;
    }
    Ok(true)
}

/// Carries every suppression of `from` (global and per campaign) over to `to`, for a lead whose address changed:
/// a person who opted out stays out whichever address the lead has now. Returns the enrollments this ended, each
/// with its reason, for the caller's notifications. Runs in the caller's transaction, after the lead's email moved.
pub async fn carry_over(
    tx: &impl GenericClient,
    from: &EmailAddress,
    to: &EmailAddress,
    source: &str,
) -> anyhow::Result<Vec<(Reason, i64)>> {
    let rows = tx
        .query(
            "SELECT reason, campaign_id, note FROM suppressions WHERE email_hash = $1",
            &[&email_hash(from)],
        )
        .await?;
    let mut ended = Vec::new();
    for row in rows {
        let Some(reason) = Reason::parse(row.try_get(0)?) else {
            continue;
        };
        let campaign_id: Option<i64> = row.try_get(1)?;
        let note: Option<String> = row.try_get(2)?;
        let done = suppress(tx, to, reason, source, campaign_id, note.as_deref()).await?;
        ended.extend(done.ended_enrollments.into_iter().map(|id| (reason, id)));
    }
    Ok(ended)
}

/// Records a transient failure (4xx, or a DSN `delayed`-then-failed soft status) for the address. When the address
/// has `limit` of them within `window` with no success in between, it is suppressed as bounced (source
/// `soft-bounces`); returns the suppression in that case. A repeat for the same delivery and status counts once.
pub async fn record_soft_bounce(
    tx: &impl GenericClient,
    email: &EmailAddress,
    delivery_id: Option<i64>,
    status: &str,
    limit: u32,
    window: std::time::Duration,
) -> anyhow::Result<Option<Suppressed>> {
    let hash = email_hash(email);
    tx.execute(
        "INSERT INTO soft_bounces (email_hash, delivery_id, status) VALUES ($1, $2, $3)
         ON CONFLICT (delivery_id, status) DO NOTHING",
        &[&hash, &delivery_id, &status],
    )
    .await?;
    let in_window: i64 = tx
        .query_one(
            "SELECT count(*) FROM soft_bounces
             WHERE email_hash = $1 AND created_at > now() - make_interval(secs => $2)",
            &[&hash, &window.as_secs_f64()],
        )
        .await?
        .get(0);
    if limit == 0 || in_window < i64::from(limit) {
        return Ok(None);
    }
    let note = format!(
        "{in_window} transient failures within {}",
        crate::domain::format_delay(window)
    );
    Ok(Some(
        suppress(tx, email, Reason::Bounced, "soft-bounces", None, Some(&note)).await?,
    ))
}

/// A delivery to the address succeeded: its run of soft bounces starts over.
pub async fn clear_soft_bounces(tx: &impl GenericClient, email: &EmailAddress) -> anyhow::Result<u64> {
    Ok(tx
        .execute("DELETE FROM soft_bounces WHERE email_hash = $1", &[&email_hash(email)])
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_of_the_normalised_address() {
        let a = EmailAddress::parse("Ann@Example.com").unwrap();
        let b = EmailAddress::parse(" ann@example.com").unwrap();
        assert_eq!(email_hash(&a), email_hash(&b));
        assert_eq!(email_hash(&a).len(), 64);
        assert_eq!(Reason::parse("bounced"), Some(Reason::Bounced));
        assert_eq!(Reason::parse("nope"), None);
    }
}
