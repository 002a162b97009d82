-- Imports and exports: what an import job reports besides its counts, and the lease that lets another process
-- resume a job whose worker died.
ALTER TABLE import_jobs
    -- File columns that matched no profile field (automatically or by the mapping) and were not imported.
    ADD COLUMN unmapped_columns TEXT[] NOT NULL DEFAULT '{}',
    -- A running job belongs to its worker until then; each committed batch extends it. A job still `running`
    -- past its lease was left by a stopped process and is claimed again, resuming after `rows_done`.
    ADD COLUMN lease_until      TIMESTAMPTZ;
