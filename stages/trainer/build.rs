//! Compiles the C++ shim over libtorch's c10d (TCPStore + ProcessGroupGloo) and gives the
//! crate's binaries a RUNPATH to the project-local libtorch.

mod rpath {
    include!("../libs/vision/rpath.rs");
    pub fn emit() {
        main()
    }
}

use std::path::PathBuf;

fn main() {
    rpath::emit();
    // The revision that trained a model goes into its registry metadata.
    if let Ok(out) = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
    {
        if out.status.success() {
            let rev = String::from_utf8_lossy(&out.stdout).trim().to_string();
            println!("cargo:rustc-env=PCB_GIT_REVISION={rev}");
        }
    }
    println!("cargo:rerun-if-changed=csrc/dist_shim.cpp");
    println!("cargo:rerun-if-changed=../libs/vision/csrc/ffi_guard.h");
    println!("cargo:rerun-if-env-changed=PCB_GLOO_INCLUDE");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        panic!("LIBTORCH is not set: run ./deploy/setup.sh (it unpacks libtorch into .libtorch, which .cargo/config.toml names)");
    };
    let libtorch = PathBuf::from(libtorch);
    // The wheel ships c10d's headers but not gloo's, which ProcessGroupGloo.hpp includes;
    // Debian's libgloo-dev has them.
    let gloo = std::env::var("PCB_GLOO_INCLUDE").unwrap_or_else(|_| "/usr/include".into());
    if !PathBuf::from(&gloo).join("gloo/config.h").exists() {
        panic!(
            "gloo headers not found under {gloo} (gloo/config.h): install Debian's libgloo-dev \
             (./deploy/setup.sh does) or point PCB_GLOO_INCLUDE at them"
        );
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("csrc/dist_shim.cpp")
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .include(&gloo)
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("pcb_dist_shim");
    println!(
        "cargo:rustc-link-search=native={}",
        libtorch.join("lib").display()
    );
    for lib in ["torch_cpu", "torch", "c10"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}
