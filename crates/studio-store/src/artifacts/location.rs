//! The location of artifacts, a local folder or an S3-compatible bucket, parsed from an artifacts
//! URL and the S3 options that the URL does not carry.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore};

use super::{is_valid_key, storage_error};
use crate::StoreError;

/// The name of the artifact folder inside the data folder, the default location.
pub const ARTIFACTS_DIR_NAME: &str = "artifacts";

/// The region used when an `s3://` location names none. S3-compatible servers that ignore
/// regions accept any value.
pub const DEFAULT_S3_REGION: &str = "us-east-1";

/// The maximum time one S3 request may take, from connecting until its body is sent or read.
/// A download's body streams at the pace of the API client that receives it, so this is far
/// above object_store's 30-second default. A timed-out read resumes where it stopped.
const S3_REQUEST_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The storage behind an [`ArtifactStore`](super::ArtifactStore).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArtifactLocation {
    /// A local folder, created when missing.
    Local(PathBuf),
    /// A bucket of Amazon S3 or of an S3-compatible server.
    S3(S3Location),
}

/// A bucket and key prefix with the endpoint, region and credentials that reach them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Keys of artifacts are stored as `PREFIX/KEY`; empty for the root of the bucket. It has no
    /// leading or trailing `/`.
    pub prefix: String,
    /// The server's base URL, such as `http://127.0.0.1:9000`; `None` for Amazon S3 itself.
    /// Plain HTTP is used only when this URL starts with `http://`.
    pub endpoint: Option<String>,
    pub region: String,
    pub credentials: S3Credentials,
}

/// Static S3 credentials. `Debug` shows the access key id and hides the secret and the token.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"****")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "****"),
            )
            .finish()
    }
}

/// The settings of an `s3://` location that its URL does not carry, each named in errors by
/// the option that sets it.
#[derive(Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |value: &Option<String>| value.as_ref().map(|_| "****");
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &hidden(&self.secret_access_key))
            .field("session_token", &hidden(&self.session_token))
            .finish()
    }
}

/// An artifacts URL or S3 option that cannot be used. The message names the value and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidArtifactLocation(String);

impl ArtifactLocation {
    /// Returns the default location, the folder `artifacts` in the data folder.
    pub fn in_data_dir(data_dir: &Path) -> ArtifactLocation {
        ArtifactLocation::Local(data_dir.join(ARTIFACTS_DIR_NAME))
    }

    /// Returns the location of `url`, or the default folder in `data_dir` without one.
    pub fn resolve(
        url: Option<&str>,
        data_dir: &Path,
        options: S3Options,
    ) -> Result<ArtifactLocation, InvalidArtifactLocation> {
        match url {
            Some(url) => Self::parse(url, options),
            None => {
                let location = Self::in_data_dir(data_dir);
                reject_s3_options(&options, &location)?;
                Ok(location)
            }
        }
    }

    /// Parses `s3://BUCKET/PREFIX` (the prefix is optional) or `file://PATH`. The S3 options
    /// apply only to an `s3://` URL, which also needs both credentials.
    pub fn parse(
        url: &str,
        options: S3Options,
    ) -> Result<ArtifactLocation, InvalidArtifactLocation> {
        if let Some(rest) = url.strip_prefix("s3://") {
            return parse_s3(url, rest, options).map(ArtifactLocation::S3);
        }
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(invalid(format!(
                    "the artifacts URL {url:?} names no folder: use file:///ABSOLUTE/PATH or file://RELATIVE/PATH"
                )));
            }
            let location = ArtifactLocation::Local(PathBuf::from(path));
            reject_s3_options(&options, &location)?;
            return Ok(location);
        }
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        Err(invalid(format!(
            "unsupported artifacts URL {url:?} (scheme {scheme:?}): use s3://BUCKET/PREFIX for S3-compatible storage or file://PATH for a local folder"
        )))
    }

    /// Builds the object store of this location; a local folder is created when missing. It
    /// sends no request: [`ArtifactStore::check_access`](super::ArtifactStore::check_access)
    /// does.
    pub(crate) fn build(&self) -> Result<Arc<dyn ObjectStore>, StoreError> {
        match self {
            // NOTE: object_store renames a local file into place without syncing it to disk, so
            // a power loss soon after a write may leave a truncated artifact.
            ArtifactLocation::Local(root) => {
                std::fs::create_dir_all(root).map_err(|err| {
                    StoreError::other(
                        format!("failed to create the artifact folder {}", root.display()),
                        err,
                    )
                })?;
                let local = LocalFileSystem::new_with_prefix(root)
                    .map_err(|err| {
                        storage_error(
                            format!("failed to open the artifact folder {}", root.display()),
                            err,
                        )
                    })?
                    .with_automatic_cleanup(true);
                Ok(Arc::new(local))
            }
            ArtifactLocation::S3(s3) => {
                let mut client = ClientOptions::new().with_timeout(S3_REQUEST_TIMEOUT);
                let mut builder = AmazonS3Builder::new()
                    .with_bucket_name(&s3.bucket)
                    .with_region(&s3.region)
                    .with_access_key_id(&s3.credentials.access_key_id)
                    .with_secret_access_key(&s3.credentials.secret_access_key);
                if let Some(token) = &s3.credentials.session_token {
                    builder = builder.with_token(token);
                }
                if let Some(endpoint) = &s3.endpoint {
                    client = client.with_allow_http(endpoint.starts_with("http://"));
                    builder = builder.with_endpoint(endpoint);
                }
                let bucket = builder.with_client_options(client).build().map_err(|err| {
                    storage_error(format!("invalid S3 artifact location {self}"), err)
                })?;
                if s3.prefix.is_empty() {
                    Ok(Arc::new(bucket))
                } else {
                    Ok(Arc::new(PrefixStore::new(bucket, s3.prefix.as_str())))
                }
            }
        }
    }
}

/// Shows the location without credentials: `file:///PATH`, or `s3://BUCKET/PREFIX` with its
/// endpoint and region.
impl fmt::Display for ArtifactLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArtifactLocation::Local(root) => write!(f, "file://{}", root.display()),
            ArtifactLocation::S3(s3) => {
                write!(f, "s3://{}", s3.bucket)?;
                if !s3.prefix.is_empty() {
                    write!(f, "/{}", s3.prefix)?;
                }
                let endpoint = s3.endpoint.as_deref().unwrap_or("Amazon S3");
                write!(f, " (endpoint {endpoint}, region {})", s3.region)
            }
        }
    }
}

/// Rejects an S3 endpoint or region for a local folder, which is most likely a typo in the
/// artifacts URL. Credentials are not checked, since the environment may hold them for other
/// programs.
fn reject_s3_options(
    options: &S3Options,
    location: &ArtifactLocation,
) -> Result<(), InvalidArtifactLocation> {
    for (value, option) in [
        (
            &options.endpoint,
            "the S3 endpoint (--s3-endpoint or STUDIO_S3_ENDPOINT)",
        ),
        (
            &options.region,
            "the S3 region (--s3-region or STUDIO_S3_REGION)",
        ),
    ] {
        if value.is_some() {
            return Err(invalid(format!(
                "{option} is set but artifacts go to the local folder {location}: unset it, or \
                 set the artifacts URL (--artifacts-url or STUDIO_ARTIFACTS_URL) to s3://BUCKET/PREFIX"
            )));
        }
    }
    Ok(())
}

fn parse_s3(
    url: &str,
    rest: &str,
    options: S3Options,
) -> Result<S3Location, InvalidArtifactLocation> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    check_bucket(url, bucket)?;
    let prefix = prefix.trim_end_matches('/');
    if !prefix.is_empty() && !is_valid_key(prefix) {
        return Err(invalid(format!(
            "invalid key prefix {prefix:?} in the artifacts URL {url:?}: use '/'-separated names of letters, digits, '-', '_' and '.' that do not start with '.'"
        )));
    }

    let endpoint = match options.endpoint {
        Some(endpoint) => Some(check_endpoint(&endpoint)?),
        None => None,
    };
    let region = match options.region {
        Some(region) if region.trim().is_empty() => {
            return Err(invalid(
                "the S3 region (--s3-region or STUDIO_S3_REGION) is empty: name a region such as us-east-1, or unset it".to_owned(),
            ))
        }
        Some(region) => region,
        None => DEFAULT_S3_REGION.to_owned(),
    };
    let credentials = match (options.access_key_id, options.secret_access_key) {
        (Some(access_key_id), Some(secret_access_key))
            if !access_key_id.is_empty() && !secret_access_key.is_empty() =>
        {
            S3Credentials {
                access_key_id,
                secret_access_key,
                session_token: options.session_token.filter(|token| !token.is_empty()),
            }
        }
        // NOTE: instance profiles, web identity and other credential providers are not
        // supported, so a deployment on AWS passes static keys too.
        _ => {
            return Err(invalid(format!(
                "the artifacts URL {url:?} needs S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or --s3-access-key-id and --s3-secret-access-key)"
            )))
        }
    };

    Ok(S3Location {
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
        endpoint,
        region,
        credentials,
    })
}

/// Accepts S3's bucket naming rules: 3 to 63 lowercase letters, digits, '-' and '.', starting
/// and ending with a letter or digit.
fn check_bucket(url: &str, bucket: &str) -> Result<(), InvalidArtifactLocation> {
    let alphanumeric = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = bucket.as_bytes();
    let valid = (3..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|&b| alphanumeric(b) || b == b'-' || b == b'.')
        && alphanumeric(bytes[0])
        && alphanumeric(bytes[bytes.len() - 1]);
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "invalid bucket name {bucket:?} in the artifacts URL {url:?}: use 3 to 63 lowercase letters, digits, '-' and '.', as in s3://BUCKET/PREFIX"
        )))
    }
}

/// Accepts an `http://` or `https://` URL with a host; drops a trailing `/`.
fn check_endpoint(endpoint: &str) -> Result<String, InvalidArtifactLocation> {
    let host = endpoint
        .strip_prefix("https://")
        .or_else(|| endpoint.strip_prefix("http://"));
    match host {
        Some(host) if !host.is_empty() && !host.starts_with('/') => {
            Ok(endpoint.trim_end_matches('/').to_owned())
        }
        _ => Err(invalid(format!(
            "invalid S3 endpoint {endpoint:?} (--s3-endpoint or STUDIO_S3_ENDPOINT): use a URL such as https://s3.example.com or http://127.0.0.1:9000"
        ))),
    }
}

fn invalid(message: String) -> InvalidArtifactLocation {
    InvalidArtifactLocation(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> S3Options {
        S3Options {
            access_key_id: Some("AKIDEXAMPLE".to_owned()),
            secret_access_key: Some("s3cret-key".to_owned()),
            ..S3Options::default()
        }
    }

    #[test]
    fn s3_url_with_prefix_parses() {
        let options = S3Options {
            endpoint: Some("http://127.0.0.1:9000/".to_owned()),
            region: Some("eu-west-1".to_owned()),
            ..credentials()
        };

        let location = ArtifactLocation::parse("s3://studio-artifacts/team/a/", options).unwrap();

        let ArtifactLocation::S3(s3) = location else {
            panic!("expected an S3 location, got {location:?}");
        };
        assert_eq!(s3.bucket, "studio-artifacts");
        assert_eq!(s3.prefix, "team/a");
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.region, "eu-west-1");
    }

    #[test]
    fn s3_url_without_prefix_uses_default_region() {
        let location = ArtifactLocation::parse("s3://studio", credentials()).unwrap();

        let ArtifactLocation::S3(s3) = location else {
            panic!("expected an S3 location, got {location:?}");
        };
        assert_eq!(s3.prefix, "");
        assert_eq!(s3.region, DEFAULT_S3_REGION);
        assert_eq!(s3.endpoint, None);
    }

    #[test]
    fn s3_url_without_credentials_is_rejected() {
        let error = ArtifactLocation::parse("s3://studio/a", S3Options::default()).unwrap_err();

        assert!(error.to_string().contains("AWS_ACCESS_KEY_ID"), "{error}");
    }

    #[test]
    fn invalid_bucket_is_named() {
        for bucket in ["Upper", "ab", "-dash", "under_score"] {
            let error =
                ArtifactLocation::parse(&format!("s3://{bucket}/p"), credentials()).unwrap_err();

            assert!(
                error.to_string().contains(&format!("{bucket:?}")),
                "{error}"
            );
        }
    }

    #[test]
    fn prefix_with_parent_segment_is_rejected() {
        let error = ArtifactLocation::parse("s3://studio/../x", credentials()).unwrap_err();

        assert!(error.to_string().contains("\"../x\""), "{error}");
    }

    #[test]
    fn endpoint_without_scheme_is_rejected() {
        let options = S3Options {
            endpoint: Some("127.0.0.1:9000".to_owned()),
            ..credentials()
        };

        let error = ArtifactLocation::parse("s3://studio", options).unwrap_err();

        assert!(error.to_string().contains("\"127.0.0.1:9000\""), "{error}");
    }

    #[test]
    fn other_scheme_is_rejected() {
        let error = ArtifactLocation::parse("gs://studio/a", credentials()).unwrap_err();

        assert!(error.to_string().contains("\"gs\""), "{error}");
    }

    #[test]
    fn file_url_is_local_folder() {
        let location =
            ArtifactLocation::parse("file:///srv/artifacts", S3Options::default()).unwrap();

        assert_eq!(
            location,
            ArtifactLocation::Local(PathBuf::from("/srv/artifacts"))
        );
    }

    #[test]
    fn file_url_with_s3_endpoint_is_rejected() {
        let options = S3Options {
            endpoint: Some("http://127.0.0.1:9000".to_owned()),
            ..S3Options::default()
        };

        let error = ArtifactLocation::parse("file:///srv/artifacts", options).unwrap_err();

        assert!(error.to_string().contains("STUDIO_S3_ENDPOINT"), "{error}");
    }

    #[test]
    fn default_location_is_data_folder() {
        let location =
            ArtifactLocation::resolve(None, Path::new("/srv/studio-data"), credentials()).unwrap();

        assert_eq!(
            location,
            ArtifactLocation::Local(PathBuf::from("/srv/studio-data/artifacts"))
        );
    }

    #[test]
    fn default_location_with_s3_region_is_rejected() {
        let options = S3Options {
            region: Some("eu-west-1".to_owned()),
            ..S3Options::default()
        };

        let error =
            ArtifactLocation::resolve(None, Path::new("/srv/studio-data"), options).unwrap_err();

        let message = error.to_string();
        assert!(message.contains("STUDIO_S3_REGION"), "{message}");
        assert!(message.contains("STUDIO_ARTIFACTS_URL"), "{message}");
    }

    #[test]
    fn debug_and_display_hide_secret() {
        let options = S3Options {
            session_token: Some("t0ken".to_owned()),
            ..credentials()
        };
        let location = ArtifactLocation::parse("s3://studio/a", options.clone()).unwrap();

        for text in [
            format!("{location:?}"),
            location.to_string(),
            format!("{options:?}"),
        ] {
            assert!(!text.contains("s3cret-key"), "{text}");
            assert!(!text.contains("t0ken"), "{text}");
        }
        assert_eq!(
            location.to_string(),
            "s3://studio/a (endpoint Amazon S3, region us-east-1)"
        );
    }
}
