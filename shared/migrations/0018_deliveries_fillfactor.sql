-- Room on each page of deliveries for an update in place.
--
-- The sender's start mark changes only `smtp_started_at`, which no index covers, so PostgreSQL can write the new
-- row version on the same page without a new entry in any of the table's indexes (a heap-only update), provided
-- the page has room for it. Pages filled to 80% by inserts keep that room. Rows already written are not moved;
-- the setting applies to pages filled from now on.
ALTER TABLE deliveries SET (fillfactor = 80);
