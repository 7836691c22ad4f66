//! studio-store
