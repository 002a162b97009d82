-- Inquiries become follow-ups once per statement of enrollments instead of once per enrollment.
--
-- The scheduler inserts a batch of enrollments per statement; the row trigger of 0012 ran a PL/pgSQL function and
-- an UPDATE of inquiries for every one of them. This statement trigger reads the statement's rows from its
-- transition table and updates the inquiries they concern in one UPDATE: the same change, one function call per
-- statement. The UPDATE runs as dynamic SQL so that it is planned for the number of rows at hand each time: a plan
-- cached for the first statement's few rows would scan the whole of inquiries after a mass insert, and one cached
-- for a mass insert would do so for every small batch.
--
-- The deliveries trigger of 0012 (the email status) stays a row trigger: it fires only for the rows that reach a
-- final state, and the sender records those in groups of about ten, where a statement trigger measured no faster.

DROP TRIGGER enrollment_starts_follow_up ON enrollments;
DROP FUNCTION enrollment_starts_follow_up();

-- A follow-up sequence starting makes the inquiry a follow-up (the holdout group gets no email, so its inquiry is
-- only linked).
CREATE FUNCTION enrollments_start_follow_ups() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM started WHERE inquiry_id IS NOT NULL AND NOT holdout AND status = 'active') THEN
        RETURN NULL;
    END IF;
    EXECUTE $q$
        UPDATE inquiries i
           SET follow_up_status = 'scheduled',
               status = CASE WHEN i.status = 'Completed' THEN i.status ELSE 'Follow-up' END,
               updated_at = now()
          FROM (SELECT DISTINCT inquiry_id FROM started
                 WHERE inquiry_id IS NOT NULL AND NOT holdout AND status = 'active') n
         WHERE i.id = n.inquiry_id
    $q$;
    RETURN NULL;
END $$;
CREATE TRIGGER enrollments_start_follow_ups AFTER INSERT ON enrollments
    REFERENCING NEW TABLE AS started
    FOR EACH STATEMENT EXECUTE FUNCTION enrollments_start_follow_ups();
