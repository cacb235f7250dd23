-- v3: fencing tokens. Each order keeps the highest lock token that wrote it, and
-- a write carrying a lower one is refused (a lock holder that paused past its TTL).
-- Epochs come from this table's AUTOINCREMENT, which only grows, even when Redis's
-- counter is reset.
ALTER TABLE orders ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;
CREATE TABLE fence_epochs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at INTEGER NOT NULL
) STRICT;
