-- The blog example from EventStreamex's documentation: two source tables and two tables
-- derived from them by operators (see config/streamex.toml).

CREATE TABLE IF NOT EXISTS posts (
    id bigserial PRIMARY KEY,
    title text NOT NULL,
    body text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS comments (
    id bigserial PRIMARY KEY,
    post_id bigint NOT NULL REFERENCES posts ON DELETE CASCADE,
    body text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS comments_post_id ON comments (post_id);

-- The tallies operator needs a deleted comment's post_id: the whole old row.
ALTER TABLE comments REPLICA IDENTITY FULL;

-- Kept by the declarative operator `post_with_comments_counts`.
CREATE TABLE IF NOT EXISTS post_with_comments_counts (
    id bigint PRIMARY KEY,
    title text NOT NULL,
    body text NOT NULL,
    comments_count integer NOT NULL
);

-- Kept by the Rust operator `post_comment_tallies` (src/operators/tallies.rs).
CREATE TABLE IF NOT EXISTS post_comment_tallies (
    post_id bigint PRIMARY KEY,
    comments integer NOT NULL
);
