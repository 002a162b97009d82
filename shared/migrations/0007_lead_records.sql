-- Lead records a team works from: the full profile, management fields, origin set once, custom fields, inquiries,
-- notes with history, a change log, scoring (rules and a ledger), static lists and saved filters, import jobs.
-- Consent (unsubscribed, invalid email, suspended) is not copied here: it is read from `suppressions`, the one
-- place that decides who is mailed, so it can never be cleared by editing a lead.

-- Configurable types: defaults here, more added over the API (and imports add their source).
CREATE TABLE lead_statuses (
    name        TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 60),
    builtin     BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO lead_statuses (name, builtin) VALUES ('Active', true), ('Inactive', true);

CREATE TABLE lead_sources (
    name        TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 100),
    category    TEXT,                              -- e.g. organic search, paid, import, manual
    builtin     BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO lead_sources (name, category, builtin) VALUES
    ('Bing', 'organic search', true), ('Google', 'organic search', true), ('Yahoo', 'organic search', true),
    ('New prospect', 'manual', true), ('checkout', 'shop', true), ('web form', 'form', true),
    ('import', 'import', true), ('api', 'api', true);

CREATE TABLE contact_methods (
    name        TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 60),
    builtin     BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO contact_methods (name, builtin) VALUES ('Chat', true), ('Form', true), ('Telephone', true), ('Email', true);

-- The sales team a lead can be assigned to.
CREATE TABLE agents (
    name        TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 100),
    email       TEXT,
    active      BOOLEAN NOT NULL DEFAULT true,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The profile. `phone` becomes `phones` (several); the identity key stays `email` unless the deployment keys on
-- `customer_id` (LEADFLOW_IDENTITY_KEY), which is then unique too.
ALTER TABLE leads
    ADD COLUMN phones                    TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN gender                    TEXT,
    ADD COLUMN title                     TEXT,
    ADD COLUMN address                   TEXT,
    ADD COLUMN city                      TEXT,
    ADD COLUMN region                    TEXT,          -- region, province or state
    ADD COLUMN district                  TEXT,
    ADD COLUMN division                  TEXT,
    ADD COLUMN postal_code               TEXT,
    ADD COLUMN profession                TEXT,
    ADD COLUMN company_name              TEXT,
    ADD COLUMN company_size              TEXT,          -- e.g. "11-50"
    ADD COLUMN company_website           TEXT,
    ADD COLUMN company_sector            TEXT,
    ADD COLUMN customer_id               TEXT,
    ADD COLUMN external_id               TEXT,
    ADD COLUMN status                    TEXT NOT NULL DEFAULT 'Active'
                                          REFERENCES lead_statuses (name) ON UPDATE CASCADE,
    ADD COLUMN source                    TEXT REFERENCES lead_sources (name) ON UPDATE CASCADE,
    ADD COLUMN contact_method            TEXT REFERENCES contact_methods (name) ON UPDATE CASCADE,
    ADD COLUMN is_customer               BOOLEAN NOT NULL DEFAULT false,
    ADD COLUMN agent                     TEXT REFERENCES agents (name) ON UPDATE CASCADE ON DELETE SET NULL,
    ADD COLUMN tags                      TEXT[] NOT NULL DEFAULT '{}',
    ADD COLUMN do_not_call               BOOLEAN NOT NULL DEFAULT false,
    -- Origin: set once, never changed afterwards (enforced by leads_origin_is_immutable below).
    ADD COLUMN original_source           TEXT,
    ADD COLUMN original_source_category  TEXT,
    ADD COLUMN search_keyword            TEXT,
    -- Custom field values by field name (see lead_fields); typed and checked by the API.
    ADD COLUMN custom                    JSONB NOT NULL DEFAULT '{}',
    -- Score as of score_at (decayed by the scheduler's sweep); temperature from the thresholds.
    ADD COLUMN score                     DOUBLE PRECISION NOT NULL DEFAULT 0,
    ADD COLUMN score_at                  TIMESTAMPTZ,
    ADD COLUMN temperature               TEXT NOT NULL DEFAULT 'cold' CHECK (temperature IN ('cold', 'warm', 'hot'));
UPDATE leads SET phones = ARRAY[phone] WHERE phone IS NOT NULL AND phone <> '';
ALTER TABLE leads DROP COLUMN phone;
CREATE UNIQUE INDEX leads_customer_id ON leads (customer_id) WHERE customer_id IS NOT NULL;

-- Origin fields and the creation time are written once: a later value is refused, an unchanged one passes.
CREATE FUNCTION leads_origin_is_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.created_at IS DISTINCT FROM OLD.created_at THEN
        RAISE EXCEPTION 'created_at is set once and cannot be changed' USING ERRCODE = 'check_violation',
            COLUMN = 'created_at';
    END IF;
    IF OLD.original_source IS NOT NULL AND NEW.original_source IS DISTINCT FROM OLD.original_source THEN
        RAISE EXCEPTION 'original_source is set once and cannot be changed' USING ERRCODE = 'check_violation',
            COLUMN = 'original_source';
    END IF;
    IF OLD.original_source_category IS NOT NULL
       AND NEW.original_source_category IS DISTINCT FROM OLD.original_source_category THEN
        RAISE EXCEPTION 'original_source_category is set once and cannot be changed'
            USING ERRCODE = 'check_violation', COLUMN = 'original_source_category';
    END IF;
    IF OLD.search_keyword IS NOT NULL AND NEW.search_keyword IS DISTINCT FROM OLD.search_keyword THEN
        RAISE EXCEPTION 'search_keyword is set once and cannot be changed' USING ERRCODE = 'check_violation',
            COLUMN = 'search_keyword';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER leads_origin_is_immutable BEFORE UPDATE ON leads
    FOR EACH ROW EXECUTE FUNCTION leads_origin_is_immutable();

-- Custom fields: typed, at most 30 per deployment (the 31st is refused by leads_fields_limit).
CREATE TABLE lead_fields (
    name        TEXT PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,39}$'),
    label       TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('text', 'number', 'date', 'boolean', 'choice')),
    choices     TEXT[] NOT NULL DEFAULT '{}',      -- for kind = choice: the allowed values
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (kind <> 'choice' OR cardinality(choices) >= 1)
);
CREATE FUNCTION lead_fields_limit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Serialise concurrent creations so two sessions cannot both add the 30th.
    PERFORM pg_advisory_xact_lock(hashtext('lead_fields_limit'));
    IF (SELECT count(*) FROM lead_fields) >= 30 THEN
        RAISE EXCEPTION 'at most 30 custom fields can be defined' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER lead_fields_limit BEFORE INSERT ON lead_fields
    FOR EACH ROW EXECUTE FUNCTION lead_fields_limit();

-- An inquiry: the same person asking about a product. The first is created with the lead; another product is a
-- new inquiry on the same lead. `subject` matches enrollments.subject (checkout id, order id or product SKU).
CREATE TABLE inquiries (
    id                BIGSERIAL PRIMARY KEY,
    lead_id           BIGINT NOT NULL REFERENCES leads (id) ON DELETE CASCADE,
    subject           TEXT NOT NULL DEFAULT '',
    product_sku       TEXT,
    product_name      TEXT,
    lead_source       TEXT,                          -- the event type or channel that brought it
    status            TEXT NOT NULL DEFAULT 'New'
                       CHECK (status IN ('New', 'Started', 'In progress', 'Follow-up', 'Completed')),
    follow_up_status  TEXT NOT NULL DEFAULT 'none'   -- none | scheduled | in progress | completed | stopped
                       CHECK (follow_up_status IN ('none', 'scheduled', 'in progress', 'completed', 'stopped')),
    email_status      TEXT,                          -- the last follow-up's state: sent, bounced, failed, ...
    processed_order   TEXT,                          -- the order id that completed it
    event_id          BIGINT REFERENCES events (id) ON DELETE SET NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (lead_id, subject)
);
ALTER TABLE enrollments ADD COLUMN inquiry_id BIGINT REFERENCES inquiries (id) ON DELETE SET NULL;

-- Notes; an edit keeps the previous text in lead_note_revisions.
CREATE TABLE lead_notes (
    id          BIGSERIAL PRIMARY KEY,
    lead_id     BIGINT NOT NULL REFERENCES leads (id) ON DELETE CASCADE,
    body        TEXT NOT NULL CHECK (length(body) BETWEEN 1 AND 10000),
    author      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    deleted_at  TIMESTAMPTZ
);
CREATE INDEX lead_notes_by_lead ON lead_notes (lead_id, created_at);
CREATE TABLE lead_note_revisions (
    id          BIGSERIAL PRIMARY KEY,
    note_id     BIGINT NOT NULL REFERENCES lead_notes (id) ON DELETE CASCADE,
    body        TEXT NOT NULL,
    author      TEXT NOT NULL,
    replaced_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Profile and status changes by people and imports (events, emails and scores have their own tables).
CREATE TABLE lead_changes (
    id          BIGSERIAL PRIMARY KEY,
    lead_id     BIGINT NOT NULL REFERENCES leads (id) ON DELETE CASCADE,
    kind        TEXT NOT NULL,                     -- created | updated | status | email | merged | imported | ...
    changes     JSONB NOT NULL DEFAULT '{}',       -- {"field": {"from": .., "to": ..}}
    actor       TEXT NOT NULL,                     -- an API key's name, "import #12", "event"
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX lead_changes_by_lead ON lead_changes (lead_id, created_at);

-- Scoring: a rule gives points for an event type or an attribute condition.
CREATE TABLE scoring_rules (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    event_type  TEXT,                              -- e.g. engagement.page_viewed, order.completed
    condition   JSONB,                             -- an attribute condition, e.g. {"field": "country", "op": "eq", "value": "DE"}
    points      DOUBLE PRECISION NOT NULL CHECK (points BETWEEN -100 AND 100),
    active      BOOLEAN NOT NULL DEFAULT true,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (event_type IS NOT NULL OR condition IS NOT NULL)
);
-- Every change of a lead's score, with its reason.
CREATE TABLE score_ledger (
    id          BIGSERIAL PRIMARY KEY,
    lead_id     BIGINT NOT NULL REFERENCES leads (id) ON DELETE CASCADE,
    rule_id     BIGINT REFERENCES scoring_rules (id) ON DELETE SET NULL,
    event_id    BIGINT REFERENCES events (id) ON DELETE SET NULL,
    points      DOUBLE PRECISION NOT NULL,         -- the change (decay is negative)
    score       DOUBLE PRECISION NOT NULL,         -- the score after it
    reason      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX score_ledger_by_lead ON score_ledger (lead_id, created_at);

-- Static lists (members added and removed by hand or import) and saved filters (segments, evaluated when used).
CREATE TABLE lead_lists (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 100),
    kind        TEXT NOT NULL CHECK (kind IN ('static', 'segment')),
    filter      JSONB,                             -- for segments: the search filter
    description TEXT NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((kind = 'segment') = (filter IS NOT NULL))
);
CREATE TABLE lead_list_members (
    list_id     BIGINT NOT NULL REFERENCES lead_lists (id) ON DELETE CASCADE,
    lead_id     BIGINT NOT NULL REFERENCES leads (id) ON DELETE CASCADE,
    added_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (list_id, lead_id)
);
CREATE INDEX lead_list_members_by_lead ON lead_list_members (lead_id);
-- A campaign may target a list or segment: only its members are enrolled.
ALTER TABLE campaigns ADD COLUMN audience_list BIGINT REFERENCES lead_lists (id) ON DELETE RESTRICT;

-- Imports run as background jobs; each bad row is kept with its line number.
CREATE TABLE import_jobs (
    id            BIGSERIAL PRIMARY KEY,
    format        TEXT NOT NULL CHECK (format IN ('csv', 'xlsx')),
    file_name     TEXT,
    source        TEXT,                            -- the lead source given to new leads
    list_id       BIGINT REFERENCES lead_lists (id) ON DELETE SET NULL,
    mapping       JSONB NOT NULL DEFAULT '{}',     -- column header -> profile field
    state         TEXT NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done', 'failed')),
    rows_total    INTEGER,
    rows_done     INTEGER NOT NULL DEFAULT 0,
    rows_created  INTEGER NOT NULL DEFAULT 0,
    rows_updated  INTEGER NOT NULL DEFAULT 0,
    rows_rejected INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    actor         TEXT NOT NULL,
    content       BYTEA,                           -- the uploaded file, dropped when the job ends
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    started_at    TIMESTAMPTZ,
    finished_at   TIMESTAMPTZ
);
CREATE INDEX import_jobs_waiting ON import_jobs (created_at) WHERE state IN ('queued', 'running');
CREATE TABLE import_errors (
    job_id      BIGINT NOT NULL REFERENCES import_jobs (id) ON DELETE CASCADE,
    line        INTEGER NOT NULL,
    field       TEXT,
    detail      TEXT NOT NULL,
    PRIMARY KEY (job_id, line)
);
