//! How a column's type converts to JSON, and a cache of those descriptions keyed by type OID.
//!
//! pgoutput names each column's type by OID. [`TypeCache`] maps an OID to a [`PgType`], the
//! description [`text_to_json`](super::text_to_json) follows. It starts filled with the builtin
//! scalar types and their array types; any other type (a domain, an enum, a composite, an array
//! of those, a type from an extension) is looked up once in the catalog with
//! [`TypeCache::resolve`] and kept until [`TypeCache::invalidate`] (pgoutput sends a Type message
//! before using a non-builtin type, so the decoder invalidates it then).
//!
//! The classification follows PostgreSQL's own (`json_categorize_type` in `jsonfuncs.c` /
//! `jsonb.c`): a domain converts as its base type, a true array (`typelem <> 0 AND typlen = -1`)
//! as an array of its element type, a composite (`typtype = 'c'`) as an object of its
//! non-dropped attributes, the handful of builtin types below by their own rule, and every other
//! type as the JSON string of its text output.
//!
//! | OID (array OID)                  | type                         | [`PgType`]               |
//! |----------------------------------|------------------------------|--------------------------|
//! | 16 (1000)                        | `bool`                       | [`PgType::Bool`]         |
//! | 21, 23, 20 (1005, 1007, 1016)    | `int2`, `int4`, `int8`       | [`PgType::Number`]       |
//! | 700, 701 (1021, 1022)            | `float4`, `float8`           | [`PgType::Number`]       |
//! | 1700 (1231)                      | `numeric`                    | [`PgType::Number`]       |
//! | 114 (199)                        | `json`                       | [`PgType::Json`]         |
//! | 3802 (3807)                      | `jsonb`                      | [`PgType::Jsonb`]        |
//! | 1082 (1182)                      | `date`                       | [`PgType::Date`]         |
//! | 1114 (1115)                      | `timestamp`                  | [`PgType::Timestamp`]    |
//! | 1184 (1185)                      | `timestamptz`                | [`PgType::TimestampTz`]  |
//! | 26 (1028)                        | `oid` (`to_jsonb` gives a string!) | [`PgType::Text`]   |
//! | everything else                  | `text`, `uuid`, `interval`, enums, ranges, ... | [`PgType::Text`] |

use std::collections::HashMap;
use std::sync::Arc;

/// How values of one PostgreSQL type convert from their text output to JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgType {
    /// `bool`: `t`/`f` → `true`/`false`.
    Bool,
    /// `int2`, `int4`, `int8`, `float4`, `float8`, `numeric`: a JSON number written as
    /// `numeric` writes it (no exponent, `-0` → `0`); `NaN` and the infinities → strings.
    Number,
    /// `json`: the parsed document, normalised as `jsonb` does (last duplicate key wins,
    /// numbers rewritten as `numeric`).
    Json,
    /// `jsonb`: the parsed document.
    Jsonb,
    /// `date`: a string, as the text output (`2024-01-02`, `infinity`, `0044-03-15 BC`).
    Date,
    /// `timestamp`: an ISO 8601 string (`2024-01-02T03:04:05.5`).
    Timestamp,
    /// `timestamptz`: an ISO 8601 string with the offset as `+hh:mm` (`2024-01-02T03:04:05+00:00`).
    TimestampTz,
    /// Every other type: a JSON string of the text output.
    Text,
    /// An array of `element`, written with the element type's `delimiter` (`,` for all but `box`).
    Array {
        /// The element type.
        element: Arc<PgType>,
        /// The character between elements (`typdelim` of the element type).
        delimiter: u8,
    },
    /// A composite (row) type: its attributes in `attnum` order, dropped ones left out.
    Composite {
        /// Attribute name and type, in order.
        fields: Vec<(String, Arc<PgType>)>,
    },
}

/// Why a type could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum TypeError {
    /// No row in `pg_type` for this OID.
    #[error("type {oid} does not exist")]
    NotFound {
        /// The type looked up.
        oid: u32,
    },
    /// Composites and arrays nest deeper than [`MAX_DEPTH`].
    #[error("type {oid} nests more than {MAX_DEPTH} levels deep")]
    TooDeep {
        /// The type being resolved when the limit was reached.
        oid: u32,
    },
    /// The catalog query failed. Its message includes the database error, which is therefore
    /// not also given as the error's source.
    #[error("the catalog query for type {oid} failed: {error}")]
    Query {
        /// The type looked up.
        oid: u32,
        /// The database error.
        error: sqlx::Error,
    },
}

/// How deep composites and arrays may nest inside each other when resolving.
pub const MAX_DEPTH: usize = 32;

/// The builtin scalar types with their own rule or a well-known OID, with their array types:
/// `(type OID, array type OID, conversion, typdelim)`. Verified against `pg_type` by the tests.
const BUILTINS: &[(u32, u32, Builtin, u8)] = &[
    (16, 1000, Builtin::Bool, b','),          // bool
    (21, 1005, Builtin::Number, b','),        // int2
    (23, 1007, Builtin::Number, b','),        // int4
    (20, 1016, Builtin::Number, b','),        // int8
    (700, 1021, Builtin::Number, b','),       // float4
    (701, 1022, Builtin::Number, b','),       // float8
    (1700, 1231, Builtin::Number, b','),      // numeric
    (114, 199, Builtin::Json, b','),          // json
    (3802, 3807, Builtin::Jsonb, b','),       // jsonb
    (1082, 1182, Builtin::Date, b','),        // date
    (1114, 1115, Builtin::Timestamp, b','),   // timestamp
    (1184, 1185, Builtin::TimestampTz, b','), // timestamptz
    (26, 1028, Builtin::Text, b','),          // oid: not a number for to_jsonb
    (25, 1009, Builtin::Text, b','),          // text
    (1043, 1015, Builtin::Text, b','),        // varchar
    (1042, 1014, Builtin::Text, b','),        // bpchar
    (2950, 2951, Builtin::Text, b','),        // uuid
    (1083, 1183, Builtin::Text, b','),        // time
    (1266, 1270, Builtin::Text, b','),        // timetz
    (1186, 1187, Builtin::Text, b','),        // interval
    (17, 1001, Builtin::Text, b','),          // bytea
    (19, 1003, Builtin::Text, b','),          // name
    (18, 1002, Builtin::Text, b','),          // "char"
    (28, 1011, Builtin::Text, b','),          // xid
    (142, 143, Builtin::Text, b','),          // xml
    (600, 1017, Builtin::Text, b','),         // point
    (603, 1020, Builtin::Text, b';'),         // box: the one builtin with `;`
    (650, 651, Builtin::Text, b','),          // cidr
    (869, 1041, Builtin::Text, b','),         // inet
    (829, 1040, Builtin::Text, b','),         // macaddr
    (790, 791, Builtin::Text, b','),          // money
    (1560, 1561, Builtin::Text, b','),        // bit
    (1562, 1563, Builtin::Text, b','),        // varbit
    (3904, 3905, Builtin::Text, b','),        // int4range
    (3926, 3927, Builtin::Text, b','),        // int8range
    (3906, 3907, Builtin::Text, b','),        // numrange
    (3908, 3909, Builtin::Text, b','),        // tsrange
    (3910, 3911, Builtin::Text, b','),        // tstzrange
    (3912, 3913, Builtin::Text, b','),        // daterange
];

#[derive(Clone, Copy)]
enum Builtin {
    Bool,
    Number,
    Json,
    Jsonb,
    Date,
    Timestamp,
    TimestampTz,
    Text,
}

impl Builtin {
    fn pg_type(self) -> PgType {
        match self {
            Builtin::Bool => PgType::Bool,
            Builtin::Number => PgType::Number,
            Builtin::Json => PgType::Json,
            Builtin::Jsonb => PgType::Jsonb,
            Builtin::Date => PgType::Date,
            Builtin::Timestamp => PgType::Timestamp,
            Builtin::TimestampTz => PgType::TimestampTz,
            Builtin::Text => PgType::Text,
        }
    }
}

/// The conversion of a builtin scalar type with a rule of its own, by OID (the catalog cannot
/// tell: PostgreSQL itself decides by OID). Base types not listed convert as [`PgType::Text`].
fn scalar_by_oid(oid: u32) -> PgType {
    match oid {
        16 => PgType::Bool,
        20 | 21 | 23 | 700 | 701 | 1700 => PgType::Number,
        114 => PgType::Json,
        3802 => PgType::Jsonb,
        1082 => PgType::Date,
        1114 => PgType::Timestamp,
        1184 => PgType::TimestampTz,
        _ => PgType::Text,
    }
}

/// Type descriptions by OID: the builtins from the start, other types once resolved.
#[derive(Clone, Debug)]
pub struct TypeCache {
    types: HashMap<u32, Arc<PgType>>,
}

impl Default for TypeCache {
    fn default() -> Self {
        Self::new()
    }
}

impl TypeCache {
    /// A cache holding the builtin scalar types and their array types.
    pub fn new() -> Self {
        let mut types = HashMap::with_capacity(BUILTINS.len() * 2 + 16);
        for &(oid, array_oid, builtin, delimiter) in BUILTINS {
            let element = Arc::new(builtin.pg_type());
            types.insert(
                array_oid,
                Arc::new(PgType::Array {
                    element: element.clone(),
                    delimiter,
                }),
            );
            types.insert(oid, element);
        }
        TypeCache { types }
    }

    /// A cache holding nothing: every type is looked up in the catalog.
    pub fn empty() -> Self {
        TypeCache {
            types: HashMap::new(),
        }
    }

    /// The OIDs [`TypeCache::new`] starts with, scalar types and array types.
    pub fn builtin_oids() -> impl Iterator<Item = u32> {
        BUILTINS.iter().flat_map(|&(oid, array, _, _)| [oid, array])
    }

    fn is_builtin(oid: u32) -> bool {
        Self::builtin_oids().any(|b| b == oid)
    }

    /// The cached description of a type, if there is one.
    pub fn get(&self, oid: u32) -> Option<Arc<PgType>> {
        self.types.get(&oid).cloned()
    }

    /// Looks an unknown type up in the catalog (domains → their base type; arrays → element type
    /// and its `typdelim`; composites → attribute names and types in `attnum` order, skipping
    /// dropped ones; enums, ranges and everything else → [`PgType::Text`]), caches and returns
    /// it. A cached type is returned at once, without a query.
    pub async fn resolve(
        &mut self,
        pool: &sqlx::PgPool,
        oid: u32,
    ) -> Result<Arc<PgType>, TypeError> {
        if let Some(ty) = self.types.get(&oid) {
            return Ok(ty.clone());
        }
        self.resolve_at(pool, oid, 0).await
    }

    /// Forgets a type (pgoutput sent a Type message for it: it may have changed). When it is a
    /// composite (or an array of one), cached types built on it are forgotten too. Builtin
    /// types are never forgotten.
    pub fn invalidate(&mut self, oid: u32) {
        if Self::is_builtin(oid) {
            return;
        }
        let Some(gone) = self.types.remove(&oid) else {
            return;
        };
        // Only a composite's attributes can change (ALTER TYPE ... ATTRIBUTE); scalar
        // conversions are shared (a domain holds its base type's Arc) and never change. Types
        // built on the old composite (arrays of it, composites and domains holding it) go too.
        if matches!(*gone, PgType::Composite { .. } | PgType::Array { .. }) {
            self.types
                .retain(|oid, ty| Self::is_builtin(*oid) || !contains(ty, &gone));
        }
    }

    async fn resolve_at(
        &mut self,
        pool: &sqlx::PgPool,
        oid: u32,
        depth: usize,
    ) -> Result<Arc<PgType>, TypeError> {
        if let Some(ty) = self.types.get(&oid) {
            return Ok(ty.clone());
        }
        if depth > MAX_DEPTH {
            return Err(TypeError::TooDeep { oid });
        }
        let query_error = |error| TypeError::Query { oid, error };
        let row: Option<(String, i64, i64, i16, i64, Option<String>)> = sqlx::query_as(
            "SELECT t.typtype::text, t.typbasetype::int8, t.typelem::int8, t.typlen, \
                    t.typrelid::int8, e.typdelim::text \
             FROM pg_catalog.pg_type t LEFT JOIN pg_catalog.pg_type e ON e.oid = t.typelem \
             WHERE t.oid = $1::int8::oid",
        )
        .bind(i64::from(oid))
        .fetch_optional(pool)
        .await
        .map_err(query_error)?;
        let Some((typtype, basetype, elem, typlen, relid, delimiter)) = row else {
            return Err(TypeError::NotFound { oid });
        };
        let ty = if typtype == "d" {
            Box::pin(self.resolve_at(pool, to_oid(basetype), depth + 1)).await?
        } else if elem != 0 && typlen == -1 {
            let element = Box::pin(self.resolve_at(pool, to_oid(elem), depth + 1)).await?;
            let delimiter = delimiter.and_then(|d| d.bytes().next()).unwrap_or(b',');
            Arc::new(PgType::Array { element, delimiter })
        } else if typtype == "c" {
            let attributes: Vec<(String, i64)> = sqlx::query_as(
                "SELECT attname::text, atttypid::int8 FROM pg_catalog.pg_attribute \
                 WHERE attrelid = $1::int8::oid AND attnum > 0 AND NOT attisdropped \
                 ORDER BY attnum",
            )
            .bind(relid)
            .fetch_all(pool)
            .await
            .map_err(query_error)?;
            let mut fields = Vec::with_capacity(attributes.len());
            for (name, field_oid) in attributes {
                let ty = Box::pin(self.resolve_at(pool, to_oid(field_oid), depth + 1)).await?;
                fields.push((name, ty));
            }
            Arc::new(PgType::Composite { fields })
        } else if typtype == "b" {
            Arc::new(scalar_by_oid(oid))
        } else {
            // Enums, ranges, multiranges, pseudo-types: the text output.
            Arc::new(PgType::Text)
        };
        self.types.insert(oid, ty.clone());
        Ok(ty)
    }
}

/// OIDs come back as int8 (sqlx has no `oid` → u32 without the right feature set); they fit.
fn to_oid(value: i64) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

/// Whether `ty` is `part` or holds it somewhere inside (by identity).
fn contains(ty: &Arc<PgType>, part: &Arc<PgType>) -> bool {
    if Arc::ptr_eq(ty, part) {
        return true;
    }
    match &**ty {
        PgType::Array { element, .. } => contains(element, part),
        PgType::Composite { fields } => fields.iter().any(|(_, f)| contains(f, part)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_cached_with_their_arrays() {
        let cache = TypeCache::new();
        assert_eq!(cache.get(16).as_deref(), Some(&PgType::Bool));
        assert_eq!(cache.get(1700).as_deref(), Some(&PgType::Number));
        assert_eq!(cache.get(26).as_deref(), Some(&PgType::Text));
        assert_eq!(cache.get(1184).as_deref(), Some(&PgType::TimestampTz));
        assert_eq!(
            cache.get(1115).as_deref(),
            Some(&PgType::Array {
                element: Arc::new(PgType::Timestamp),
                delimiter: b','
            })
        );
        assert_eq!(
            cache.get(1020).as_deref(),
            Some(&PgType::Array {
                element: Arc::new(PgType::Text),
                delimiter: b';'
            })
        );
        assert_eq!(cache.get(999_999), None);
        assert!(TypeCache::empty().get(16).is_none());
    }

    #[tokio::test]
    async fn resolving_can_run_on_any_task() {
        fn assert_send<T: Send>(_: &T) {}
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://localhost/none")
            .unwrap();
        let mut cache = TypeCache::new();
        let future = cache.resolve(&pool, 16);
        assert_send(&future);
    }

    #[test]
    fn builtin_scalars_agree_with_the_oid_rule() {
        for &(oid, _, builtin, _) in BUILTINS {
            assert_eq!(builtin.pg_type(), scalar_by_oid(oid), "oid {oid}");
        }
    }

    #[test]
    fn invalidate_forgets_the_type_but_not_builtins() {
        let mut cache = TypeCache::new();
        let enum_type = Arc::new(PgType::Text);
        cache.types.insert(70_000, enum_type.clone());
        cache.types.insert(
            70_001,
            Arc::new(PgType::Array {
                element: enum_type.clone(),
                delimiter: b',',
            }),
        );
        cache.types.insert(
            70_002,
            Arc::new(PgType::Composite {
                fields: vec![("e".into(), enum_type)],
            }),
        );
        cache.types.insert(70_003, Arc::new(PgType::Text));
        cache.invalidate(70_000);
        assert!(cache.get(70_000).is_none());
        // An enum converts as text whatever its labels: what holds it stays valid.
        assert!(cache.get(70_001).is_some());
        assert!(cache.get(70_002).is_some());
        assert!(cache.get(70_003).is_some());
        cache.invalidate(25);
        assert!(cache.get(25).is_some());
        // The shared builtin Arcs are not caught by an unrelated invalidation.
        cache.invalidate(70_003);
        assert!(cache.get(1009).is_some());
    }

    #[test]
    fn invalidating_a_domain_keeps_its_base_type() {
        let mut cache = TypeCache::new();
        let numeric = cache.get(1700).unwrap();
        cache.types.insert(70_000, numeric.clone()); // a domain over numeric
        cache.types.insert(
            70_001,
            Arc::new(PgType::Composite {
                fields: vec![("n".into(), numeric)],
            }),
        );
        cache.invalidate(70_000);
        assert!(cache.get(70_000).is_none());
        assert!(cache.get(1700).is_some());
        assert!(cache.get(1231).is_some());
        assert!(cache.get(70_001).is_some());
    }

    #[test]
    fn invalidating_a_composite_drops_what_holds_it() {
        let mut cache = TypeCache::new();
        let inner = Arc::new(PgType::Composite {
            fields: vec![("a".into(), cache.get(23).unwrap())],
        });
        cache.types.insert(70_000, inner.clone());
        cache.types.insert(70_001, inner.clone()); // a domain over it
        cache.types.insert(
            70_002,
            Arc::new(PgType::Array {
                element: inner.clone(),
                delimiter: b',',
            }),
        );
        cache.types.insert(
            70_003,
            Arc::new(PgType::Composite {
                fields: vec![("i".into(), inner)],
            }),
        );
        cache.invalidate(70_000);
        for oid in 70_000..=70_003 {
            assert!(cache.get(oid).is_none(), "{oid}");
        }
        assert!(cache.get(23).is_some());
    }
}
