//! `text_to_json` against the real thing: for every row of tables holding every kind of type,
//! each column's text output converted by streamex must equal that column's key in
//! `to_jsonb(row)`.
//!
//! The text output is read with the simple query protocol, whose results come in text format:
//! the very bytes the type's output function writes, as pgoutput sends them. (`col::text` is not
//! always the output function: `bool::text` gives `true`, `char(n)::text` drops the padding,
//! `inet::text` adds the mask.)

use crate::common::jsonb_text;

use jsonb_text::jsonb_text;
use sqlx::postgres::{PgPoolOptions, PgRow};
use sqlx::{Connection, PgConnection, PgPool, Row, ValueRef};
use streamex::decode::{PgType, TypeCache, TypeError, text_to_json};
use streamex::testing;

const SESSION: &str = "SET DateStyle = ISO; SET TimeZone = 'UTC'; SET IntervalStyle = postgres; \
                       SET extra_float_digits = 3; SET bytea_output = hex;";

/// A fresh database with `schema` run in it: a pool for the type look-ups and a connection in
/// the session pgoutput would use.
async fn database(schema: &str) -> anyhow::Result<(PgPool, PgConnection)> {
    let url = testing::server().create_database().await?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    sqlx::raw_sql(schema).execute(&pool).await?;
    let mut conn = PgConnection::connect(&url).await?;
    sqlx::raw_sql(SESSION).execute(&mut conn).await?;
    Ok((pool, conn))
}

/// Runs `sql`, which writes numeric infinities, on a server that has them (PostgreSQL 14 and
/// later); on an older one, says that these values are left out.
async fn numeric_infinities(pool: &PgPool, table: &str, sql: &str) -> anyhow::Result<()> {
    let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(pool)
        .await?;
    if version >= 140_000 {
        sqlx::raw_sql(sql).execute(pool).await?;
    } else {
        eprintln!(
            "{table}: numeric 'Infinity' and '-Infinity' are left out: PostgreSQL {version} \
             (server_version_num) has them from 14 on only"
        );
    }
    Ok(())
}

/// The text-format bytes of a value, `None` for NULL.
fn bytes<'r>(value: &sqlx::postgres::PgValueRef<'r>) -> anyhow::Result<Option<&'r [u8]>> {
    if value.is_null() {
        return Ok(None);
    }
    anyhow::ensure!(
        value.format() == sqlx::postgres::PgValueFormat::Text,
        "not in text format"
    );
    value.as_bytes().map(Some).map_err(|e| anyhow::anyhow!(e))
}

/// Compares every column of every row of `table` with `to_jsonb`; returns how many non-null
/// values were compared. All mismatches are reported together.
async fn check_table(
    pool: &PgPool,
    conn: &mut PgConnection,
    cache: &mut TypeCache,
    table: &str,
) -> anyhow::Result<usize> {
    let columns: Vec<(String, i64, String)> = sqlx::query_as(
        "SELECT attname::text, atttypid::int8, format_type(atttypid, atttypmod) \
         FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped \
         ORDER BY attnum",
    )
    .bind(table)
    .fetch_all(pool)
    .await?;
    let mut types = Vec::new();
    for (name, oid, _) in &columns {
        let oid = u32::try_from(*oid)?;
        let ty = cache
            .resolve(pool, oid)
            .await
            .map_err(|e| anyhow::anyhow!("column {table}.{name}: {e}"))?;
        types.push(ty);
    }
    // Simple query protocol: every value in text format, as the output function wrote it.
    let rows: Vec<PgRow> = sqlx::raw_sql(&format!(
        "SELECT to_jsonb(whole_row)::text, whole_row.* FROM {table} whole_row ORDER BY id"
    ))
    .fetch_all(&mut *conn)
    .await?;
    anyhow::ensure!(!rows.is_empty(), "{table} has no rows");
    let mut failures = Vec::new();
    let mut compared = 0;
    for (row_number, row) in rows.iter().enumerate() {
        let whole: serde_json::Value =
            serde_json::from_slice(bytes(&row.try_get_raw(0)?)?.unwrap_or(b"null"))?;
        let id = &whole["id"];
        for (i, ((name, oid, type_name), ty)) in columns.iter().zip(&types).enumerate() {
            let expected = whole
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("to_jsonb of {table} has no key {name}"))?;
            let raw = bytes(&row.try_get_raw(i + 1)?)?;
            let got = match raw {
                None => Ok(serde_json::Value::Null),
                Some(raw) => {
                    compared += 1;
                    text_to_json(ty, raw)
                }
            };
            let text = raw.map_or_else(
                || "NULL".to_owned(),
                |raw| String::from_utf8_lossy(raw).into_owned(),
            );
            match got {
                Ok(got) if &got == expected => {}
                Ok(got) => failures.push(format!(
                    "table {table}, column {name} (type {type_name}, oid {oid}, {ty:?}), row {row_number} (id {id}): \
                     text {text:?} gave {got}, to_jsonb gives {expected}"
                )),
                Err(e) => failures.push(format!(
                    "table {table}, column {name} (type {type_name}, oid {oid}), row {row_number} (id {id}): \
                     text {text:?} failed: {e}; to_jsonb gives {expected}"
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(compared)
}

pub(crate) const SCALARS: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'with space', 'quo"te,');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE DOMAIN label AS text;
CREATE DOMAIN label2 AS label;
CREATE TABLE scalars (
    id serial PRIMARY KEY,
    b bool, i2 int2, i4 int4, i8 int8, o oid, f4 float4, f8 float8, n numeric, n2 numeric(12,2),
    js json, jb jsonb, d date, ts timestamp, ts0 timestamp(0), tstz timestamptz,
    t text, vc varchar(10), c5 char(5), ch "char", nm name, u uuid,
    tm time, ttz timetz, iv interval, by bytea, mo money, ip inet, cid cidr, mac macaddr,
    r int4range, nr numrange, tsr tstzrange, bt bit(4), vb varbit, x xml, pt point, bx box,
    e mood, dint posint, dtext label, dtext2 label2, rc regclass, xi xid, tv tsvector
);
INSERT INTO scalars (b) VALUES (true), (false);
INSERT INTO scalars (i2, i4, i8) VALUES (-32768, -2147483648, -9223372036854775808),
    (32767, 2147483647, 9223372036854775807), (0, 0, 0);
INSERT INTO scalars (o) VALUES (0), (26), (4294967295);
INSERT INTO scalars (f4) VALUES ('NaN'), ('Infinity'), ('-Infinity'), ('-0'), (0.1), (3.4028235e38),
    (1.4e-45), (1.17549435e-38), (123456.7), (1e7), (16777216), (-2.5e-5);
INSERT INTO scalars (f8) VALUES ('NaN'), ('Infinity'), ('-Infinity'), ('-0'), (0), (0.1), (1.5e20),
    (1e-7), (1e15), (1e16), (-1e16), (1.7976931348623157e308), (5e-324), (2.2250738585072014e-308),
    (123456789.123456789), (0.30000000000000004), (-1.25e-5), (1e-4), (1e-5), (9007199254740993);
INSERT INTO scalars (n) VALUES ('NaN'), (1.50), (-0.00), (0), (1e100),
    (0.000000000000000000001), (12345678901234567890.123456789012345678901234567890), (-42),
    (1e-100), (123.4500), ('1.23e5'), ('-5E-3');
INSERT INTO scalars (n2) VALUES (1), (-1.5), (9999999999.99);
INSERT INTO scalars (js) VALUES ('{"a":1,"a":2}'), ('{"b":1e2,"c":-0,"d":[1.0E+2, -0.0, 1.5e-3, 1.50, 0.1e1]}'),
    ('"str"'), ('123'), ('null'), ('true'), ('[]'), ('{}'), ('{"nested":{"deep":[{"x":"y\u00e9"}]}}'),
    ('  {"ws" :  true ,  "k"  : [ 1 , 2 ] }  '), ('"\u263a \ud83d\ude00 \" \\ \/ \b\f\n\r\t"'),
    ('{"a":{"x":1},"a":{"y":2}}'), ('[1e-7, -1E+2, 12345678901234567890123456789, 0.000]');
INSERT INTO scalars (jb) VALUES ('{"a":1,"a":2}'), ('{"b":1e2,"c":-0,"d":[1.0E+2, 1.5e-3, 1.50]}'),
    ('"str"'), ('123'), ('null'), ('[]'), ('{}'), ('{"nested":{"deep":[{"x":"y\u00e9"}]}}'),
    ('"\u263a \" \\ \n"'), ('[1, "two", null, true, {"k": []}]');
INSERT INTO scalars (d) VALUES ('2024-01-02'), ('infinity'), ('-infinity'), ('0044-03-15 BC'),
    ('4713-01-01 BC'), ('5874897-12-31'), ('0001-01-01'), ('2000-02-29');
INSERT INTO scalars (ts, ts0) VALUES ('2024-01-02 03:04:05', '2024-01-02 03:04:05.6'),
    ('2024-01-02 03:04:05.123456', 'infinity'), ('2024-01-02 03:04:05.1', '-infinity'),
    ('infinity', '0044-03-15 12:00:01 BC'), ('-infinity', NULL), ('0044-03-15 12:00:01.5 BC', NULL),
    ('294276-12-31 23:59:59.999999', NULL), ('4713-01-01 00:00:00 BC', NULL), ('1999-12-31 23:59:59.99', NULL);
INSERT INTO scalars (tstz) VALUES ('2024-01-02 03:04:05+00'), ('2024-01-02 03:04:05.123456+00'),
    ('2024-06-01 12:00:00+05:30'), ('2024-06-01 12:00:00.5-08'), ('infinity'), ('-infinity'),
    ('0044-03-15 12:00:01.5+00 BC'), ('1850-01-01 00:00:00 Europe/Amsterdam'),
    ('294276-12-31 23:59:59.999999+00');
INSERT INTO scalars (t, vc, c5, ch, nm) VALUES ('', '', '', 'a', ''),
    ('with "quotes" and \backslash', 'a,b', 'ab', 'Z', 'pg_class'),
    (E'tab\tnewline\ncr\r', '{x}', 'abcde', '"', 'with space'),
    ('emoji 😀 ünïcödé ☺', 'ünï', 'ü', ' ', 'ünï😀'), ('NULL', 'NULL', 'NULL', 'N', 'NULL'),
    ('{1,2}', '(a,b)', ' ', '\', '"q"'), (repeat('long ', 200), NULL, NULL, NULL, NULL);
INSERT INTO scalars (u, tm, ttz, iv) VALUES ('a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '12:00:01.5', '12:00:01.5+05:30', '1 year 2 mons -3 days 04:05:06.7'),
    ('00000000-0000-0000-0000-000000000000', '24:00:00', '00:00:00-12', '-1 day'),
    (NULL, '00:00:00', '23:59:59.999999+00', '0'), (NULL, NULL, NULL, '-178000000 years'),
    (NULL, NULL, NULL, '1 mon 0.000001 sec');
INSERT INTO scalars (by, mo, ip, cid, mac) VALUES ('\x0102', 12.5, '10.0.0.1', '10.0.0.0/8', '08:00:2b:01:02:03'),
    ('\x', -1234567.89, '::1/128', '::/0', NULL), (E'\\xdeadbeef', 0, '192.168.0.0/24', NULL, NULL),
    (convert_to('ünï', 'UTF8'), NULL, NULL, NULL, NULL);
INSERT INTO scalars (r, nr, tsr, bt, vb, x, pt, bx) VALUES ('[1,5)', '(1.5,2.50]', '[2024-01-01,2024-02-01)', B'1010', B'1', '<a>x</a>', '(1,2)', '(1,1),(0,0)'),
    ('empty', 'empty', 'empty', B'0000', B'', 'text &amp; &lt;more&gt; "q"', '(-1.5,1e20)', '(0,0),(0,0)'),
    ('(,)', '(,)', '(,)', NULL, B'101010101010', NULL, NULL, NULL);
INSERT INTO scalars (e, dint, dtext, dtext2) VALUES ('sad', 1, '', 'x'), ('with space', 2147483647, 'a "b"', NULL),
    ('quo"te,', NULL, 'NULL', 'ünï');
INSERT INTO scalars (rc, xi, tv) VALUES ('pg_class', '42', 'a fat cat'), ('scalars', '4294967295', '');
INSERT INTO scalars (b, i4, f8, n, js, jb, d, ts, tstz, t, c5, u, iv, by, e, dint, dtext)
    VALUES (true, 7, 1.5, 2.50, '{"k":[1,{"x":null}]}', '{"k":[1,{"x":null}]}', '2024-01-02',
            '2024-01-02 03:04:05.5', '2024-01-02 03:04:05.5+00', 'full row', 'ab', gen_random_uuid(),
            '2 days', '\xff', 'ok', 5, 'lbl');
INSERT INTO scalars DEFAULT VALUES;
"#;

/// The scalars PostgreSQL has from 14 on.
const SCALARS_14: &str = "INSERT INTO scalars (n) VALUES ('Infinity'), ('-Infinity');";

#[tokio::test]
async fn scalars_match_to_jsonb() -> anyhow::Result<()> {
    let (pool, mut conn) = database(SCALARS).await?;
    numeric_infinities(&pool, "scalars", SCALARS_14).await?;
    let mut cache = TypeCache::new();
    let compared = check_table(&pool, &mut conn, &mut cache, "scalars").await?;
    assert!(compared > 150, "only {compared} values compared");
    Ok(())
}

pub(crate) const ARRAYS: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'with space', 'quo"te,', 'NULL');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE DOMAIN label AS text;
CREATE DOMAIN intlist AS int[];
CREATE TABLE arrays (
    id serial PRIMARY KEY,
    ia int[], ia2 int[][], i8a int8[], ta text[], vca varchar[], ca char(3)[], fa float8[], f4a float4[],
    na numeric[], ba bool[], ja json[], jba jsonb[], da date[], tsa timestamp[], tza timestamptz[],
    ua uuid[], ea mood[], bxa box[], pta point[], byta bytea[], iva interval[], ra int4range[],
    pia posint[], la label[], il intlist, oa oid[], tma time[], nma name[], cha "char"[]
);
INSERT INTO arrays (ia, ia2) VALUES ('{}', '{}'), ('{1,2,3}', '{{1,2},{3,4}}'), ('[0:2]={1,2,3}', '[0:1][-1:0]={{1,2},{3,4}}'),
    ('{NULL,1,NULL}', '{{NULL,NULL},{NULL,NULL}}'), ('{-2147483648}', '{{{1,2}},{{3,4}}}'),
    ('{1}', '{{{{{{1}}}}}}'), (ARRAY[NULL]::int[], '[5:5]={7}');
INSERT INTO arrays (i8a, oa) VALUES ('{9223372036854775807,-9223372036854775808}', '{0,4294967295}');
INSERT INTO arrays (ta) VALUES (ARRAY['a,b', '{c}', 'd"e', 'f\g', '', ' lead', 'trail ', 'NULL', 'null', NULL, '😀', 'x y', 'ünïcödé', E'tab\there', '(p)', ';']),
    ('{}'), ('{{a,b},{c,NULL}}'), (ARRAY[ARRAY['"', '\'], ARRAY['{', '}']]), (ARRAY['']), (ARRAY[' ']);
INSERT INTO arrays (vca, ca, nma, cha) VALUES ('{a,"b c"}', ARRAY['a', 'ab', 'abc', NULL, ''], '{pg_class,"with space"}', ARRAY['a', '"', '\', ',']::"char"[]);
INSERT INTO arrays (fa, f4a, na) VALUES (ARRAY['NaN', 'Infinity', '-Infinity', '-0', '1.5e20', '1e-7', '0.1', '5e-324']::float8[],
    ARRAY['NaN', '-0', '0.1', '3.4028235e38', '1.4e-45']::float4[], ARRAY['NaN', '1.50', '-0.00', '1e100', '0.000000000000000000001']::numeric[]),
    ('{{1.5,2.5},{NULL,3}}', '{}', '{{1.10},{2.20}}');
INSERT INTO arrays (ba, ja, jba) VALUES ('{t,f,NULL}', ARRAY['{"a":1,"a":2}', '[1e2, -0]', '"s"', 'null', NULL, '{"k": "v,w{}"}']::json[],
    ARRAY['{"a":1,"a":2}', '[1e2, -0]', '"s"', 'null', NULL, '{"k": "v,w{}"}']::jsonb[]),
    ('{}', '{}', '{{"[1]","{}"},{"2","3"}}');
INSERT INTO arrays (da, tsa, tza) VALUES (ARRAY['2024-01-02', 'infinity', '-infinity', '0044-03-15 BC', NULL]::date[],
    ARRAY['2024-01-02 03:04:05', '2024-01-02 03:04:05.123456', 'infinity', '0044-03-15 12:00:01.5 BC', NULL]::timestamp[],
    ARRAY['2024-01-02 03:04:05+00', '2024-06-01 12:00:00.5+05:30', '-infinity', '0044-03-15 12:00:01.5+00 BC', NULL]::timestamptz[]),
    ('{{2024-01-01,2024-01-02}}', '{{"2024-01-02 03:04:05"},{"2024-01-03 03:04:05"}}', '{}');
INSERT INTO arrays (ua, ea) VALUES ('{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11,NULL}', ARRAY['sad', 'with space', 'quo"te,', 'NULL', NULL]::mood[]),
    ('{}', '{{sad,ok},{happy,sad}}');
INSERT INTO arrays (bxa, pta, byta) VALUES (ARRAY['(1,1),(0,0)'::box, '(2,2),(1,1)', NULL], ARRAY['(1,2)'::point, NULL], ARRAY['\x0102'::bytea, '\x', NULL]),
    (ARRAY['(3,3),(1,1)'::box], '{}', '{}');
INSERT INTO arrays (iva, ra, tma) VALUES (ARRAY['1 year 2 mons -3 days 04:05:06.7', '-1 day', NULL]::interval[], ARRAY['[1,5)', 'empty', '(,)', NULL]::int4range[], ARRAY['12:00:01.5', '24:00:00']::time[]);
INSERT INTO arrays (pia, la, il) VALUES ('{1,2,NULL}', ARRAY['', 'a,b', NULL, 'NULL']::label[], '{1,NULL,3}'), ('{}', '{}', '{}');
INSERT INTO arrays DEFAULT VALUES;
"#;

/// The arrays PostgreSQL has from 14 on.
const ARRAYS_14: &str = "INSERT INTO arrays (na) VALUES (ARRAY['NaN', 'Infinity', '-Infinity', NULL, '1.50']::numeric[]);";

#[tokio::test]
async fn arrays_match_to_jsonb() -> anyhow::Result<()> {
    let (pool, mut conn) = database(ARRAYS).await?;
    numeric_infinities(&pool, "arrays", ARRAYS_14).await?;
    let mut cache = TypeCache::new();
    let compared = check_table(&pool, &mut conn, &mut cache, "arrays").await?;
    assert!(compared > 60, "only {compared} values compared");
    Ok(())
}

const COMPOSITES: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'with space');
CREATE DOMAIN label AS text;
CREATE TYPE point3 AS (x float8, y numeric, label text);
CREATE TYPE item AS (id int, name text, at timestamptz, tags text[], pos point3, doc jsonb,
                     js json, m mood, l label, moods mood[], d date, ok bool);
CREATE TYPE withdrop AS (a int, gone text, b text);
ALTER TYPE withdrop DROP ATTRIBUTE gone;
ALTER TYPE withdrop ADD ATTRIBUTE c timestamp;
CREATE TABLE rowtype (a int, dropped text, b text[]);
ALTER TABLE rowtype DROP COLUMN dropped;
ALTER TABLE rowtype ADD COLUMN c point3;
CREATE DOMAIN pos_point AS point3 CHECK ((VALUE).x IS NULL OR (VALUE).x >= 0);
CREATE TYPE empty_type AS ();
CREATE TABLE comps (
    id serial PRIMARY KEY,
    it item, its item[], p point3, pa point3[], wd withdrop, rt rowtype, rta rowtype[], pp pos_point,
    et empty_type
);
INSERT INTO comps (it) VALUES
    (ROW(1, 'a b', '2024-01-02 03:04:05+00', ARRAY['x', 'y,z', NULL, '"q"', '\'], ROW(1.5, 2.50, 'lab"el')::point3,
         '{"k": [1, 2], "s": "a\"b"}', '{"a":1,"a":1e2}', 'with space', 'lbl', '{sad,ok}', '0044-03-15 BC', true)::item),
    (ROW(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::item),
    (ROW(2, '', 'infinity', '{}', ROW(NULL, NULL, NULL)::point3, 'null', '[]', 'sad', '', '{}', 'infinity', false)::item),
    (ROW(3, E'tab\there (x) ,', '2024-06-01 12:00:00.5+05:30', ARRAY['{}', '', ' '], ROW('NaN', 'NaN', '')::point3,
         '"s"', '"\u263a"', 'ok', 'NULL', ARRAY[NULL]::mood[], '2024-01-02', NULL)::item),
    (ROW(4, 'emoji 😀 ünï', '-infinity', ARRAY[ARRAY['a', 'b'], ARRAY['c', 'd']], ROW('-0', '-0.00', 'x')::point3,
         '{"nested": {"a": [{"b": "c"}]}}', '{"x": [1.0E+2, -0.0]}', 'happy', 'l"l', '{happy}', '-infinity', true)::item);
INSERT INTO comps (its, pa) VALUES
    (ARRAY[ROW(1, 'one', '2024-01-02 03:04:05+00', ARRAY['a b'], ROW(1, 2, 'c')::point3, '{}', '{}', 'sad', 'l', '{ok}', '2024-01-02', true)::item,
           NULL, ROW(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::item],
     ARRAY[ROW(1, 2, 'a,b')::point3, ROW(NULL, NULL, NULL)::point3, NULL, ROW(0.1, 1e-7, '"')::point3]),
    ('{}', '{}'),
    (NULL, ARRAY[ARRAY[ROW(1, 2, 'x')::point3, ROW(3, 4, 'y')::point3], ARRAY[ROW(5, 6, '{z}')::point3, NULL]]);
INSERT INTO comps (p, wd, rt, pp, et) VALUES
    (ROW(1.5e20, 12345678901234567890.5, 'ünï')::point3, ROW(1, 'b', '2024-01-02 03:04:05.5')::withdrop,
     ROW(1, ARRAY['x', NULL], ROW(1, 2, 'p')::point3)::rowtype, ROW(1, 2, 'dom')::pos_point, ROW()::empty_type),
    (ROW(NULL, NULL, NULL)::point3, ROW(NULL, NULL, NULL)::withdrop, ROW(NULL, NULL, NULL)::rowtype, ROW(NULL, NULL, NULL)::pos_point, NULL),
    (ROW(NULL, NULL, '')::point3, ROW(NULL, '', 'infinity')::withdrop, ROW(NULL, '{}', NULL)::rowtype, NULL, NULL);
INSERT INTO comps (rta) VALUES (ARRAY[ROW(1, ARRAY['a,b'], ROW(1, 2, '(p)')::point3)::rowtype, NULL]);
INSERT INTO comps DEFAULT VALUES;
"#;

/// The composites PostgreSQL has from 14 on.
const COMPOSITES_14: &str = "INSERT INTO comps (it, p) VALUES
    (ROW(6, NULL, NULL, NULL, ROW('NaN', 'Infinity', '')::point3, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::item,
     ROW('-Infinity', '-Infinity', 'inf')::point3);";

#[tokio::test]
async fn composites_match_to_jsonb() -> anyhow::Result<()> {
    let (pool, mut conn) = database(COMPOSITES).await?;
    numeric_infinities(&pool, "comps", COMPOSITES_14).await?;
    let mut cache = TypeCache::new();
    let compared = check_table(&pool, &mut conn, &mut cache, "comps").await?;
    assert!(compared > 15, "only {compared} values compared");
    Ok(())
}

#[tokio::test]
async fn builtin_cache_agrees_with_the_catalog() -> anyhow::Result<()> {
    let (pool, _conn) = database("").await?;
    let builtin = TypeCache::new();
    let mut from_catalog = TypeCache::empty();
    let mut checked = 0;
    for oid in TypeCache::builtin_oids() {
        let expected = from_catalog.resolve(&pool, oid).await?;
        let got = builtin.get(oid).expect("a builtin is cached");
        let name: String = sqlx::query_scalar("SELECT $1::int8::oid::regtype::text")
            .bind(i64::from(oid))
            .fetch_one(&pool)
            .await?;
        assert_eq!(got, expected, "builtin type {oid} ({name})");
        checked += 1;
    }
    assert!(checked >= 46);
    // The names behind the OIDs the brief lists.
    let names: Vec<(i64, String)> = sqlx::query_as(
        "SELECT oid::int8, typname::text FROM pg_type WHERE oid = ANY($1) ORDER BY oid",
    )
    .bind(
        [16i64, 26, 114, 700, 701, 1082, 1114, 1184, 1700, 3802]
            .into_iter()
            .collect::<Vec<_>>(),
    )
    .fetch_all(&pool)
    .await?;
    let names: Vec<&str> = names.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "bool",
            "oid",
            "json",
            "float4",
            "float8",
            "date",
            "timestamp",
            "timestamptz",
            "numeric",
            "jsonb"
        ]
    );
    Ok(())
}

#[tokio::test]
async fn resolver_follows_domains_arrays_and_composites() -> anyhow::Result<()> {
    let (pool, _conn) = database(
        "CREATE DOMAIN d1 AS numeric; CREATE DOMAIN d2 AS d1; \
         CREATE TYPE e AS ENUM ('x'); \
         CREATE TYPE inner_t AS (n d2, dropped int, ts timestamp[]); \
         ALTER TYPE inner_t DROP ATTRIBUTE dropped; \
         CREATE TYPE outer_t AS (i inner_t, es e[], r int4range);",
    )
    .await?;
    let oid = |name: &'static str| {
        let pool = pool.clone();
        async move {
            let oid: i64 = sqlx::query_scalar("SELECT $1::regtype::oid::int8")
                .bind(name)
                .fetch_one(&pool)
                .await?;
            anyhow::Ok(u32::try_from(oid)?)
        }
    };
    let mut cache = TypeCache::new();
    assert_eq!(
        *cache.resolve(&pool, oid("d2").await?).await?,
        PgType::Number
    );
    assert_eq!(*cache.resolve(&pool, oid("e").await?).await?, PgType::Text);
    let outer = cache.resolve(&pool, oid("outer_t").await?).await?;
    let PgType::Composite { fields } = &*outer else {
        panic!("not a composite: {outer:?}")
    };
    let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["i", "es", "r"]);
    let PgType::Composite { fields: inner } = &*fields[0].1 else {
        panic!("not a composite: {:?}", fields[0].1)
    };
    assert_eq!(inner.len(), 2);
    assert_eq!((inner[0].0.as_str(), &*inner[0].1), ("n", &PgType::Number));
    assert_eq!(inner[1].0, "ts");
    assert!(
        matches!(&*inner[1].1, PgType::Array { element, delimiter: b',' } if **element == PgType::Timestamp)
    );
    assert!(matches!(&*fields[1].1, PgType::Array { element, .. } if **element == PgType::Text));
    assert_eq!(*fields[2].1, PgType::Text);

    // Cached now: resolving again needs no query, even with the pool closed.
    let outer_oid = oid("outer_t").await?;
    pool.close().await;
    assert_eq!(cache.resolve(&pool, outer_oid).await?, outer);
    assert!(cache.resolve(&pool, 1185).await.is_ok());
    Ok(())
}

#[tokio::test]
async fn invalidated_types_are_looked_up_again() -> anyhow::Result<()> {
    let (pool, _conn) = database("CREATE TYPE pair AS (a int, b text);").await?;
    let oid: i64 = sqlx::query_scalar("SELECT 'pair'::regtype::oid::int8")
        .fetch_one(&pool)
        .await?;
    let oid = u32::try_from(oid)?;
    let array_oid: i64 = sqlx::query_scalar("SELECT 'pair[]'::regtype::oid::int8")
        .fetch_one(&pool)
        .await?;
    let array_oid = u32::try_from(array_oid)?;
    let mut cache = TypeCache::new();
    cache.resolve(&pool, array_oid).await?;
    let before = cache.resolve(&pool, oid).await?;
    assert!(matches!(&*before, PgType::Composite { fields } if fields.len() == 2));
    sqlx::query("ALTER TYPE pair ADD ATTRIBUTE c jsonb")
        .execute(&pool)
        .await?;
    assert_eq!(cache.resolve(&pool, oid).await?, before, "still cached");
    cache.invalidate(oid);
    assert!(cache.get(oid).is_none());
    let after = cache.resolve(&pool, oid).await?;
    assert!(
        matches!(&*after, PgType::Composite { fields } if fields.len() == 3 && *fields[2].1 == PgType::Jsonb)
    );
    // The array of the composite was forgotten with it and comes back with the new attribute.
    assert!(cache.get(array_oid).is_none());
    let array = cache.resolve(&pool, array_oid).await?;
    assert!(
        matches!(&*array, PgType::Array { element, .. } if **element == *after),
        "{array:?}"
    );
    Ok(())
}

#[tokio::test]
async fn unknown_type_is_an_error_naming_the_oid() -> anyhow::Result<()> {
    let (pool, _conn) = database("").await?;
    let mut cache = TypeCache::new();
    let err = cache.resolve(&pool, 4_000_000_000).await.unwrap_err();
    assert!(
        matches!(err, TypeError::NotFound { oid: 4_000_000_000 }),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "type 4000000000 does not exist");
    Ok(())
}

/// The one documented gap: extension types with a cast to json. `to_jsonb` calls the cast,
/// streamex gives the text output. Skipped where the hstore extension is not installed.
#[tokio::test]
async fn types_with_a_json_cast_stay_text() -> anyhow::Result<()> {
    let (pool, mut conn) = database("").await?;
    if sqlx::raw_sql("CREATE EXTENSION hstore")
        .execute(&pool)
        .await
        .is_err()
    {
        eprintln!("hstore is not installed: skipped");
        return Ok(());
    }
    let oid: i64 = sqlx::query_scalar("SELECT 'hstore'::regtype::oid::int8")
        .fetch_one(&pool)
        .await?;
    let ty = TypeCache::new().resolve(&pool, u32::try_from(oid)?).await?;
    assert_eq!(*ty, PgType::Text);
    let rows: Vec<PgRow> = sqlx::raw_sql("SELECT to_jsonb('a=>1'::hstore)::text, 'a=>1'::hstore")
        .fetch_all(&mut conn)
        .await?;
    let row = &rows[0];
    let jsonb: serde_json::Value =
        serde_json::from_slice(bytes(&row.try_get_raw(0)?)?.unwrap_or_default())?;
    assert_eq!(jsonb, serde_json::json!({"a": "1"}));
    let text = bytes(&row.try_get_raw(1)?)?.unwrap_or_default();
    assert_eq!(text_to_json(&ty, text)?, serde_json::json!("\"a\"=>\"1\""));
    Ok(())
}
/// The text output of `column` in the row of `table` with `id`, and `to_jsonb` of that row's
/// column as text (`None` where `to_jsonb` refuses the value).
async fn text_and_jsonb(
    conn: &mut PgConnection,
    table: &str,
    column: &str,
    id: i32,
) -> anyhow::Result<(Vec<u8>, Option<String>)> {
    let rows: Vec<PgRow> = sqlx::raw_sql(&format!("SELECT {column} FROM {table} WHERE id = {id}"))
        .fetch_all(&mut *conn)
        .await?;
    let text = bytes(&rows[0].try_get_raw(0)?)?
        .unwrap_or_default()
        .to_vec();
    let jsonb = match sqlx::raw_sql(&format!(
        "SELECT (to_jsonb(t) -> '{column}')::text FROM {table} t WHERE id = {id}"
    ))
    .fetch_all(&mut *conn)
    .await
    {
        Ok(rows) => Some(String::from_utf8(
            bytes(&rows[0].try_get_raw(0)?)?
                .unwrap_or_default()
                .to_vec(),
        )?),
        Err(_) => None,
    };
    Ok((text, jsonb))
}

/// Documents the server keeps and serde_json refuses: nested deeper than 128 levels (as
/// `json`, with duplicate keys and numbers to normalise, and as `jsonb`), and `json` with
/// lone surrogate escapes.
#[tokio::test]
async fn deep_documents_and_lone_surrogates_decode() -> anyhow::Result<()> {
    let (pool, mut conn) = database(
        r#"CREATE TABLE docs (id int PRIMARY KEY, js json, jb jsonb);
           CREATE TABLE lone (id int PRIMARY KEY, js json, jsa json[]);
           INSERT INTO lone VALUES (1, '["\ud800", "\udc00x", "\ud83d\ude00"]', ARRAY['"\udbff"']::json[]);"#,
    )
    .await?;
    for (id, depth) in [(1, 129), (2, 200), (3, 255)] {
        let mut doc = String::new();
        for i in 0..depth {
            doc.push_str(if i % 2 == 0 { "[" } else { r#"{"a": 0, "a":"# });
        }
        doc.push_str(r#"{"b": 1e2, "c": -0, "d": "\u00e9\n"}"#);
        for i in (0..depth).rev() {
            doc.push(if i % 2 == 0 { ']' } else { '}' });
        }
        sqlx::query("INSERT INTO docs VALUES ($1, $2::json, $2::jsonb)")
            .bind(id)
            .bind(&doc)
            .execute(&pool)
            .await?;
        for (column, ty) in [("js", PgType::Json), ("jb", PgType::Jsonb)] {
            let (text, want) = text_and_jsonb(&mut conn, "docs", column, id).await?;
            let got = text_to_json(&ty, &text)
                .map_err(|e| anyhow::anyhow!("docs.{column}, {depth} levels: {e}"))?;
            let want = want.expect("to_jsonb takes it");
            assert_eq!(jsonb_text(&got), want, "docs.{column}, {depth} levels");
        }
    }

    // to_jsonb refuses a lone surrogate; to_json shows it as it is; streamex gives U+FFFD.
    let (text, jsonb) = text_and_jsonb(&mut conn, "lone", "js", 1).await?;
    assert_eq!(jsonb, None, "to_jsonb refuses a lone surrogate");
    let to_json: String = sqlx::query_scalar("SELECT to_json(l)::text FROM lone l")
        .fetch_one(&pool)
        .await?;
    assert!(
        to_json.contains(r#""js":["\ud800", "\udc00x", "\ud83d\ude00"]"#),
        "{to_json}"
    );
    assert_eq!(
        text_to_json(&PgType::Json, &text)?,
        serde_json::json!(["\u{FFFD}", "\u{FFFD}x", "😀"])
    );
    let (text, _) = text_and_jsonb(&mut conn, "lone", "jsa", 1).await?;
    let array = PgType::Array {
        element: std::sync::Arc::new(PgType::Json),
        delimiter: b',',
    };
    assert_eq!(
        text_to_json(&array, &text)?,
        serde_json::json!(["\u{FFFD}"])
    );
    Ok(())
}
