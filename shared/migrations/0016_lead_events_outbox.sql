-- Lead events leadflow publishes on the `<namespace>.lead-events` topic exchange (`lead.hot`, ...): written in the
-- transaction that makes them happen, published with publisher confirms by the scheduler afterwards and deleted
-- then (an outbox), so a crash between the commit and the publish loses nothing.
CREATE TABLE lead_event_outbox (
    id           BIGSERIAL PRIMARY KEY,                           -- publishing order
    lead_id      BIGINT NOT NULL REFERENCES leads (id) ON DELETE CASCADE,  -- an erased lead's events go with it
    routing_key  TEXT NOT NULL,                                   -- the event type, e.g. lead.hot
    message      JSONB NOT NULL,                                  -- the CloudEvent published, as is
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
