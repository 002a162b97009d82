-- Lead profile behaviour: inquiries from events and follow-ups, statuses kept in step, change history.
--
-- An inquiry is created (or touched) by ingest in the transaction that stores the event (services/ingest/src/
-- store.rs); the triggers below keep its follow-up status, email status and processed order in step with the
-- enrollments, deliveries and conversions of the pipeline. Each does a few primary-key or unique-index lookups, as
-- they run on the hot path.

-- What an event is about, as enrollments key it (leadflow_scheduler::enroll::Subject::key): the checkout, else the
-- order, else the product SKU; '' when none.
CREATE FUNCTION inquiry_subject(data JSONB) RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN coalesce(data ->> 'checkout_id', '') <> '' THEN 'checkout:' || (data ->> 'checkout_id')
        WHEN coalesce(data ->> 'order_id', '') <> '' THEN 'order:' || (data ->> 'order_id')
        WHEN coalesce(data -> 'product' ->> 'sku', '') <> '' THEN 'product:' || (data -> 'product' ->> 'sku')
        ELSE ''
    END
$$;

-- An enrollment is linked to the inquiry about the same subject; a follow-up sequence starting makes the inquiry a
-- follow-up (the holdout group gets no email, so its inquiry is only linked).
CREATE FUNCTION enrollment_links_inquiry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT id INTO NEW.inquiry_id FROM inquiries WHERE lead_id = NEW.lead_id AND subject = NEW.subject;
    RETURN NEW;
END $$;
CREATE TRIGGER enrollment_links_inquiry BEFORE INSERT ON enrollments
    FOR EACH ROW WHEN (NEW.inquiry_id IS NULL) EXECUTE FUNCTION enrollment_links_inquiry();

-- After the insert (a repeat that conflicts changes nothing).
CREATE FUNCTION enrollment_starts_follow_up() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE inquiries
       SET follow_up_status = 'scheduled',
           status = CASE WHEN status = 'Completed' THEN status ELSE 'Follow-up' END,
           updated_at = now()
     WHERE id = NEW.inquiry_id;
    RETURN NEW;
END $$;
CREATE TRIGGER enrollment_starts_follow_up AFTER INSERT ON enrollments
    FOR EACH ROW WHEN (NEW.inquiry_id IS NOT NULL AND NOT NEW.holdout AND NEW.status = 'active')
    EXECUTE FUNCTION enrollment_starts_follow_up();

-- A sequence ending: completed when it ran to the end or the person bought, stopped when it was cancelled.
CREATE FUNCTION enrollment_ends_follow_up() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE inquiries
       SET follow_up_status = CASE
               WHEN NEW.status = 'completed' OR NEW.reason IN ('purchased', 'purchase', 'converted') THEN 'completed'
               ELSE 'stopped' END,
           updated_at = now()
     WHERE id = NEW.inquiry_id;
    RETURN NEW;
END $$;
CREATE TRIGGER enrollment_ends_follow_up AFTER UPDATE OF status ON enrollments
    FOR EACH ROW WHEN (NEW.inquiry_id IS NOT NULL AND NEW.status <> 'active' AND OLD.status = 'active')
    EXECUTE FUNCTION enrollment_ends_follow_up();

-- A follow-up's outcome is the inquiry's email status: sent, bounced, failed, uncertain, or cancelled when none went
-- out.
CREATE FUNCTION delivery_sets_email_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE inquiries i
       SET email_status = CASE
               WHEN NEW.state = 'failed' AND NEW.reason LIKE 'bounced%' THEN 'bounced'
               -- A later step called off says nothing about the email that went out before it.
               WHEN NEW.state = 'cancelled' THEN coalesce(i.email_status, 'cancelled')
               ELSE NEW.state END,
           follow_up_status = CASE
               WHEN NEW.state = 'sent' AND i.follow_up_status = 'scheduled' THEN 'in progress'
               ELSE i.follow_up_status END,
           updated_at = now()
      FROM enrollments e
     WHERE e.id = NEW.enrollment_id AND i.id = e.inquiry_id;
    RETURN NEW;
END $$;
CREATE TRIGGER delivery_sets_email_status AFTER UPDATE OF state, reason ON deliveries
    FOR EACH ROW WHEN (NEW.state IN ('sent', 'failed', 'cancelled', 'uncertain')
                       AND (OLD.state IS DISTINCT FROM NEW.state OR OLD.reason IS DISTINCT FROM NEW.reason))
    EXECUTE FUNCTION delivery_sets_email_status();

-- An order completes the inquiry it was attributed to (through the follow-up) and the inquiry of its own subject.
CREATE FUNCTION conversion_completes_inquiry() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE inquiries
       SET processed_order = NEW.order_id,
           status = 'Completed',
           follow_up_status = CASE WHEN follow_up_status IN ('scheduled', 'in progress') THEN 'completed'
                                   ELSE follow_up_status END,
           updated_at = now()
     WHERE id = (SELECT inquiry_id FROM enrollments WHERE id = NEW.enrollment_id)
        OR (lead_id = NEW.lead_id
            AND subject = (SELECT inquiry_subject(data) FROM events WHERE id = NEW.event_id));
    RETURN NEW;
END $$;
CREATE TRIGGER conversion_completes_inquiry AFTER INSERT ON conversions
    FOR EACH ROW WHEN (NEW.order_id IS NOT NULL)
    EXECUTE FUNCTION conversion_completes_inquiry();

-- Reading the inquiries of an enrollment's or a lead's timeline.
CREATE INDEX enrollments_by_inquiry ON enrollments (inquiry_id) WHERE inquiry_id IS NOT NULL;
CREATE INDEX enrollments_by_lead ON enrollments (lead_id, created_at);
CREATE INDEX conversions_by_lead ON conversions (lead_id);
-- Notes' revisions, by note.
CREATE INDEX lead_note_revisions_by_note ON lead_note_revisions (note_id, replaced_at);
-- A lead's timeline reads resubscriptions of its address.
CREATE INDEX suppression_log_by_hash ON suppression_log (email_hash, created_at);
