-- Per-campaign reads (A/B decisions every tick, results, deactivation) without scanning every enrollment.
CREATE INDEX enrollments_by_campaign ON enrollments (campaign_id, variant);
