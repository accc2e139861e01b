-- Schema version 3 (file 0004, renumbered when merged after 0003): who owns each session,
-- `user:<name>` (password-file user or client-certificate name) or `anonymous`. A session
-- belongs to the identity that created it; another identity may neither resume nor end it.
-- NULL: written before this column existed; the first identity to resume it claims it.
ALTER TABLE session ADD COLUMN owner TEXT;
