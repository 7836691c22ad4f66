//! The `ArtifactStore` contract checked on both backends. Every case of `suite` runs on a local
//! folder and on moto's S3 server, which must be installed (see `moto`).

#[macro_use]
mod suite;

mod local;
mod moto;
mod s3;
