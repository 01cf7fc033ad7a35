-- Operators run by `streamex worker` (fed from the JetStream stream, on other machines than
-- `streamex run`): how far each is done with each entity it listens to, so that
-- streamex.processed counts them. `run` stores process_status once its own operators are
-- done; a worker's operators are not among them, so each worker keeps a row per (slot,
-- operator, entity) here, starting at the lowest timestamp, moved forward (never back) as
-- its operator's messages are acknowledged.

CREATE TABLE streamex.worker_progress (
    slot       text        NOT NULL,
    operator   text        NOT NULL,
    entity     text        NOT NULL,
    timestamp  bigint      NOT NULL,
    lsn        pg_lsn      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, operator, entity)
);

COMMENT ON TABLE streamex.worker_progress IS
    'Per operator run by `streamex worker` and entity it listens to, the newest change it is done with. '
    'streamex.processed counts these rows: delete an operator''s rows when no worker runs it any more.';
COMMENT ON COLUMN streamex.worker_progress.timestamp IS
    'Process-status timestamp (µs since the Unix epoch) of the newest change of the entity the operator is done with; the lowest bigint until it is done with one.';
COMMENT ON COLUMN streamex.worker_progress.lsn IS 'Commit LSN of that change.';

-- An entity is processed up to ts when process_status says so and no operator on a worker
-- that listens to it is behind ts.
CREATE OR REPLACE FUNCTION streamex.processed(entity text, ts timestamptz) RETURNS boolean
    LANGUAGE sql STABLE PARALLEL SAFE
    SET search_path = pg_catalog
AS $$
    SELECT COALESCE(
        (SELECT s.timestamp >= streamex.epoch_micros(processed.ts)
           FROM streamex.process_status AS s
          WHERE s.entity = processed.entity),
        false)
       AND NOT EXISTS (
        SELECT 1 FROM streamex.worker_progress AS w
         WHERE w.entity = processed.entity
           AND w.timestamp < streamex.epoch_micros(processed.ts))
$$;

COMMENT ON FUNCTION streamex.processed(text, timestamptz) IS
    'Whether streamex has processed entity up to ts: true when process_status holds the entity with '
    'timestamp >= ts in microseconds since the Unix epoch, and every operator of a worker that listens '
    'to it (streamex.worker_progress) is done that far; false for an unknown entity or a NULL ts. '
    'Typical use: SELECT streamex.processed(''posts'', $updated_at).';

-- Per operator of a worker, the stream sequence through which its consumer is acknowledged:
-- a copy of the consumer's ack floor, written after the acknowledgement (so never ahead of
-- what the operator has durably done), that a worker starts from when the consumer itself is
-- gone (a worker killed while it made the consumer anew, a JetStream server that lost it).
-- stream_created tells a stream made again under the same name, whose sequences start over.
CREATE TABLE streamex.worker_consumers (
    slot           text        NOT NULL,
    operator       text        NOT NULL,
    stream         text        NOT NULL,
    stream_created text        NOT NULL,
    acked_through  bigint      NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (slot, operator)
);

COMMENT ON TABLE streamex.worker_consumers IS
    'Per operator run by `streamex worker`, the JetStream stream sequence its consumer is acknowledged through.';
