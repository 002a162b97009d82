-- A/B variants and holdout, send windows, discount codes, instant lead notifications.

ALTER TABLE campaigns
    ADD COLUMN send_window      JSONB,         -- {"start":"09:00","end":"20:00","days":[1,2,3,4,5],"timezone":"Europe/Berlin"}
    ADD COLUMN holdout_percent  SMALLINT NOT NULL DEFAULT 0 CHECK (holdout_percent BETWEEN 0 AND 50),
    ADD COLUMN ab_end           JSONB,         -- the A/B test's end criterion; NULL: no test
    ADD COLUMN ab_keep_best     BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN ab_winner        TEXT,          -- set when the test ends
    ADD COLUMN ab_ended_at      TIMESTAMPTZ;

-- Follow-up blocks of a campaign; a campaign without a test has one variant, "A".
CREATE TABLE campaign_variants (
    campaign_id  BIGINT NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    weight       INTEGER NOT NULL CHECK (weight > 0),
    PRIMARY KEY (campaign_id, name)
);
INSERT INTO campaign_variants (campaign_id, name, weight) SELECT id, 'A', 100 FROM campaigns;

ALTER TABLE campaign_steps
    ADD COLUMN variant      TEXT NOT NULL DEFAULT 'A',
    ADD COLUMN code_source  TEXT CHECK (code_source IN ('generated', 'pool'));
ALTER TABLE campaign_steps DROP CONSTRAINT campaign_steps_pkey;
ALTER TABLE campaign_steps ADD PRIMARY KEY (campaign_id, variant, step);

ALTER TABLE enrollments
    ADD COLUMN variant  TEXT,                       -- NULL for the holdout group
    ADD COLUMN holdout  BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE deliveries ADD COLUMN variant TEXT NOT NULL DEFAULT 'A';
ALTER TABLE conversions
    ADD COLUMN variant       TEXT,
    ADD COLUMN code          TEXT,
    ADD COLUMN enrollment_id BIGINT REFERENCES enrollments (id) ON DELETE SET NULL;
CREATE INDEX conversions_by_enrollment ON conversions (enrollment_id);

-- Per-lead discount codes: generated at render time, or drawn from an uploaded pool.
CREATE TABLE discount_codes (
    id            BIGSERIAL PRIMARY KEY,
    campaign_id   BIGINT NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    variant       TEXT NOT NULL DEFAULT 'A',
    step          SMALLINT NOT NULL,
    code          TEXT NOT NULL UNIQUE,
    source        TEXT NOT NULL CHECK (source IN ('generated', 'pool')),
    lead_id       BIGINT REFERENCES leads (id) ON DELETE SET NULL,
    delivery_id   BIGINT UNIQUE REFERENCES deliveries (id) ON DELETE SET NULL,
    assigned_at   TIMESTAMPTZ,
    redeemed_at   TIMESTAMPTZ,
    conversion_id BIGINT REFERENCES conversions (id) ON DELETE SET NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX discount_codes_free ON discount_codes (campaign_id, variant, step, id)
    WHERE delivery_id IS NULL AND source = 'pool';

-- Instant lead notifications: an outbox of signed JSON POSTs, retried with backoff, never blocking the pipeline.
CREATE TABLE notifications (
    id               BIGSERIAL PRIMARY KEY,
    campaign_id      BIGINT NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    lead_id          BIGINT REFERENCES leads (id) ON DELETE SET NULL,
    kind             TEXT NOT NULL,            -- enrolled | email_sent | bounced | converted | unsubscribed
    payload          JSONB NOT NULL,
    state            TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error       TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at     TIMESTAMPTZ
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE state = 'pending';
