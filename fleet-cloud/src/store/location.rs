//! Where the stores are: `--store`'s forms, parsed or refused.

use std::fmt;

/// Where `fleet serve` keeps its state, as `--store` gives it.
///
/// The forms: `memory`; `sqlite:PATH` (or a bare path without `=` or a
/// scheme); `postgres://...` or `postgresql://...`; and libpq's
/// `key=value` form (`host=db port=5432 user=fleet dbname=fleet`). Anything
/// else is refused: a string that looks like neither is a mistake, not a
/// file name.
///
/// ```
/// use fleet_cloud::store::StoreLocation;
/// let pg: StoreLocation = "host=db.example user=fleet dbname=fleet".parse().unwrap();
/// assert!(matches!(pg, StoreLocation::Postgres(_)));
/// let file: StoreLocation = "sqlite:data/fleet.db".parse().unwrap();
/// assert_eq!(file, StoreLocation::Sqlite("data/fleet.db".into()));
/// assert!("mysql://db/fleet".parse::<StoreLocation>().is_err());
/// assert!("host=db nonsense".parse::<StoreLocation>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// In memory: nothing survives the process.
    Memory,
    /// A SQLite database file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL connection string (URI or `key=value`), as given.
    Postgres(String),
}

/// A `--store` value that names no store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLocationError {
    /// What was given (with any password masked).
    pub given: String,
    /// Why it was refused.
    pub reason: String,
}

impl fmt::Display for StoreLocationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "store {:?}: {} (give memory, sqlite:PATH, postgres://... or host=... dbname=...)",
            self.given, self.reason
        )
    }
}

impl std::error::Error for StoreLocationError {}

/// The keys of libpq's `key=value` connection strings that fleet passes on.
const LIBPQ_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "target_session_attrs",
    "channel_binding",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
];

impl std::str::FromStr for StoreLocation {
    type Err = StoreLocationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let refuse = |reason: &str| StoreLocationError {
            given: mask_password(s),
            reason: reason.into(),
        };
        let s = s.trim();
        if s.is_empty() {
            return Err(refuse("empty"));
        }
        if s == "memory" {
            return Ok(Self::Memory);
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(Self::Postgres(s.into()));
        }
        if let Some(path) = s.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(refuse("sqlite: needs a path"));
            }
            return Ok(Self::Sqlite(path.into()));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(refuse(&format!("unknown scheme {scheme:?}")));
        }
        if s.contains('=') {
            // libpq's form: every word a known key with a value (values
            // may be quoted; fleet's own keys have no spaces).
            for word in s.split_whitespace() {
                let Some((key, _)) = word.split_once('=') else {
                    return Err(refuse(&format!("{word:?} is not key=value (libpq's form)")));
                };
                if !LIBPQ_KEYS.contains(&key) {
                    return Err(refuse(&format!("unknown connection key {key:?}")));
                }
            }
            return Ok(Self::Postgres(s.into()));
        }
        Ok(Self::Sqlite(s.into()))
    }
}

impl fmt::Display for StoreLocation {
    /// The location with any password masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("memory"),
            Self::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            Self::Postgres(s) => f.write_str(&mask_password(s)),
        }
    }
}

/// `s` with the password of a PostgreSQL URI or `password=` masked.
fn mask_password(s: &str) -> String {
    if let Some((scheme, rest)) = s.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@')
            && let Some((user, _)) = userinfo.split_once(':')
        {
            return format!("{scheme}://{user}:***@{host}");
        }
        return s.to_string();
    }
    s.split_whitespace()
        .map(|w| {
            if w.starts_with("password=") {
                "password=***".to_string()
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod location_tests {
    use super::*;

    #[test]
    fn store_locations_parse_or_are_refused() {
        let parse = |s: &str| s.parse::<StoreLocation>();
        assert_eq!(parse("memory"), Ok(StoreLocation::Memory));
        assert_eq!(
            parse("fleet-data/fleet.db"),
            Ok(StoreLocation::Sqlite("fleet-data/fleet.db".into()))
        );
        assert_eq!(
            parse("sqlite:///var/lib/fleet.db"),
            Ok(StoreLocation::Sqlite("/var/lib/fleet.db".into()))
        );
        assert!(matches!(
            parse("postgresql://fleet@db/fleet"),
            Ok(StoreLocation::Postgres(_))
        ));
        // The bug: this used to become a SQLite file of that name.
        assert!(matches!(
            parse("host=127.0.0.1 port=5432 user=fleet dbname=postgres"),
            Ok(StoreLocation::Postgres(_))
        ));
        for bad in ["", "sqlite:", "mysql://db/x", "host=db dbname", "hots=db"] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
        let e = parse("redis://u:secret@db").unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        let shown = parse("postgres://fleet:secret@db/fleet")
            .unwrap()
            .to_string();
        assert_eq!(shown, "postgres://fleet:***@db/fleet");
        let shown = parse("host=db password=secret dbname=f")
            .unwrap()
            .to_string();
        assert_eq!(shown, "host=db password=*** dbname=f");
    }
}
