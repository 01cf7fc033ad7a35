-- `streamex backfill OPERATOR` and `streamex rebuild OPERATOR`: a request the running service
-- carries out (and clears, in the backfill's own transaction), and the progress of a running
-- backfill, for `streamex status` and the commands' progress display.

ALTER TABLE streamex.operator_state
    ADD COLUMN backfill_request text CHECK (backfill_request IN ('backfill', 'rebuild')),
    ADD COLUMN backfill_tables text[];

-- Written outside the backfill's transaction (which reads under an older snapshot and would
-- fail to update a row changed since), deleted once it commits.
CREATE TABLE streamex.backfill_progress (
    slot       text        NOT NULL,
    operator   text        NOT NULL,
    rows       bigint      NOT NULL,
    estimate   bigint      NOT NULL,
    started_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (slot, operator)
);
COMMENT ON TABLE streamex.backfill_progress IS
    'How far each running backfill is (a row left behind is a backfill that never ended).';

COMMENT ON COLUMN streamex.operator_state.backfill_request IS
    'backfill: re-send the current rows to the operator; rebuild: run its reset, then the same (streamex backfill / rebuild). Cleared when that backfill commits.';
COMMENT ON COLUMN streamex.operator_state.backfill_tables IS
    'The tables to re-send (streamex backfill --table); NULL for every table the operator subscribes to.';
COMMENT ON COLUMN streamex.backfill_progress.rows IS 'Rows handled so far.';
COMMENT ON COLUMN streamex.backfill_progress.estimate IS
    'Rows the tables of that backfill held, as the statistics estimate.';
