//! Lets binaries and test binaries that link this crate find the project-local libtorch at
//! run time without LD_LIBRARY_PATH: a RUNPATH relative to the binary, plus the absolute one.

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
