-- `streamex resume OPERATOR --skip-current`: the event an operator halted on, set aside as a
-- dead letter when the operator meets it again, instead of being handled.

ALTER TABLE streamex.operator_state
    ADD COLUMN skip_commit_lsn pg_lsn,
    ADD COLUMN skip_ordinal bigint;

COMMENT ON COLUMN streamex.operator_state.skip_commit_lsn IS
    'Commit LSN of an event to set aside as a dead letter instead of handling it (streamex resume --skip-current).';
COMMENT ON COLUMN streamex.operator_state.skip_ordinal IS
    'Ordinal within its transaction of the event to set aside.';
