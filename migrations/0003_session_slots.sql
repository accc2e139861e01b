-- Schema version 3: session ids are slots (the smallest free id, reused once a session
-- ends) instead of one new id per connection, so `queue.id = (sid << 40) | seq` cannot
-- overflow. No table changes: start-up renumbers sessions whose ids are out of range and,
-- once, marks unsent again any row marked sent behind an unsent one (src/store/load.rs).
SELECT 1;
