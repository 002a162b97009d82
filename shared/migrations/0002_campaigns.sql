-- Campaigns as marketers run them: audience filters, per-subject enrollment, settings.

ALTER TABLE campaigns
    ADD COLUMN description           TEXT NOT NULL DEFAULT '',
    ADD COLUMN products              TEXT[] NOT NULL DEFAULT '{}',   -- product SKUs; empty: every product
    ADD COLUMN languages             TEXT[] NOT NULL DEFAULT '{}',   -- lead languages (primary subtag); empty: all
    ADD COLUMN countries             TEXT[] NOT NULL DEFAULT '{}',   -- ISO 3166-1 alpha-2; empty: all
    ADD COLUMN notify_url            TEXT,                           -- instant lead notification endpoint
    ADD COLUMN bcc                   TEXT,                           -- a copy of every follow-up
    ADD COLUMN override_coupons      BOOLEAN NOT NULL DEFAULT false, -- the lead discount replaces earlier coupons
    ADD COLUMN use_default_template  BOOLEAN NOT NULL DEFAULT false; -- steps without a template use the default

-- What an enrollment is about: the checkout, order or product of the event that started it. The same person
-- coming back about another product is a new enrollment; a repeat of the same checkout is not.
ALTER TABLE enrollments
    ADD COLUMN subject       TEXT NOT NULL DEFAULT '',
    ADD COLUMN checkout_id   TEXT,
    ADD COLUMN order_id      TEXT,
    ADD COLUMN product_sku   TEXT;
DROP INDEX enrollments_one_active;
CREATE UNIQUE INDEX enrollments_per_subject ON enrollments (lead_id, campaign_id, subject);
CREATE INDEX enrollments_active_by_lead ON enrollments (lead_id) WHERE status = 'active';

-- Installation-wide settings (the send switch, minimum delays per lead source, the staleness limit).
CREATE TABLE settings (
    key         TEXT PRIMARY KEY,
    value       JSONB NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
