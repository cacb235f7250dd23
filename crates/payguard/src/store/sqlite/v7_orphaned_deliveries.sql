-- v7: repairs what a bug left behind. Until this version the SQLite store bound
-- FAIL_PENDING_SQL's `$1` and `$2` by position, which SQLite had indexed in the
-- other order, so a 410 or a delete failed none of the endpoint's pending
-- deliveries: those never claimed stayed `pending` for ever (never sent: the
-- claim skips an endpoint that is not enabled), and the backlog metrics counted
-- them. They become `failed`, as the 410 or the delete meant them to.
UPDATE webhook_deliveries SET status = 'failed', lease_until = 0, lease_owner = NULL
WHERE status = 'pending'
  AND endpoint_id IN (SELECT id FROM webhook_endpoints WHERE status <> 'enabled');
