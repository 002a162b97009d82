-- Search: indexes chosen for the lead filters (shared/src/lead_filter.rs), kept few because each one slows ingest.
-- docs/benchmarks.md ("Lead search at a million leads") has the plans and timings they give.

-- Substring search (`q`, `name`, `company`, email fragments) through one trigram index over the text they search;
-- the filter repeats this exact expression (lead_filter::SEARCH_TEXT).
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX leads_search_text_trgm ON leads USING gin (
    lower(coalesce(first_name, '') || ' ' || coalesce(last_name, '') || ' ' || email || ' ' ||
          coalesce(company_name, '') || ' ' || coalesce(city, '')) gin_trgm_ops);

-- Phone numbers compared by their digits, so "+49 (30) 123-4567" finds "+49301234567".
CREATE FUNCTION lead_phone_digits(phones TEXT[]) RETURNS TEXT[] LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT ARRAY(SELECT regexp_replace(p, '\D', '', 'g') FROM unnest(phones) AS p)
$$;
CREATE INDEX leads_phone_digits ON leads USING gin (lead_phone_digits(phones));
CREATE INDEX leads_tags ON leads USING gin (tags);

-- Sort orders with `id` as the tiebreak: keyset pages read the index in order (either direction).
CREATE INDEX leads_by_created ON leads (created_at, id);
CREATE INDEX leads_by_updated ON leads (updated_at, id);
CREATE INDEX leads_by_score ON leads (score, id);
CREATE INDEX leads_by_last_name ON leads (lower(coalesce(last_name, '')), id);
-- (email has its unique index.)

-- The equality filters a team uses daily.
CREATE INDEX leads_by_agent ON leads (agent) WHERE agent IS NOT NULL;
CREATE INDEX leads_by_status ON leads (status);
CREATE INDEX leads_by_source ON leads (source) WHERE source IS NOT NULL;
CREATE INDEX leads_by_city ON leads (lower(city)) WHERE city IS NOT NULL;

-- Inquiries by processed order (the order id a customer quotes).
CREATE INDEX inquiries_by_processed_order ON inquiries (processed_order) WHERE processed_order IS NOT NULL;
