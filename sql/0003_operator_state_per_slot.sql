-- Operator checkpoints, operator state and dead letters belong to a replication slot: two
-- configurations with different slots on one database may run operators of the same name,
-- and each must have its own progress and its own halts.
--
-- Rows written before this migration belong to the slot that was in use, which a migration
-- cannot read from the configuration. It looks at the logical pgoutput slots of this
-- database instead:
--
--   exactly one   the rows are that slot's;
--   several       every one of them shared these rows, so each gets a copy (the state it
--                 saw until now; resume or clear them per slot afterwards);
--   none          the slot was dropped: the rows get slot '' and the first streamex to set up
--                 after this migration (`streamex setup` or `run`) adopts them for the slot of
--                 its configuration, and logs what it adopted.

ALTER TABLE streamex.operator_checkpoints ADD COLUMN slot text NOT NULL DEFAULT '';
ALTER TABLE streamex.operator_state ADD COLUMN slot text NOT NULL DEFAULT '';
ALTER TABLE streamex.dead_letters ADD COLUMN slot text NOT NULL DEFAULT '';

ALTER TABLE streamex.operator_checkpoints
    DROP CONSTRAINT operator_checkpoints_pkey,
    ADD PRIMARY KEY (slot, operator);
ALTER TABLE streamex.operator_state
    DROP CONSTRAINT operator_state_pkey,
    ADD PRIMARY KEY (slot, operator);
ALTER TABLE streamex.dead_letters
    DROP CONSTRAINT dead_letters_operator_commit_lsn_ordinal_key,
    ADD UNIQUE (slot, operator, commit_lsn, ordinal);

DO $$
DECLARE
    slots text[];
BEGIN
    SELECT coalesce(array_agg(slot_name::text ORDER BY slot_name), '{}') INTO slots
      FROM pg_catalog.pg_replication_slots
     WHERE database = current_database() AND slot_type = 'logical' AND plugin = 'pgoutput'
       AND NOT temporary;
    IF cardinality(slots) = 1 THEN
        UPDATE streamex.operator_checkpoints SET slot = slots[1];
        UPDATE streamex.operator_state SET slot = slots[1];
        UPDATE streamex.dead_letters SET slot = slots[1];
    ELSIF cardinality(slots) > 1 THEN
        INSERT INTO streamex.operator_checkpoints (slot, operator, commit_lsn, ordinal, updated_at)
        SELECT s.slot, c.operator, c.commit_lsn, c.ordinal, c.updated_at
          FROM streamex.operator_checkpoints AS c, unnest(slots) AS s(slot)
         WHERE c.slot = '';
        DELETE FROM streamex.operator_checkpoints WHERE slot = '';
        INSERT INTO streamex.operator_state
               (slot, operator, state, last_error, error_at, failed_commit_lsn, failed_ordinal,
                attempts, skip_commit_lsn, skip_ordinal)
        SELECT s.slot, o.operator, o.state, o.last_error, o.error_at, o.failed_commit_lsn,
               o.failed_ordinal, o.attempts, o.skip_commit_lsn, o.skip_ordinal
          FROM streamex.operator_state AS o, unnest(slots) AS s(slot)
         WHERE o.slot = '';
        DELETE FROM streamex.operator_state WHERE slot = '';
        INSERT INTO streamex.dead_letters
               (slot, operator, commit_lsn, ordinal, event, error, attempts, created_at)
        SELECT s.slot, d.operator, d.commit_lsn, d.ordinal, d.event, d.error, d.attempts,
               d.created_at
          FROM streamex.dead_letters AS d, unnest(slots) AS s(slot)
         WHERE d.slot = ''
         ORDER BY d.id, s.slot;
        DELETE FROM streamex.dead_letters WHERE slot = '';
    END IF;
END
$$;

-- From now on every write names its slot.
ALTER TABLE streamex.operator_checkpoints ALTER COLUMN slot DROP DEFAULT;
ALTER TABLE streamex.operator_state ALTER COLUMN slot DROP DEFAULT;
ALTER TABLE streamex.dead_letters ALTER COLUMN slot DROP DEFAULT;

COMMENT ON TABLE streamex.operator_checkpoints IS
    'Per slot and operator, the last event the operator has durably processed, as (commit_lsn, ordinal). Never moves backwards.';
COMMENT ON COLUMN streamex.operator_checkpoints.slot IS
    'The replication slot (`slot` in the configuration) the operator reads from; '''' for a row from before 0003 not yet adopted.';
COMMENT ON TABLE streamex.operator_state IS
    'Per slot and operator, whether the operator runs or has halted on an error; a halted operator stays halted across restarts until set running again.';
COMMENT ON COLUMN streamex.operator_state.slot IS
    'The replication slot (`slot` in the configuration) the operator reads from; '''' for a row from before 0003 not yet adopted.';
COMMENT ON TABLE streamex.dead_letters IS
    'Events an operator gave up on, with the last error; one row per (slot, operator, commit_lsn, ordinal).';
COMMENT ON COLUMN streamex.dead_letters.slot IS
    'The replication slot (`slot` in the configuration) the event came from; '''' for a row from before 0003 not yet adopted.';
