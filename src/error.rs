//! What every stage shares about errors: how a chain of causes reads as one line.

use std::error::Error;
use std::fmt;

/// An error and its causes as one line, `outer: cause: root cause`, each part once.
///
/// Many errors repeat their cause in their own text (sqlx's "error returned from database:
/// X" has the server's "X" as its source), so `{:#}` of an `anyhow::Error` would print "X: X".
/// A cause whose text the line already ends with is left out.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !text.is_empty() && !line.ends_with(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = c.source();
        }
        f.write_str(&line)
    }
}

/// [`Chain`] of an `anyhow::Error`.
pub fn chain(error: &anyhow::Error) -> String {
    Chain(error.as_ref()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Text(&'static str, Option<Box<Text>>);

    impl fmt::Display for Text {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Error for Text {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.1.as_deref().map(|e| e as &(dyn Error + 'static))
        }
    }

    #[test]
    fn each_part_of_a_chain_is_said_once() {
        let root = Text("role \"nouser\" does not exist", None);
        let db = Text(
            "error returned from database: role \"nouser\" does not exist",
            Some(Box::new(root)),
        );
        let error = anyhow::Error::new(db).context("connecting to postgres://x/db");
        assert_eq!(
            chain(&error),
            "connecting to postgres://x/db: error returned from database: role \"nouser\" does not exist"
        );
        let plain = anyhow::anyhow!("io").context("reading");
        assert_eq!(chain(&plain), "reading: io");
    }
}
