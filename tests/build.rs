//! RUNPATH to the project-local libtorch for the cross-stage test binaries.

include!("../stages/libs/vision/rpath.rs");
