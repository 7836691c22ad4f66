use std::error::Error as StdError;

type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Errors of the store. The `Display` text is safe to show users: it never contains SQL, and
/// the database or I/O error that caused `Unavailable` or `Other` is only the `source`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: String },
    /// The change contradicts the current state: a duplicate id, or a worker that no longer
    /// owns the job it is updating.
    #[error("{0}")]
    Conflict(String),
    #[error("the database is unavailable, retry later")]
    Unavailable(#[source] BoxError),
    #[error("storage operation failed: {context}")]
    Other {
        context: String,
        #[source]
        source: BoxError,
    },
}

impl StoreError {
    pub fn not_found(entity: &'static str, id: impl Into<String>) -> Self {
        StoreError::NotFound {
            entity,
            id: id.into(),
        }
    }

    pub(crate) fn other(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreError::Other {
            context: context.into(),
            source: source.into(),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::RowNotFound => StoreError::not_found("row", "?"),
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => StoreError::Unavailable(err.into()),
            sqlx::Error::Database(db)
                if is_sqlite_busy(db.as_ref()) || is_postgres_unavailable(db.as_ref()) =>
            {
                StoreError::Unavailable(err.into())
            }
            sqlx::Error::Database(db) => match db.kind() {
                sqlx::error::ErrorKind::UniqueViolation => StoreError::Conflict(format!(
                    "a row with the same key already exists ({})",
                    constraint(db.as_ref())
                )),
                sqlx::error::ErrorKind::ForeignKeyViolation => StoreError::Conflict(format!(
                    "a referenced row does not exist ({})",
                    constraint(db.as_ref())
                )),
                sqlx::error::ErrorKind::CheckViolation => StoreError::Conflict(format!(
                    "the change breaks a job invariant ({})",
                    constraint(db.as_ref())
                )),
                _ => StoreError::other("database error", err),
            },
            _ => StoreError::other("database error", err),
        }
    }
}

/// SQLite's "database is locked": another connection held the write lock past the busy timeout.
fn is_sqlite_busy(db: &dyn sqlx::error::DatabaseError) -> bool {
    const SQLITE_BUSY: i32 = 5;
    const SQLITE_LOCKED: i32 = 6;
    if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_none() {
        return false;
    }
    // Extended result codes keep the primary code in the low 8 bits.
    let primary = db.code().and_then(|code| code.parse::<i32>().ok()).map(|code| code & 0xff);
    matches!(primary, Some(SQLITE_BUSY | SQLITE_LOCKED))
}

/// Postgres errors of a server that restarts, shuts down or has not finished starting: SQLSTATE
/// class 08 (connection exception), 57P01 (admin_shutdown), 57P02 (crash_shutdown) and 57P03
/// (cannot_connect_now). A retry after the restart succeeds.
fn is_postgres_unavailable(db: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() else {
        return false;
    };
    is_unavailable_sqlstate(pg.code())
}

fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
}

fn constraint(db: &dyn sqlx::error::DatabaseError) -> String {
    db.constraint().unwrap_or("unnamed constraint").to_owned()
}

impl From<std::io::Error> for StoreError {
    fn from(err: std::io::Error) -> Self {
        StoreError::other("file system error", err)
    }
}

#[cfg(test)]
mod tests {
    use super::is_unavailable_sqlstate;

    #[test]
    fn restart_sqlstates_are_unavailable() {
        for code in ["08000", "08003", "08006", "08001", "08004", "57P01", "57P02", "57P03"] {
            assert!(is_unavailable_sqlstate(code), "{code}");
        }
    }

    #[test]
    fn other_sqlstates_are_not_unavailable() {
        for code in ["23505", "57014", "40001", "42P01", "XX000"] {
            assert!(!is_unavailable_sqlstate(code), "{code}");
        }
    }
}
