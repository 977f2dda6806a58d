//! RUNPATH to the project-local libtorch for this crate's test binaries.

include!("../libs/vision/rpath.rs");
