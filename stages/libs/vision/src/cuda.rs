//! CUDA opened at run time: libtorch's GPU half (`libtorch_cuda.so`) is loaded only when a
//! caller asks for a GPU and the library is there, so the same binary starts on machines
//! with and without CUDA.

use std::ffi::{CStr, CString};
use std::sync::OnceLock;

/// Why CUDA is not usable in this process.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    /// `libtorch_cuda.so` could not be opened (absent, or one of its own libraries is).
    #[error(
        "libtorch_cuda.so could not be loaded ({0}); for GPUs, point LD_LIBRARY_PATH at the \
         lib folder of a CUDA build of torch 2.11.0 (README: training on GPUs)"
    )]
    Load(String),
    /// The library loaded but libtorch sees no device (no driver, no GPU, or hidden).
    #[error("libtorch_cuda.so is loaded but sees no CUDA device")]
    NoDevice,
}

static LOADED: OnceLock<Result<(), String>> = OnceLock::new();

/// Opens a shared library with its symbols global, so libraries opened later (and
/// libtorch's own registries) see them. Returns dlerror's text on failure.
pub fn open_global(name: &str) -> Result<*mut libc::c_void, String> {
    let c = CString::new(name).map_err(|_| format!("{name:?} contains a NUL byte"))?;
    // SAFETY: a valid C string; dlopen runs the library's constructors, which is the
    // point (libtorch_cuda registers its CUDA hooks there).
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let msg = unsafe { libc::dlerror() };
        return Err(if msg.is_null() {
            format!("dlopen {name} failed")
        } else {
            unsafe { CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned()
        });
    }
    Ok(handle)
}

/// Loads `libtorch_cuda.so` once per process. Call it before any other libtorch work:
/// libtorch looks its CUDA hooks up once, at the first operation that asks, and keeps
/// "no CUDA" for the life of the process when the library was not loaded by then. The
/// library is found through `LD_LIBRARY_PATH`, then the binary's RUNPATH to the project's
/// libtorch. The handle is never closed: libtorch's hooks live as long as the process.
pub fn load() -> Result<(), CudaError> {
    LOADED
        .get_or_init(|| {
            // libc10_cuda first: libtorch_cuda needs it, and naming it gives a clearer
            // error when the whole CUDA half is missing.
            open_global("libc10_cuda.so")?;
            open_global("libtorch_cuda.so")?;
            Ok(())
        })
        .clone()
        .map_err(CudaError::Load)
}

/// Number of CUDA devices libtorch sees; 0 when CUDA cannot be loaded.
pub fn device_count() -> usize {
    match load() {
        Ok(()) => tch::Cuda::device_count().max(0) as usize,
        Err(_) => 0,
    }
}

/// The device for `choice` (`auto`, `cpu` or `cuda`) and an index (a rank, a replica):
/// GPU `index mod count` for `cuda`, and for `auto` when CUDA is present; else the CPU.
/// `cuda` without a usable GPU is an error rather than a silent fall-back.
pub fn device_for(choice: &str, index: usize) -> Result<tch::Device, CudaError> {
    match choice {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => {
            load()?;
            match device_count() {
                0 => Err(CudaError::NoDevice),
                n => Ok(tch::Device::Cuda(index % n)),
            }
        }
        _ => match device_count() {
            0 => Ok(tch::Device::Cpu),
            n => Ok(tch::Device::Cuda(index % n)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_never_loads_cuda() {
        assert_eq!(device_for("cpu", 3).ok(), Some(tch::Device::Cpu));
    }

    #[test]
    fn auto_follows_what_is_there() {
        let d = device_for("auto", 1).expect("auto never fails");
        match device_count() {
            0 => assert_eq!(d, tch::Device::Cpu),
            n => assert_eq!(d, tch::Device::Cuda(1 % n)),
        }
    }

    #[test]
    fn cuda_without_a_gpu_is_an_error() {
        if device_count() == 0 {
            let err = device_for("cuda", 0).expect_err("no GPU here");
            assert!(!err.to_string().is_empty());
        } else {
            assert!(matches!(device_for("cuda", 0), Ok(tch::Device::Cuda(0))));
        }
    }

    #[test]
    fn a_missing_library_names_itself() {
        let err = open_global("libpcb-no-such-library.so").expect_err("absent");
        assert!(err.contains("libpcb-no-such-library.so"), "{err}");
    }
}
