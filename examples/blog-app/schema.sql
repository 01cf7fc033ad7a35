-- The blog application's schema: two source tables and the tables its operators derive
-- from them (see config.toml).

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

-- The stock tallies operator needs a deleted comment's post_id: the whole old row.
ALTER TABLE comments REPLICA IDENTITY FULL;

-- Kept by the application's own operator `post_titles` (src/lib.rs).
CREATE TABLE IF NOT EXISTS post_titles (
    post_id bigint PRIMARY KEY,
    title text NOT NULL
);

-- Kept by streamex's stock operator `post_comment_tallies`.
CREATE TABLE IF NOT EXISTS post_comment_tallies (
    post_id bigint PRIMARY KEY,
    comments integer NOT NULL
);
