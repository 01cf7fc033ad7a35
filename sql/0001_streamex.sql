-- streamex: process status, operator checkpoints and state, dead letters.
--
-- Applied by streamex::status::migrate(), which runs it with search_path = streamex so that
-- sqlx's bookkeeping table (_sqlx_migrations) lives in this schema, not in public. Every name
-- below is schema-qualified, so the file can also be applied by hand with psql.

CREATE SCHEMA IF NOT EXISTS streamex;

COMMENT ON SCHEMA streamex IS
    'streamex change-data-capture service: process status, operator checkpoints, operator state and dead letters.';

-- µs since the Unix epoch of a timestamptz, exactly. extract(epoch ...) alone is a double
-- precision before PostgreSQL 14 and may be off by one µs; whole seconds and the µs within
-- the second are exact on every version.
CREATE FUNCTION streamex.epoch_micros(ts timestamptz) RETURNS bigint
    LANGUAGE sql STABLE STRICT PARALLEL SAFE
    SET search_path = pg_catalog
AS $$
    SELECT CASE
        WHEN ts = 'infinity'::timestamptz THEN '9223372036854775807'::bigint
        WHEN ts = '-infinity'::timestamptz THEN '-9223372036854775808'::bigint
        ELSE extract(epoch FROM date_trunc('second', ts))::bigint * 1000000
             + extract(microseconds FROM ts)::bigint % 1000000
    END
$$;

COMMENT ON FUNCTION streamex.epoch_micros(timestamptz) IS
    'Microseconds since the Unix epoch of a timestamptz, computed exactly (infinity maps to the bigint bounds).';

CREATE TABLE streamex.process_status (
    entity     text        PRIMARY KEY,
    timestamp  bigint      NOT NULL,
    lsn        pg_lsn      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE streamex.process_status IS
    'Per entity (table name), the latest position streamex has processed. Never moves backwards.';
COMMENT ON COLUMN streamex.process_status.entity IS 'The entity: the table name the events came from.';
COMMENT ON COLUMN streamex.process_status.timestamp IS
    'Commit timestamp of the latest processed change, in microseconds since the Unix epoch.';
COMMENT ON COLUMN streamex.process_status.lsn IS 'WAL position of the latest processed change.';
COMMENT ON COLUMN streamex.process_status.updated_at IS 'When this row last moved forward.';

CREATE FUNCTION streamex.processed(entity text, ts timestamptz) RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    SET search_path = pg_catalog
AS $$
    SELECT COALESCE(
        (SELECT s.timestamp >= streamex.epoch_micros(processed.ts)
           FROM streamex.process_status AS s
          WHERE s.entity = processed.entity),
        false)
$$;

COMMENT ON FUNCTION streamex.processed(text, timestamptz) IS
    'Whether streamex has processed entity up to ts: true when process_status holds the entity with '
    'timestamp >= ts in microseconds since the Unix epoch; false for an unknown entity or a NULL ts. '
    'Typical use: SELECT streamex.processed(''posts'', $updated_at).';

CREATE TABLE streamex.operator_checkpoints (
    operator   text        PRIMARY KEY,
    commit_lsn pg_lsn      NOT NULL,
    ordinal    bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE streamex.operator_checkpoints IS
    'Per operator, the last event it has durably processed, as (commit_lsn, ordinal). Never moves backwards.';
COMMENT ON COLUMN streamex.operator_checkpoints.commit_lsn IS 'Commit LSN of the transaction holding the event.';
COMMENT ON COLUMN streamex.operator_checkpoints.ordinal IS 'Position of the event within its transaction.';

CREATE TABLE streamex.operator_state (
    operator          text   PRIMARY KEY,
    state             text   NOT NULL CHECK (state IN ('running', 'halted')),
    last_error        text,
    error_at          timestamptz,
    failed_commit_lsn pg_lsn,
    failed_ordinal    bigint,
    attempts          int
);

COMMENT ON TABLE streamex.operator_state IS
    'Per operator, whether it runs or has halted on an error; a halted operator stays halted across restarts until set running again.';
COMMENT ON COLUMN streamex.operator_state.last_error IS 'The error that halted the operator.';
COMMENT ON COLUMN streamex.operator_state.failed_commit_lsn IS 'Commit LSN of the event that failed.';
COMMENT ON COLUMN streamex.operator_state.failed_ordinal IS 'Ordinal within its transaction of the event that failed.';
COMMENT ON COLUMN streamex.operator_state.attempts IS 'How many times the failed event was tried.';

CREATE TABLE streamex.dead_letters (
    id         bigserial   PRIMARY KEY,
    operator   text        NOT NULL,
    commit_lsn pg_lsn      NOT NULL,
    ordinal    bigint      NOT NULL,
    event      jsonb       NOT NULL,
    error      text        NOT NULL,
    attempts   int         NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (operator, commit_lsn, ordinal)
);

COMMENT ON TABLE streamex.dead_letters IS
    'Events an operator gave up on, with the last error; one row per (operator, commit_lsn, ordinal).';
COMMENT ON COLUMN streamex.dead_letters.event IS 'The event, in its JSON form.';
COMMENT ON COLUMN streamex.dead_letters.attempts IS 'How many times the event was tried before it was set aside.';
