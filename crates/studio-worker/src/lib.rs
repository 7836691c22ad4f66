//! studio-worker
