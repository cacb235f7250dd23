-- v6: claim tokens (SQLite's v8). Each claim of an Idempotency-Key takes a token
-- from a sequence, unique across every instance sharing this database, kept in
-- its in-flight record; freeing the key (the keyed sequence's release, or the
-- op's own transaction) deletes the record only while it holds the freeing
-- request's token, so a late release can no longer free a claim another request
-- took since (its lease lapsed, or its transaction committed and freed the key
-- before its answer was lost). Records claimed before this version keep a NULL
-- token: no request holds it, so they are never freed by token, and lapse with
-- their lease as before.
ALTER TABLE idempotency ADD COLUMN claim bigint;
CREATE SEQUENCE idempotency_claims;
