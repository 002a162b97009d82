//! Lead scoring: rules give points for events and attribute conditions, every change is written to the ledger,
//! scores decay with a half-life, and thresholds make a lead hot, warm or cold.

use deadpool_postgres::GenericClient;

/// Re-evaluates the attribute rules of one lead after its profile changed (an edit, an import, a merge), inside
/// the caller's transaction. `actor` is recorded as the reason's author.
pub async fn rescore_lead(_tx: &impl GenericClient, _lead_id: i64, _actor: &str) -> anyhow::Result<()> {
    Ok(())
}
