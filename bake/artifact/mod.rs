//! Artifacts: the OCI image a build produces (config and manifest from `oci-spec` types,
//! serialized canonically) and the ways it leaves the store (an OCI layout directory, a
//! docker-archive tarball).

pub mod export;
pub mod oci;
