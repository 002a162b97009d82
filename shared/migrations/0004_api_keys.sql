-- API keys of the admin REST API. Only a SHA-256 hash of a key is stored, never the key itself; the prefix (its
-- first 8 characters) identifies a key in listings and when revoking it.

CREATE TABLE api_keys (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    prefix        TEXT NOT NULL UNIQUE,
    key_hash      TEXT NOT NULL UNIQUE,           -- lower-case hex SHA-256 of the full key
    -- read: GET requests; write: also campaign and template changes; admin: also settings
    scopes        TEXT[] NOT NULL CHECK (cardinality(scopes) >= 1
                                         AND scopes <@ ARRAY['read', 'write', 'admin']::TEXT[]),
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at  TIMESTAMPTZ,
    revoked_at    TIMESTAMPTZ
);
