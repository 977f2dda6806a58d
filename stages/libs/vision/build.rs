//! Compiles the C++ shim over libtorch's fused oneDNN convolutions (`csrc/onednn_shim.cpp`)
//! and gives this crate's test binaries a RUNPATH to the project-local libtorch.

mod rpath {
    include!("rpath.rs");
    pub fn emit() {
        main()
    }
}

use std::path::PathBuf;

fn main() {
    rpath::emit();
    println!("cargo:rerun-if-changed=csrc/onednn_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/ffi_guard.h");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        panic!("LIBTORCH is not set: run ./deploy/setup.sh (it unpacks libtorch into .libtorch, which .cargo/config.toml names)");
    };
    let libtorch = PathBuf::from(libtorch);
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("csrc/onednn_shim.cpp")
        .include(libtorch.join("include"))
        .include(libtorch.join("include/torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("pcb_onednn_shim");
    println!(
        "cargo:rustc-link-search=native={}",
        libtorch.join("lib").display()
    );
    for lib in ["torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}
