-- Scoring: which attribute rules a lead holds now (their points are withdrawn when the condition stops holding),
-- an event rule counted once per event, and an index for the decay sweep.

-- One row per lead x attribute rule whose condition holds. No foreign key to scoring_rules: when a rule is
-- deleted its row stays until the lead is rescored, which withdraws the points the row records.
CREATE TABLE lead_rule_state (
    lead_id     BIGINT NOT NULL REFERENCES leads (id) ON DELETE CASCADE,
    rule_id     BIGINT NOT NULL,
    rule_name   TEXT NOT NULL,                     -- for the ledger's reason once the rule is gone
    points      DOUBLE PRECISION NOT NULL,         -- what was given, and is taken back
    since       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (lead_id, rule_id)
);
CREATE INDEX lead_rule_state_by_rule ON lead_rule_state (rule_id);

-- A redelivered event never counts twice for the same rule.
CREATE UNIQUE INDEX score_ledger_event_rule ON score_ledger (event_id, rule_id) WHERE event_id IS NOT NULL;
-- A lead's ledger, newest first, paged by id.
CREATE INDEX score_ledger_by_lead_id ON score_ledger (lead_id, id);
-- The decay sweep visits leads with a score, oldest score first.
CREATE INDEX leads_scored ON leads (score_at) WHERE score <> 0;
-- Event rules are looked up by type.
CREATE INDEX scoring_rules_by_event_type ON scoring_rules (event_type) WHERE active AND event_type IS NOT NULL;
