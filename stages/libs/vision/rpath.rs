// Shared by the build scripts of every crate whose binaries or tests link libtorch (a
// library's link arguments do not reach its dependents' binaries): a RUNPATH relative to
// the binary, plus the absolute one, so they find the project-local libtorch without
// LD_LIBRARY_PATH.

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    // target/<profile>/<bin> and target/<profile>/deps/<test> sit two and three levels
    // below the workspace root that holds .libtorch.
    for rel in [
        "$ORIGIN/../../.libtorch/lib",
        "$ORIGIN/../../../.libtorch/lib",
    ] {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{rel}");
    }
    if let Ok(dir) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}/lib");
    }
}
