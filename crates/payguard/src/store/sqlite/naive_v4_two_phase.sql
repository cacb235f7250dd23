-- naive v4: the two-phase columns of the guarded schema's v5, without its rules
-- (the naive store's holds are the incident's check-then-act, see naive.rs).
ALTER TABLE accounts ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
ALTER TABLE orders ADD COLUMN captured INTEGER;
ALTER TABLE orders ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
ALTER TABLE orders ADD COLUMN hold_expires_at INTEGER;
