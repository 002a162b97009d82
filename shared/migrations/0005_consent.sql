-- Consent and deliverability: the suppression list, soft-bounce runs, SMTP start marks, inbound reports.

-- Who is never mailed: leads and addresses that are not (yet) leads. The address is kept as a SHA-256 hash of the
-- normalised email, so an erased lead stays suppressed without keeping the address; `email` is NULL once erased.
CREATE TABLE suppressions (
    id           BIGSERIAL PRIMARY KEY,
    email_hash   TEXT NOT NULL,
    email        TEXT,
    campaign_id  BIGINT REFERENCES campaigns (id) ON DELETE CASCADE,   -- NULL: every campaign
    reason       TEXT NOT NULL CHECK (reason IN ('unsubscribed', 'bounced', 'complained', 'suspended', 'manual', 'erased')),
    source       TEXT NOT NULL,                                         -- e.g. one-click, dsn, smtp, api, import, event
    note         TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX suppressions_one_per_scope ON suppressions (email_hash, coalesce(campaign_id, 0));

-- Resubscriptions are explicit admin actions, kept with their reason.
CREATE TABLE suppression_log (
    id           BIGSERIAL PRIMARY KEY,
    email_hash   TEXT NOT NULL,
    campaign_id  BIGINT,
    action       TEXT NOT NULL CHECK (action IN ('suppressed', 'resubscribed')),
    reason       TEXT NOT NULL,
    actor        TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The sender marks the moment it starts the SMTP transaction: a stale claim without the mark was never sent
-- and is reclaimed; one with the mark may have been accepted and becomes `uncertain`.
ALTER TABLE deliveries ADD COLUMN smtp_started_at TIMESTAMPTZ;

-- Transient failures (4xx) in a row per address; a success clears the run.
CREATE TABLE soft_bounces (
    id           BIGSERIAL PRIMARY KEY,
    email_hash   TEXT NOT NULL,
    delivery_id  BIGINT REFERENCES deliveries (id) ON DELETE SET NULL,
    status       TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (delivery_id, status)
);
CREATE INDEX soft_bounces_by_address ON soft_bounces (email_hash, created_at);

-- Inbound bounce and complaint reports, kept for inspection whatever their outcome.
CREATE TABLE inbound_reports (
    id           BIGSERIAL PRIMARY KEY,
    received_via TEXT NOT NULL,                 -- http | amqp
    kind         TEXT,                          -- dsn | arf | unknown
    outcome      TEXT NOT NULL,                 -- applied | ignored | rejected
    detail       TEXT,
    raw          BYTEA NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
