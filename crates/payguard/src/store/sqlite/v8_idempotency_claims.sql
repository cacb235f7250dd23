-- v8: claim tokens. Each claim of an Idempotency-Key gets a token unique in this
-- database, kept in its in-flight record; freeing the key (the keyed sequence's
-- release, or the op's own transaction) deletes the record only while it holds
-- the freeing request's token, so a late release can no longer free a claim
-- another request took since (its lease lapsed, or its transaction committed
-- and freed the key before its answer was lost). Records claimed before this
-- version keep a NULL token: no request holds it, so they are never freed by
-- token, and lapse with their lease as before.
ALTER TABLE idempotency ADD COLUMN claim INTEGER;
-- The last token handed out; only grows (a deleted claim's token is never
-- handed out again, which a MAX over the records could not promise).
CREATE TABLE idempotency_claims (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL CHECK (last >= 0)
) STRICT;
INSERT INTO idempotency_claims (id, last) VALUES (1, 0);
