//! The server's version, and what streamex asks of the server because of it.
//!
//! streamex supports PostgreSQL 13 to 18. What it asks of a server depends on the version
//! only through [`ServerVersion`]'s methods, so that every difference is in one place:
//!
//! | from | what | how streamex uses it |
//! | --- | --- | --- |
//! | 13 | `publish_via_partition_root`, `pg_replication_slots.wal_status` | needed: older servers are refused ([`ServerVersion::is_supported`]) |
//! | 14 | pgoutput `messages` (logical decoding messages, `pg_logical_emit_message`) | asked for from 14 on; a 13 server sends none and refuses the option |
//! | 15 | publications of whole schemas (`FOR TABLES IN SCHEMA`, `pg_publication_namespace`) | looked for from 15 on, when a publication is set to the configured tables |
//! | 18 | pgoutput skips a publication missing at a point of the WAL with a WARNING (SQLSTATE 55000) and streams on without its changes, where older versions end the stream with an error | the warning ends the stream as the error does before 18 (see `CopyReader::next`) |
//! | 18 | `publish_generated_columns` (pg_publication.pubgencols) | set to `stored`: stored generated columns are streamed (before 18 they are listed in `unavailable_columns`), and a REPLICA IDENTITY FULL table with one may be updated (one with a virtual generated column, new in 18, still may not) |
//!
//! Options streamex never sends, on any version: `streaming` (large transactions arrive
//! whole, at their commit, which is what the decoder of protocol version 1 reads), `binary`
//! (values arrive as text, which the decoder converts), `two_phase` (a prepared transaction
//! arrives at COMMIT PREPARED as an ordinary one) and `origin` (its default, `any`, streams
//! changes whatever their origin, as streamex wants).

use std::fmt;

/// The oldest major version streamex supports.
pub const OLDEST_SUPPORTED_MAJOR: u32 = 13;

/// A server version as `server_version_num` gives it: 170010 for 17.10, 90624 for 9.6.24.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerVersion(u32);

impl ServerVersion {
    /// The version whose `server_version_num` is `num`.
    pub fn from_num(num: u32) -> ServerVersion {
        ServerVersion(num)
    }

    /// Parses `server_version_num` (`"170010"`). `None` for anything else.
    pub fn parse_num(text: &str) -> Option<ServerVersion> {
        let text = text.trim();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok().map(ServerVersion)
    }

    /// Parses `server_version` as the server reports it at startup: `"17.10"`,
    /// `"15.14 (Debian 15.14-0+deb12u1)"`, `"18beta1"`, `"9.6.24"`. `None` when it does not
    /// start with a version number.
    pub fn parse(text: &str) -> Option<ServerVersion> {
        // The leading digits and dots: "18beta1" -> "18", "15.14 (Debian ...)" -> "15.14".
        let end = text
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(text.len());
        let mut parts = text[..end].split('.');
        let mut number = || -> Option<Option<u32>> {
            match parts.next() {
                None => Some(None),
                Some(part) if part.is_empty() || part.len() > 4 => None,
                Some(part) => part.parse().ok().map(Some),
            }
        };
        let major = number()??;
        let second = number()?.unwrap_or(0);
        if major >= 10 {
            // 10 and later: major.minor.
            major
                .checked_mul(10_000)?
                .checked_add(second)
                .map(ServerVersion)
        } else {
            // Before 10: major.second.minor.
            let minor = number()?.unwrap_or(0);
            Some(ServerVersion(major * 10_000 + second * 100 + minor))
        }
    }

    /// The number `server_version_num` would show.
    pub fn num(self) -> u32 {
        self.0
    }

    /// The major version: 17 for 17.10 (9 for 9.6, whose major was "9.6").
    pub fn major(self) -> u32 {
        self.0 / 10_000
    }

    /// Whether streamex supports this server (13 or later).
    pub fn is_supported(self) -> bool {
        self.major() >= OLDEST_SUPPORTED_MAJOR
    }

    /// Whether pgoutput takes the `messages` option and streams logical decoding messages
    /// (PostgreSQL 14 and later).
    pub fn logical_messages(self) -> bool {
        self.major() >= 14
    }

    /// Whether a publication may publish whole schemas (`FOR TABLES IN SCHEMA`, catalog
    /// `pg_publication_namespace`; PostgreSQL 15 and later).
    pub fn publication_schemas(self) -> bool {
        self.major() >= 15
    }

    /// Whether a logical slot can be synchronized to physical standbys, so that it survives
    /// the promotion of one (`failover`; PostgreSQL 17 and later).
    pub fn failover_slots(self) -> bool {
        self.major() >= 17
    }

    /// Whether a publication may publish stored generated columns
    /// (`publish_generated_columns`; PostgreSQL 18 and later).
    pub fn publishes_generated_columns(self) -> bool {
        self.major() >= 18
    }

    /// The options of `START_REPLICATION ... LOGICAL` for pgoutput on this server besides
    /// `publication_names`, each a name and its value (unquoted). Every option is one this
    /// version knows: a server refuses an option it does not know.
    pub fn pgoutput_options(self) -> Vec<(&'static str, &'static str)> {
        let mut options = vec![("proto_version", "1")];
        if self.logical_messages() {
            options.push(("messages", "true"));
        }
        options
    }
}

impl fmt::Display for ServerVersion {
    /// `17.10`; `9.6.24` before 10.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.major() >= 10 {
            write!(f, "{}.{}", self.major(), self.0 % 10_000)
        } else {
            write!(
                f,
                "{}.{}.{}",
                self.major(),
                self.0 / 100 % 100,
                self.0 % 100
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(version: u32) -> Vec<(&'static str, &'static str)> {
        ServerVersion::from_num(version).pgoutput_options()
    }

    #[test]
    fn messages_are_asked_for_from_14_on() {
        assert_eq!(options(130_000), [("proto_version", "1")]);
        assert_eq!(options(130_023), [("proto_version", "1")]);
        for version in [
            140_000, 140_023, 150_014, 160_014, 170_010, 180_004, 190_000,
        ] {
            assert_eq!(
                options(version),
                [("proto_version", "1"), ("messages", "true")],
                "{version}"
            );
        }
    }

    #[test]
    fn publications_of_schemas_are_looked_for_from_15_on() {
        assert!(!ServerVersion::from_num(130_023).publication_schemas());
        assert!(!ServerVersion::from_num(140_023).publication_schemas());
        assert!(ServerVersion::from_num(150_000).publication_schemas());
        assert!(ServerVersion::from_num(180_004).publication_schemas());
    }

    #[test]
    fn generated_columns_are_published_from_18_on() {
        assert!(!ServerVersion::from_num(170_010).publishes_generated_columns());
        assert!(ServerVersion::from_num(180_000).publishes_generated_columns());
    }

    #[test]
    fn supports_13_and_later() {
        assert!(!ServerVersion::from_num(120_022).is_supported());
        assert!(!ServerVersion::from_num(90_624).is_supported());
        for version in [130_000, 130_023, 140_023, 180_004, 190_000] {
            assert!(ServerVersion::from_num(version).is_supported(), "{version}");
        }
    }

    #[test]
    fn parses_server_version_as_reported_at_startup() {
        let cases = [
            ("17.10", 170_010),
            ("13.23", 130_023),
            ("15.14 (Debian 15.14-0+deb12u1)", 150_014),
            ("18beta1", 180_000),
            ("16rc1", 160_000),
            ("14devel", 140_000),
            ("9.6.24", 90_624),
            ("9.6", 90_600),
        ];
        for (text, num) in cases {
            assert_eq!(
                ServerVersion::parse(text),
                Some(ServerVersion(num)),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_what_is_not_a_version_without_panicking() {
        for text in [
            "",
            " 17.1",
            "beta",
            ".5",
            "17..",
            "99999999999.1",
            "17.99999",
            "4294967295",
        ] {
            assert_eq!(ServerVersion::parse(text), None, "{text:?}");
        }
        for text in ["", "17.10", "-170010", "170010x", "99999999999"] {
            assert_eq!(ServerVersion::parse_num(text), None, "{text:?}");
        }
        assert_eq!(
            ServerVersion::parse_num(" 170010\n"),
            Some(ServerVersion(170_010))
        );
    }

    #[test]
    fn shows_major_and_minor() {
        assert_eq!(ServerVersion(170_010).to_string(), "17.10");
        assert_eq!(ServerVersion(130_000).to_string(), "13.0");
        assert_eq!(ServerVersion(90_624).to_string(), "9.6.24");
        assert_eq!(ServerVersion(170_010).major(), 17);
    }

    #[test]
    fn slots_fail_over_from_17_on() {
        assert!(!ServerVersion::from_num(160_004).failover_slots());
        assert!(ServerVersion::from_num(170_000).failover_slots());
        assert!(ServerVersion::from_num(180_004).failover_slots());
    }
}
