//! RUNPATH to the project-local libtorch for `pcb` and its tests.

include!("../../stages/libs/vision/rpath.rs");
