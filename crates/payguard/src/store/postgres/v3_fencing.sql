-- v3: fencing tokens. Each order keeps the highest lock token that wrote it; a
-- write with a lower one is refused (a lock holder that paused past its TTL).
-- Epochs come from a sequence, which only grows, even when Redis's counter resets.
ALTER TABLE orders ADD COLUMN fence bigint NOT NULL DEFAULT 0;
CREATE SEQUENCE fence_epochs;
