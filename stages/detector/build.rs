//! RUNPATH to the project-local libtorch for this crate's test binaries.

include!("../vision/rpath.rs");
