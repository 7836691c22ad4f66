//! studio-api
