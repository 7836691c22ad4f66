//! The validated configuration of one `smart-studio` process, built from the command line and the
//! environment. Every check runs before anything starts, and each error names the bad value.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use reqwest::Url;
use studio_store::{ArtifactLocation, S3Options, StoreSettings};
use tracing_subscriber::EnvFilter;

use crate::cli::{Command, GlobalArgs};

/// Settings shared by every command.
#[derive(Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub models_dir: PathBuf,
    /// `None` only for commands that need no database (`fetch-model`, `train`, `eval`). Without
    /// `--database-url` the others use the SQLite file `DATA_DIR/studio.db`.
    pub database_url: Option<DatabaseUrl>,
    /// `None` only for commands that store no artifacts (`migrate`, `fetch-model`, `train`,
    /// `eval`). Without `--artifacts-url` the others use the folder `DATA_DIR/artifacts`.
    pub artifacts: Option<ArtifactLocation>,
    pub listen_addr: SocketAddr,
    pub log_filter: String,
}

impl Config {
    /// Validates `args` for `command`.
    pub fn from_args(args: &GlobalArgs, command: &Command) -> anyhow::Result<Config> {
        let log_filter = args.log.clone().unwrap_or_else(|| default_log_filter(command).to_owned());
        EnvFilter::try_new(&log_filter).with_context(|| {
            format!("invalid log filter {log_filter:?} (--log or RUST_LOG): use tracing's EnvFilter syntax, such as `info` or `info,studio_worker=debug`")
        })?;

        ensure_dir_or_absent(&args.data_dir, "--data-dir or STUDIO_DATA_DIR")?;
        ensure_dir_or_absent(&args.models_dir, "--models-dir or STUDIO_MODELS_DIR")?;

        let database_url = match &args.database_url {
            Some(raw) => Some(DatabaseUrl::parse(raw)?),
            None if needs_database(command) => Some(DatabaseUrl::sqlite_in(&args.data_dir)),
            None => None,
        };
        let artifacts = if needs_artifacts(command) {
            Some(artifact_location(args)?)
        } else {
            None
        };

        Ok(Config {
            data_dir: args.data_dir.clone(),
            models_dir: args.models_dir.clone(),
            database_url,
            artifacts,
            listen_addr: SocketAddr::new(args.host, args.port),
            log_filter,
        })
    }

    /// Returns the database URL, which `from_args` guarantees for every command that calls this.
    pub fn database_url(&self) -> &DatabaseUrl {
        self.database_url
            .as_ref()
            .expect("from_args rejects a missing database URL for commands that use the database")
    }

    /// Settings for `Services::open`; creates the data folder when it is missing.
    pub fn store_settings(&self) -> anyhow::Result<StoreSettings> {
        std::fs::create_dir_all(&self.data_dir).with_context(|| {
            format!("failed to create the data folder {}", self.data_dir.display())
        })?;

        Ok(StoreSettings {
            database_url: self.database_url().expose().to_owned(),
            artifacts: self.artifacts().clone(),
            models_dir: self.models_dir.clone(),
        })
    }

    /// Returns the artifact location, which `from_args` guarantees for every command that calls
    /// this.
    pub fn artifacts(&self) -> &ArtifactLocation {
        self.artifacts
            .as_ref()
            .expect("from_args sets the artifact location for commands that store artifacts")
    }
}

/// Builds the artifact location from `--artifacts-url` and the S3 options.
fn artifact_location(args: &GlobalArgs) -> anyhow::Result<ArtifactLocation> {
    let options = S3Options {
        endpoint: args.s3_endpoint.clone(),
        region: args.s3_region.clone(),
        access_key_id: args.s3_access_key_id.clone(),
        secret_access_key: args.s3_secret_access_key.as_ref().map(|secret| secret.expose().to_owned()),
        session_token: args.s3_session_token.as_ref().map(|token| token.expose().to_owned()),
    };
    Ok(ArtifactLocation::resolve(args.artifacts_url.as_deref(), &args.data_dir, options)?)
}

/// A database URL, `postgres://…` or `sqlite://PATH`, whose `Debug` and `Display` hide the
/// password, so that it can be logged.
#[derive(Clone)]
pub struct DatabaseUrl {
    raw: String,
    redacted: String,
}

impl DatabaseUrl {
    pub fn parse(raw: &str) -> anyhow::Result<DatabaseUrl> {
        if let Some(path) = studio_store::sqlite_path(raw) {
            path?;
            return Ok(DatabaseUrl {
                raw: raw.to_owned(),
                redacted: raw.to_owned(),
            });
        }

        let redacted = redact(raw);
        let url = Url::parse(raw).with_context(|| {
            format!("invalid database URL {redacted:?}: use postgres://USER:PASSWORD@HOST:PORT/DATABASE or sqlite://PATH")
        })?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            bail!(
                "unsupported database URL scheme {:?} in {redacted:?}: \
                 use postgres://USER:PASSWORD@HOST:PORT/DATABASE or sqlite://PATH",
                url.scheme()
            );
        }

        Ok(DatabaseUrl {
            raw: raw.to_owned(),
            redacted,
        })
    }

    /// Returns the URL of the SQLite file `studio.db` in `data_dir`, used when no URL is given.
    pub fn sqlite_in(data_dir: &Path) -> DatabaseUrl {
        let raw = studio_store::sqlite_url(data_dir);
        DatabaseUrl {
            redacted: raw.clone(),
            raw,
        }
    }

    /// Returns the URL with its password, for the database driver only.
    pub fn expose(&self) -> &str {
        &self.raw
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({:?})", self.redacted)
    }
}

/// Replaces the password of a URL with `****`. A string that does not parse as a URL is hidden
/// whole, since it may still contain a password.
fn redact(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                // `set_password` fails only for URLs that cannot carry a password, and this one has one.
                let _ = url.set_password(Some("****"));
            }
            url.to_string()
        }
        Err(_) => "<unparsable URL hidden>".to_owned(),
    }
}

fn needs_database(command: &Command) -> bool {
    !matches!(command, Command::FetchModel | Command::Train(_) | Command::Eval(_) | Command::Chat(_))
}

fn needs_artifacts(command: &Command) -> bool {
    !matches!(
        command,
        Command::Migrate | Command::FetchModel | Command::Train(_) | Command::Eval(_) | Command::Chat(_)
    )
}

fn default_log_filter(command: &Command) -> &'static str {
    match command {
        Command::Demo(_) => "warn",
        _ => "info",
    }
}

/// Rejects a path that exists but is not a folder; a missing folder is created later.
fn ensure_dir_or_absent(path: &Path, option: &str) -> anyhow::Result<()> {
    if path.exists() && !path.is_dir() {
        bail!("{} ({option}) is not a folder: pass the path of a folder", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_password() {
        let url = DatabaseUrl::parse("postgres://studio:s3cret@db:5432/studio").unwrap();

        assert_eq!(url.to_string(), "postgres://studio:****@db:5432/studio");
        assert!(!format!("{url:?}").contains("s3cret"));
        assert_eq!(url.expose(), "postgres://studio:s3cret@db:5432/studio");
    }

    #[test]
    fn redact_keeps_url_without_password() {
        let url = DatabaseUrl::parse("postgres://postgres@127.0.0.1:5432/test").unwrap();

        assert_eq!(url.to_string(), "postgres://postgres@127.0.0.1:5432/test");
    }

    #[test]
    fn database_url_rejects_other_scheme() {
        let error = DatabaseUrl::parse("mysql://root:pw@db/studio").unwrap_err();

        let message = format!("{error:#}");
        assert!(message.contains("\"mysql\""), "{message}");
        assert!(!message.contains("pw@"), "{message}");
    }

    #[test]
    fn database_url_accepts_sqlite_file() {
        let url = DatabaseUrl::parse("sqlite:///var/lib/studio/studio.db").unwrap();

        assert_eq!(url.expose(), "sqlite:///var/lib/studio/studio.db");
        assert_eq!(url.to_string(), "sqlite:///var/lib/studio/studio.db");
    }

    #[test]
    fn database_url_rejects_sqlite_in_memory() {
        let error = DatabaseUrl::parse("sqlite::memory:").unwrap_err();

        let message = format!("{error:#}");
        assert!(message.contains("sqlite::memory:"), "{message}");
    }

    fn global_args() -> GlobalArgs {
        GlobalArgs {
            data_dir: PathBuf::from("/srv/studio-data"),
            models_dir: PathBuf::from("/srv/models"),
            database_url: None,
            host: "127.0.0.1".parse().unwrap(),
            port: 8000,
            log: None,
            artifacts_url: None,
            s3_endpoint: None,
            s3_region: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_session_token: None,
        }
    }

    fn s3_args() -> GlobalArgs {
        GlobalArgs {
            artifacts_url: Some("s3://studio-artifacts/prod".to_owned()),
            s3_endpoint: Some("http://127.0.0.1:9000".to_owned()),
            s3_access_key_id: Some("AKIDEXAMPLE".to_owned()),
            s3_secret_access_key: Some("s3cret-key".parse().unwrap()),
            ..global_args()
        }
    }

    #[test]
    fn missing_url_defaults_to_sqlite() {
        let config = Config::from_args(&global_args(), &Command::Serve).unwrap();

        assert_eq!(
            config.database_url().expose(),
            "sqlite:///srv/studio-data/studio.db"
        );
    }

    #[test]
    fn artifacts_default_to_data_folder() {
        let config = Config::from_args(&global_args(), &Command::Serve).unwrap();

        assert_eq!(
            config.artifacts(),
            &ArtifactLocation::Local(PathBuf::from("/srv/studio-data/artifacts"))
        );
    }

    #[test]
    fn artifacts_url_selects_s3_bucket() {
        let config = Config::from_args(&s3_args(), &Command::Serve).unwrap();

        let ArtifactLocation::S3(s3) = config.artifacts() else {
            panic!("expected an S3 location, got {:?}", config.artifacts());
        };
        assert_eq!(s3.bucket, "studio-artifacts");
        assert_eq!(s3.prefix, "prod");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.credentials.secret_access_key, "s3cret-key");
    }

    #[test]
    fn s3_secret_is_not_in_debug_output() {
        let args = s3_args();
        let config = Config::from_args(&args, &Command::Serve).unwrap();

        for text in [format!("{args:?}"), format!("{config:?}")] {
            assert!(!text.contains("s3cret-key"), "{text}");
        }
    }

    #[test]
    fn artifacts_url_without_credentials_is_rejected() {
        let args = GlobalArgs {
            s3_access_key_id: None,
            s3_secret_access_key: None,
            ..s3_args()
        };

        let error = Config::from_args(&args, &Command::Serve).unwrap_err();

        let message = format!("{error:#}");
        assert!(message.contains("s3://studio-artifacts/prod"), "{message}");
        assert!(message.contains("AWS_SECRET_ACCESS_KEY"), "{message}");
    }

    #[test]
    fn migrate_ignores_artifacts_url() {
        let args = GlobalArgs {
            artifacts_url: Some("gs://elsewhere".to_owned()),
            ..global_args()
        };

        let config = Config::from_args(&args, &Command::Migrate).unwrap();

        assert!(config.artifacts.is_none());
    }

    #[test]
    fn database_url_rejects_garbage_without_echoing_it() {
        let error = DatabaseUrl::parse("not a url with s3cret").unwrap_err();

        let message = format!("{error:#}");
        assert!(!message.contains("s3cret"), "{message}");
    }
}
