-- The pipeline's system of record: leads, their events, campaigns, templates, enrollments, deliveries, conversions.

CREATE TABLE leads (
    id          BIGSERIAL PRIMARY KEY,
    email       TEXT NOT NULL UNIQUE,            -- normalised (trimmed, lower-case): the identity key
    first_name  TEXT,
    last_name   TEXT,
    phone       TEXT,
    country     TEXT,                            -- ISO 3166-1 alpha-2
    language    TEXT,                            -- BCP 47
    timezone    TEXT,                            -- IANA
    attributes  JSONB NOT NULL DEFAULT '{}',
    suppressed_reason TEXT,                      -- unsubscribed | bounced | complained: never enrolled or mailed
    suppressed_at     TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every accepted event: idempotency (source + id) and the lead's timeline.
CREATE TABLE events (
    id           BIGSERIAL PRIMARY KEY,
    source       TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    type         TEXT NOT NULL,
    lead_id      BIGINT NOT NULL REFERENCES leads (id) ON DELETE CASCADE,
    data         JSONB NOT NULL,
    occurred_at  TIMESTAMPTZ NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    handled_at   TIMESTAMPTZ,                    -- set once the scheduler has acted on it
    UNIQUE (source, event_id)
);
CREATE INDEX events_by_lead ON events (lead_id, occurred_at);
CREATE INDEX events_unhandled ON events (received_at) WHERE handled_at IS NULL;

CREATE TABLE templates (
    name        TEXT NOT NULL,
    language    TEXT NOT NULL,
    subject     TEXT NOT NULL,
    body_text   TEXT NOT NULL,
    body_html   TEXT NOT NULL,
    version     INTEGER NOT NULL DEFAULT 1,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (name, language)
);

CREATE TABLE campaigns (
    id           BIGSERIAL PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    status       TEXT NOT NULL CHECK (status IN ('active', 'inactive')),
    lead_source  TEXT,                           -- NULL: every lead source
    language     TEXT NOT NULL DEFAULT 'en',     -- template language used when the lead's has none
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE campaign_steps (
    campaign_id       BIGINT NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    step              SMALLINT NOT NULL CHECK (step BETWEEN 1 AND 3),
    delay_seconds     BIGINT NOT NULL CHECK (delay_seconds >= 0),
    discount_percent  SMALLINT NOT NULL DEFAULT 0 CHECK (discount_percent BETWEEN 0 AND 100),
    template          TEXT NOT NULL,
    PRIMARY KEY (campaign_id, step)
);

CREATE TABLE enrollments (
    id           BIGSERIAL PRIMARY KEY,
    lead_id      BIGINT NOT NULL REFERENCES leads (id) ON DELETE CASCADE,
    campaign_id  BIGINT NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    event_id     BIGINT REFERENCES events (id) ON DELETE SET NULL,
    product      JSONB,                          -- the product of the event that enrolled the lead
    status       TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'completed', 'cancelled')),
    reason       TEXT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    ended_at     TIMESTAMPTZ
);
-- A lead is in a campaign at most once at a time.
CREATE UNIQUE INDEX enrollments_one_active ON enrollments (lead_id, campaign_id) WHERE status = 'active';

-- Durable timers: one row per lead x campaign x step of an enrollment.
-- pending -> queued -> rendered -> sending -> sent | failed | uncertain; retrying -> rendered; any open -> cancelled.
CREATE TABLE deliveries (
    id             BIGSERIAL PRIMARY KEY,
    enrollment_id  BIGINT NOT NULL REFERENCES enrollments (id) ON DELETE CASCADE,
    lead_id        BIGINT NOT NULL REFERENCES leads (id) ON DELETE CASCADE,
    campaign_id    BIGINT NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    step           SMALLINT NOT NULL,
    due_at         TIMESTAMPTZ NOT NULL,
    state          TEXT NOT NULL DEFAULT 'pending' CHECK (state IN
                     ('pending', 'queued', 'rendered', 'sending', 'retrying', 'sent', 'failed', 'cancelled', 'uncertain')),
    reason         TEXT,
    attempts       INTEGER NOT NULL DEFAULT 0,
    message_id     TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at        TIMESTAMPTZ,
    UNIQUE (enrollment_id, step)
);
CREATE INDEX deliveries_due ON deliveries (due_at) WHERE state IN ('pending', 'retrying');
CREATE INDEX deliveries_in_flight ON deliveries (updated_at) WHERE state IN ('queued', 'rendered', 'sending');
CREATE INDEX deliveries_by_lead ON deliveries (lead_id);
CREATE INDEX deliveries_by_campaign ON deliveries (campaign_id, step, state);

-- The rendered message of a delivery, written by the renderer and read by the sender.
CREATE TABLE rendered_messages (
    delivery_id  BIGINT PRIMARY KEY REFERENCES deliveries (id) ON DELETE CASCADE,
    to_address   TEXT NOT NULL,
    to_name      TEXT,
    subject      TEXT NOT NULL,
    body_text    TEXT NOT NULL,
    body_html    TEXT NOT NULL,
    rendered_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A purchase, attributed to the last follow-up the lead was sent.
CREATE TABLE conversions (
    id           BIGSERIAL PRIMARY KEY,
    lead_id      BIGINT NOT NULL REFERENCES leads (id) ON DELETE CASCADE,
    event_id     BIGINT NOT NULL UNIQUE REFERENCES events (id) ON DELETE CASCADE,
    order_id     TEXT,
    amount       NUMERIC(18, 4),
    currency     TEXT,
    delivery_id  BIGINT REFERENCES deliveries (id) ON DELETE SET NULL,
    campaign_id  BIGINT REFERENCES campaigns (id) ON DELETE SET NULL,
    step         SMALLINT,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX conversions_by_campaign ON conversions (campaign_id, step);
