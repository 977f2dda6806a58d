//! Data-parallel plumbing over libtorch's own c10d: rendezvous through a `TCPStore`,
//! collectives through `ProcessGroupGloo`, gradients all-reduced in flat buckets.

use std::ffi::{c_char, c_int, c_longlong, c_uchar, c_void, CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

use tch::{Kind, Tensor};

/// Declares the shim's C ABI once, as `PCB_FN(name)` does in `csrc/dist_shim.cpp`: each
/// entry is a field of [`Shim`], bound to `pcb_dist_<name>` in the linked Gloo build
/// ([`GLOO`]) and looked up as `pcb_nccl_<name>` in the NCCL build ([`Shim::nccl`]), so the
/// two builds cannot drift apart in what the trainer expects of them.
macro_rules! shim_abi {
    ($($name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?;)*) => {
        /// The C ABI of one build of `csrc/dist_shim.cpp` (Gloo: linked in; NCCL: opened at
        /// run time from `libpcb_nccl.so`).
        #[derive(Clone, Copy)]
        struct Shim {
            $($name: unsafe extern "C" fn($($arg: $ty),*) $(-> $ret)?,)*
        }

        /// The Gloo build's entry points, linked into the trainer.
        mod gloo {
            use super::*;

            extern "C" {
                $(
                    #[link_name = concat!("pcb_dist_", stringify!($name))]
                    pub(super) fn $name($($arg: $ty),*) $(-> $ret)?;
                )*
            }
        }

        const GLOO: Shim = Shim { $($name: gloo::$name,)* };

        impl Shim {
            /// The NCCL build's entry points in `lib` (a live `dlopen` handle of `file`).
            fn nccl(file: &str, lib: *mut c_void) -> Result<Shim, String> {
                Ok(Shim {
                    $($name: {
                        let symbol = concat!("pcb_nccl_", stringify!($name), "\0");
                        // SAFETY: a live handle from dlopen and a NUL-terminated name.
                        let p = unsafe { libc::dlsym(lib, symbol.as_ptr().cast()) };
                        if p.is_null() {
                            return Err(format!(
                                "{file} has no symbol {}: rebuild it from this source",
                                symbol.trim_end_matches('\0')
                            ));
                        }
                        // SAFETY: the symbol is the NCCL build of the function with this
                        // signature (one source, two prefixes).
                        unsafe {
                            std::mem::transmute::<
                                *mut c_void,
                                unsafe extern "C" fn($($ty),*) $(-> $ret)?,
                            >(p)
                        }
                    },)*
                })
            }
        }
    };
}

shim_abi! {
    init(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        device: c_int,
        timeout_ms: c_longlong,
        prefix: *const c_char,
        listen_fd: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    free(handle: *mut c_void);
    allreduce_sum(
        handle: *mut c_void,
        tensors: *const *mut c_void,
        n: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    broadcast(
        handle: *mut c_void,
        tensors: *const *mut c_void,
        n: c_int,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    barrier(handle: *mut c_void, err: *mut *mut c_char) -> c_int;
    store_set(
        handle: *mut c_void,
        key: *const c_char,
        value: *const c_uchar,
        len: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    store_check(
        handle: *mut c_void,
        key: *const c_char,
        exists: *mut c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    store_get(
        handle: *mut c_void,
        key: *const c_char,
        value: *mut *mut c_uchar,
        len: *mut usize,
        err: *mut *mut c_char,
    ) -> c_int;
}

extern "C" {
    // Both builds allocate error strings and store values with malloc, so this one frees
    // either's.
    fn pcb_dist_free_string(s: *mut c_char);
}

/// The library name searched through `LD_LIBRARY_PATH` and the trainer's RUNPATH (the
/// project's `.libtorch/lib`, where `deploy/build-nccl-shim.sh` puts it).
pub const NCCL_SHIM: &str = "libpcb_nccl.so";

static NCCL: std::sync::OnceLock<Result<Shim, String>> = std::sync::OnceLock::new();

/// Opens the NCCL build of the shim once: `PCB_NCCL_SHIM` (a path) or [`NCCL_SHIM`].
fn nccl_shim() -> Result<Shim, DistError> {
    NCCL.get_or_init(|| {
        pcb_vision::cuda::load().map_err(|e| e.to_string())?;
        let name = std::env::var("PCB_NCCL_SHIM").unwrap_or_else(|_| NCCL_SHIM.into());
        let lib = pcb_vision::cuda::open_global(&name).map_err(|e| {
            format!("{e} (build it with deploy/build-nccl-shim.sh, or set PCB_NCCL_SHIM)")
        })?;
        Shim::nccl(&name, lib)
    })
    .clone()
    .map_err(DistError::Nccl)
}

/// Which collectives engine a rank uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// c10d's Gloo, over TCP, on host tensors (a GPU rank stages through host memory).
    Gloo,
    /// c10d's NCCL on this CUDA device, tensors staying on the GPU.
    Nccl {
        /// The rank's CUDA device index.
        device: usize,
    },
}

impl Backend {
    /// Where the collectives' tensors live.
    pub fn device(self) -> tch::Device {
        match self {
            Backend::Gloo => tch::Device::Cpu,
            Backend::Nccl { device } => tch::Device::Cuda(device),
        }
    }

    /// Picks the engine for a rank on `device` given the configured choice (`auto`,
    /// `gloo` or `nccl`): `auto` takes NCCL on a GPU when its shim loads and no other
    /// rank shares the GPU (NCCL refuses two ranks on one device), and says why not
    /// otherwise, falling back to Gloo; `nccl` when it cannot run is an error.
    pub fn resolve(
        choice: &str,
        device: tch::Device,
        shares_gpu: bool,
    ) -> Result<Backend, DistError> {
        match (choice, device) {
            ("gloo", _) | ("auto", tch::Device::Cpu) => Ok(Backend::Gloo),
            ("nccl", tch::Device::Cpu) => Err(DistError::Argument(
                "backend nccl needs the rank on a CUDA device".into(),
            )),
            ("nccl", tch::Device::Cuda(_)) if shares_gpu => Err(DistError::Argument(
                "backend nccl cannot put two ranks on one GPU: run at most one rank per GPU, \
                 or use backend gloo"
                    .into(),
            )),
            ("auto", tch::Device::Cuda(_)) if shares_gpu => {
                tracing::info!("ranks share a GPU, which NCCL refuses: all-reducing with Gloo");
                Ok(Backend::Gloo)
            }
            ("nccl" | "auto", tch::Device::Cuda(d)) => match nccl_shim() {
                Ok(_) => Ok(Backend::Nccl { device: d }),
                Err(e) if choice == "auto" => {
                    tracing::warn!(error = %e, "NCCL unavailable; all-reducing with Gloo through host memory");
                    Ok(Backend::Gloo)
                }
                Err(e) => Err(e),
            },
            (other, _) => Err(DistError::Argument(format!(
                "backend {other:?} is not auto, gloo or nccl"
            ))),
        }
    }
}

/// Why a collective or the rendezvous failed.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The store or the Gloo group could not be set up.
    #[error("rendezvous at {addr} (rank {rank} of {world}) failed: {message}")]
    Rendezvous {
        /// `host:port` of the store.
        addr: String,
        /// This rank.
        rank: usize,
        /// World size.
        world: usize,
        /// What c10d said.
        message: String,
    },
    /// A collective failed: a peer died, stalled past the timeout, or disagreed on shapes.
    #[error("{op} failed on rank {rank}: {message}")]
    Collective {
        /// Which collective.
        op: &'static str,
        /// This rank.
        rank: usize,
        /// What Gloo said.
        message: String,
    },
    /// A store key could not be read or written.
    #[error("store key {key:?}: {message}")]
    Store {
        /// The key.
        key: String,
        /// What c10d said.
        message: String,
    },
    /// The NCCL shim or libtorch's CUDA half could not be opened.
    #[error("NCCL backend unavailable: {0}")]
    Nccl(String),
    /// Arguments that cannot cross into C++ (a NUL in a string, a world of zero).
    #[error("invalid argument: {0}")]
    Argument(String),
}

/// Where and how a rank joins its job.
#[derive(Debug, Clone, PartialEq)]
pub struct DistConfig {
    /// Address of rank 0, which hosts the store.
    pub master_addr: String,
    /// Port of the store.
    pub master_port: u16,
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Bound on the rendezvous and on every collective.
    pub timeout: Duration,
    /// Key prefix in the store, so jobs sharing a store do not mix.
    pub job: String,
    /// The collectives engine (resolved: see [`Backend::resolve`]).
    pub backend: Backend,
}

/// One rank's membership of a process group.
pub struct ProcessGroup {
    handle: NonNull<c_void>,
    shim: Shim,
    backend: Backend,
    rank: usize,
    world: usize,
}

// The handle is owned; c10d's store and process group lock internally, and the trainer
// uses a group from one thread at a time (the rendezvous task, then the training thread).
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

fn take_error(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error".into();
    }
    // SAFETY: the shim returns a NUL-terminated malloc'd string, freed right after.
    let text = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { pcb_dist_free_string(err) };
    text
}

/// `Ok` for a shim call that returned 0; otherwise `error` of the message it left in `err`.
fn status(
    rc: c_int,
    err: *mut c_char,
    error: impl FnOnce(String) -> DistError,
) -> Result<(), DistError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(error(take_error(err)))
    }
}

fn store_error(key: &str, message: String) -> DistError {
    DistError::Store {
        key: key.into(),
        message,
    }
}

fn cstring(s: &str) -> Result<CString, DistError> {
    CString::new(s).map_err(|_| DistError::Argument(format!("{s:?} contains a NUL byte")))
}

impl ProcessGroup {
    /// Joins the job: rank 0 hosts the store; every rank waits for all others up to the
    /// timeout.
    pub fn join(cfg: &DistConfig) -> Result<ProcessGroup, DistError> {
        if cfg.world == 0 || cfg.rank >= cfg.world {
            return Err(DistError::Argument(format!(
                "rank {} is outside a world of {}",
                cfg.rank, cfg.world
            )));
        }
        let host = cstring(&cfg.master_addr)?;
        let prefix = cstring(&cfg.job)?;
        let (shim, device) = match cfg.backend {
            Backend::Gloo => (GLOO, 0),
            Backend::Nccl { device } => (nccl_shim()?, device),
        };
        let addr = format!("{}:{}", cfg.master_addr, cfg.master_port);
        // Rank 0 binds the store's socket itself, to the master address only: c10d's own
        // listener takes every interface, and the store has no authentication.
        let listen_fd = if cfg.rank == 0 {
            let listener = std::net::TcpListener::bind((cfg.master_addr.as_str(), cfg.master_port))
                .map_err(|e| DistError::Rendezvous {
                    addr: addr.clone(),
                    rank: cfg.rank,
                    world: cfg.world,
                    message: format!("cannot listen on {addr}: {e}"),
                })?;
            // The store owns the socket from here (it closes it when it ends).
            std::os::fd::IntoRawFd::into_raw_fd(listener)
        } else {
            -1
        };
        let mut err = std::ptr::null_mut();
        // SAFETY: valid C strings; the shim catches every exception.
        let handle = unsafe {
            (shim.init)(
                host.as_ptr(),
                c_int::from(cfg.master_port),
                cfg.rank as c_int,
                cfg.world as c_int,
                device as c_int,
                cfg.timeout.as_millis() as c_longlong,
                prefix.as_ptr(),
                listen_fd,
                &mut err,
            )
        };
        match NonNull::new(handle) {
            Some(handle) => Ok(ProcessGroup {
                handle,
                shim,
                backend: cfg.backend,
                rank: cfg.rank,
                world: cfg.world,
            }),
            None => Err(DistError::Rendezvous {
                addr,
                rank: cfg.rank,
                world: cfg.world,
                message: take_error(err),
            }),
        }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The engine this group runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Where tensors handed to the collectives must live.
    pub fn device(&self) -> tch::Device {
        self.backend.device()
    }

    fn check(&self, op: &'static str, rc: c_int, err: *mut c_char) -> Result<(), DistError> {
        status(rc, err, |message| DistError::Collective {
            op,
            rank: self.rank,
            message,
        })
    }

    fn pointers(&self, tensors: &[Tensor]) -> Result<Vec<*mut c_void>, DistError> {
        let device = self.device();
        tensors
            .iter()
            .map(|t| {
                if t.device() != device || !t.is_contiguous() {
                    Err(DistError::Argument(format!(
                        "collectives of this group take contiguous tensors on {device:?}"
                    )))
                } else {
                    Ok(t.as_ptr() as *mut c_void)
                }
            })
            .collect()
    }

    /// Runs collective `op` on `tensors`: `call` gets the group's handle, the tensors'
    /// pointers, their count and the error out-pointer.
    fn collective(
        &self,
        op: &'static str,
        tensors: &[Tensor],
        call: impl FnOnce(*mut c_void, *const *mut c_void, c_int, *mut *mut c_char) -> c_int,
    ) -> Result<(), DistError> {
        let ptrs = self.pointers(tensors)?;
        let mut err = std::ptr::null_mut();
        let rc = call(
            self.handle.as_ptr(),
            ptrs.as_ptr(),
            ptrs.len() as c_int,
            &mut err,
        );
        self.check(op, rc, err)
    }

    /// Sums every tensor across ranks, in place; the collectives are issued together.
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<(), DistError> {
        // SAFETY: the pointers are live tensors borrowed for the call.
        self.collective("all-reduce", tensors, |handle, ptrs, n, err| unsafe {
            (self.shim.allreduce_sum)(handle, ptrs, n, err)
        })
    }

    /// Overwrites every tensor with rank `root`'s values, in place.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<(), DistError> {
        // SAFETY: as above.
        self.collective("broadcast", tensors, |handle, ptrs, n, err| unsafe {
            (self.shim.broadcast)(handle, ptrs, n, root as c_int, err)
        })
    }

    /// Waits until every rank reaches this point.
    pub fn barrier(&self) -> Result<(), DistError> {
        let mut err = std::ptr::null_mut();
        // SAFETY: a live handle.
        let rc = unsafe { (self.shim.barrier)(self.handle.as_ptr(), &mut err) };
        self.check("barrier", rc, err)
    }

    /// Writes a key of the job's store.
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<(), DistError> {
        let k = cstring(key)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: a live handle, a C string and a borrowed slice.
        let rc = unsafe {
            (self.shim.store_set)(
                self.handle.as_ptr(),
                k.as_ptr(),
                value.as_ptr(),
                value.len(),
                &mut err,
            )
        };
        status(rc, err, |message| store_error(key, message))
    }

    /// Whether a key of the job's store exists now.
    pub fn store_check(&self, key: &str) -> Result<bool, DistError> {
        let k = cstring(key)?;
        let mut err = std::ptr::null_mut();
        let mut exists: c_int = 0;
        // SAFETY: a live handle, a C string and an out-pointer to a local.
        let rc = unsafe {
            (self.shim.store_check)(self.handle.as_ptr(), k.as_ptr(), &mut exists, &mut err)
        };
        status(rc, err, |message| store_error(key, message))?;
        Ok(exists != 0)
    }

    /// Reads a key of the job's store, waiting for it up to the timeout.
    pub fn store_get(&self, key: &str) -> Result<Vec<u8>, DistError> {
        let k = cstring(key)?;
        let mut err = std::ptr::null_mut();
        let mut value: *mut c_uchar = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: out-pointers to locals; the value is malloc'd by the shim and freed here.
        let rc = unsafe {
            (self.shim.store_get)(
                self.handle.as_ptr(),
                k.as_ptr(),
                &mut value,
                &mut len,
                &mut err,
            )
        };
        status(rc, err, |message| store_error(key, message))?;
        // SAFETY: the shim wrote `len` bytes at `value`.
        let out = unsafe { std::slice::from_raw_parts(value, len) }.to_vec();
        unsafe { pcb_dist_free_string(value as *mut c_char) };
        Ok(out)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from pcb_dist_init and is freed once.
        unsafe { (self.shim.free)(self.handle.as_ptr()) }
    }
}

/// Averages gradients across ranks the way DDP does, in flat buckets of about
/// `bucket_bytes`, weighting each rank by the images it trained on, so a rank with a
/// short (or empty) batch counts for what it saw and the result equals one process
/// training on the union of the batches.
pub struct GradSync {
    params: Vec<Tensor>,
    buckets: Vec<std::ops::Range<usize>>,
}

impl GradSync {
    /// Plans the buckets over the trainable parameters, in order.
    pub fn new(params: Vec<Tensor>, bucket_bytes: usize) -> GradSync {
        let mut buckets = Vec::new();
        let (mut start, mut bytes) = (0usize, 0usize);
        for (i, p) in params.iter().enumerate() {
            bytes += p.numel() * 4;
            if bytes >= bucket_bytes {
                buckets.push(start..i + 1);
                start = i + 1;
                bytes = 0;
            }
        }
        if start < params.len() || buckets.is_empty() {
            buckets.push(start..params.len());
        }
        GradSync { params, buckets }
    }

    /// Number of buckets.
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Replaces every gradient with the image-weighted mean over ranks. `images` is how
    /// many images this rank's gradients come from (their loss, `loss`, being a mean over
    /// them); returns the job-wide image count of the step and the job-wide mean loss.
    pub fn average(
        &self,
        group: &ProcessGroup,
        images: usize,
        loss: f64,
    ) -> Result<(f64, f64), DistError> {
        let weight = images as f64;
        // A parameter outside this rank's graph (no positives, no batch) has no gradient
        // yet; a zero one lets it take the mean of the others like every parameter.
        let missing: Vec<Tensor> = self
            .params
            .iter()
            .filter(|p| !p.grad().defined())
            .map(|p| (p * 0.0).sum(Kind::Float))
            .collect();
        if !missing.is_empty() {
            Tensor::stack(&missing, 0).sum(Kind::Float).backward();
        }
        let mut flats: Vec<Tensor> = self
            .buckets
            .iter()
            .map(|range| {
                let parts: Vec<Tensor> = self.params[range.clone()]
                    .iter()
                    .map(|p| {
                        p.grad()
                            .to_kind(Kind::Float)
                            .to_device(group.device())
                            .reshape([-1])
                            * weight
                    })
                    .collect();
                Tensor::cat(&parts, 0)
            })
            .collect();
        // The image count and the loss ride in the last bucket instead of collectives of
        // their own.
        let loss = if images == 0 { 0.0 } else { loss * weight };
        let count = Tensor::from_slice(&[loss as f32, weight as f32]).to_device(group.device());
        if let Some(last) = flats.last_mut() {
            *last = Tensor::cat(&[last.shallow_clone(), count], 0);
        }
        group.all_reduce_sum(&flats)?;
        let last = flats.len() - 1;
        let n = flats[last].numel() as i64;
        let total = flats[last].double_value(&[n - 1]);
        if total <= 0.0 {
            return Ok((0.0, f64::NAN));
        }
        let mean_loss = flats[last].double_value(&[n - 2]) / total;
        tch::no_grad(|| {
            for (range, flat) in self.buckets.iter().zip(&flats) {
                let mut offset = 0i64;
                for p in &self.params[range.clone()] {
                    let n = p.numel() as i64;
                    let mean = flat.narrow(0, offset, n).view_as(p) / total;
                    p.grad().copy_(&mean.to_device(p.device()));
                    offset += n;
                }
            }
        });
        Ok((total, mean_loss))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    /// Runs `f(group)` on `world` ranks as threads of this process.
    pub(crate) fn with_ranks<T: Send + 'static>(
        world: usize,
        f: impl Fn(ProcessGroup) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        with_ranks_on(free_port(), world, f)
    }

    /// [`with_ranks`] with the store on `port`.
    pub(crate) fn with_ranks_on<T: Send + 'static>(
        port: u16,
        world: usize,
        f: impl Fn(ProcessGroup) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = std::sync::Arc::new(f);
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let g = ProcessGroup::join(&DistConfig {
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        rank,
                        world,
                        timeout: Duration::from_secs(30),
                        job: "test/".into(),
                        backend: Backend::Gloo,
                    })
                    .expect("join");
                    f(g)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    }

    #[test]
    fn all_reduce_broadcast_and_store_across_two_ranks() {
        let out = with_ranks(2, |g| {
            let r = g.rank() as f32;
            let t = Tensor::from_slice(&[1.0 + r, 10.0 * (r + 1.0)]);
            g.all_reduce_sum(&[t.shallow_clone()]).expect("all-reduce");
            let b = Tensor::from_slice(&[r + 7.0]);
            g.broadcast(&[b.shallow_clone()], 1).expect("broadcast");
            g.store_set(&format!("k{}", g.rank()), b"hello")
                .expect("set");
            let other = g.store_get(&format!("k{}", 1 - g.rank())).expect("get");
            g.barrier().expect("barrier");
            (
                Vec::<f32>::try_from(&t).expect("vec"),
                Vec::<f32>::try_from(&b).expect("vec"),
                other,
            )
        });
        for (sum, bcast, other) in out {
            assert_eq!(sum, [3.0, 30.0]);
            assert_eq!(bcast, [8.0], "rank 1's value everywhere");
            assert_eq!(other, b"hello");
        }
    }

    /// The local addresses listening on `port`, from the kernel's socket tables (hex, as
    /// /proc/net/tcp{,6} write them).
    fn listeners_on(port: u16) -> Vec<String> {
        let mut out = Vec::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // local_address is field 1 ("ADDR:PORT"), st field 3 (0A: listening).
                if f.len() > 3 && f[3] == "0A" {
                    if let Some((addr, p)) = f[1].split_once(':') {
                        if u16::from_str_radix(p, 16).ok() == Some(port) {
                            out.push(addr.to_string());
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn a_rank_without_the_jobs_secret_does_not_join_it() {
        // Rank 1 reaches the store (the port is open to it) but names the keys under
        // another secret: neither side finds the other's, and both give up at the timeout.
        let port = free_port();
        let joined: Vec<bool> = [("s3cret", 0), ("guess", 1)]
            .into_iter()
            .map(|(secret, rank)| {
                std::thread::spawn(move || {
                    ProcessGroup::join(&DistConfig {
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        rank,
                        world: 2,
                        timeout: Duration::from_secs(3),
                        job: format!("pcb-train/test/{secret}/"),
                        backend: Backend::Gloo,
                    })
                    .is_ok()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect();
        assert_eq!(joined, [false, false]);
    }

    #[test]
    fn the_store_listens_on_the_master_address_only() {
        let port = free_port();
        let seen = with_ranks_on(port, 2, move |g| {
            let found = if g.rank() == 0 {
                listeners_on(port)
            } else {
                Vec::new()
            };
            g.barrier().expect("barrier");
            found
        });
        // 127.0.0.1 in /proc/net/tcp's byte order; never 00000000 (every interface).
        assert_eq!(
            seen[0],
            ["0100007F"],
            "listeners on the store's port {port}"
        );
    }

    #[test]
    fn gradients_are_averaged_by_images_in_buckets() {
        // Rank 0 saw 3 images with gradient 1, rank 1 saw 1 image with gradient 5:
        // the job-wide mean is (3*1 + 1*5) / 4 = 2, in every bucket.
        let out = with_ranks(2, |g| {
            let params: Vec<Tensor> = (0..3)
                .map(|_| {
                    Tensor::zeros([4], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true)
                })
                .collect();
            let grad = if g.rank() == 0 { 1.0 } else { 5.0 };
            let loss: Tensor = params.iter().map(|p| (p * grad).sum(Kind::Float)).sum();
            loss.backward();
            // 16-byte buckets: one parameter each.
            let sync = GradSync::new(params.iter().map(|p| p.shallow_clone()).collect(), 16);
            assert_eq!(sync.bucket_count(), 3);
            let images = if g.rank() == 0 { 3 } else { 1 };
            let (total, loss) = sync.average(&g, images, grad).expect("average");
            let grads: Vec<Vec<f32>> = params
                .iter()
                .map(|p| Vec::<f32>::try_from(&p.grad()).expect("vec"))
                .collect();
            (total, loss, grads)
        });
        for (total, loss, grads) in out {
            assert_eq!(total, 4.0);
            assert!((loss - 2.0).abs() < 1e-6, "image-weighted loss {loss}");
            for g in grads {
                assert_eq!(g, [2.0; 4]);
            }
        }
    }

    #[test]
    fn a_rank_with_no_images_still_takes_the_mean() {
        let out = with_ranks(2, |g| {
            let p = Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
            let images = if g.rank() == 0 {
                (&p * 4.0).sum(Kind::Float).backward();
                2
            } else {
                0 // no batch, no backward: the gradient is undefined here
            };
            let sync = GradSync::new(vec![p.shallow_clone()], 1 << 20);
            let (total, _) = sync.average(&g, images, 1.0).expect("average");
            (total, Vec::<f32>::try_from(&p.grad()).expect("vec"))
        });
        for (total, grad) in out {
            assert_eq!(total, 2.0);
            assert_eq!(grad, [4.0, 4.0]);
        }
    }

    #[test]
    fn a_lost_peer_fails_the_collective_instead_of_hanging() {
        let port = free_port();
        let cfg = move |rank| DistConfig {
            master_addr: "127.0.0.1".into(),
            master_port: port,
            rank,
            world: 2,
            timeout: Duration::from_secs(5),
            job: "lost/".into(),
            backend: Backend::Gloo,
        };
        let peer = std::thread::spawn(move || {
            let g = ProcessGroup::join(&cfg(1)).expect("join");
            g.barrier().expect("barrier");
            drop(g); // leaves before the all-reduce rank 0 starts
        });
        let g = ProcessGroup::join(&cfg(0)).expect("join");
        g.barrier().expect("barrier");
        peer.join().expect("peer");
        let started = std::time::Instant::now();
        let t = Tensor::from_slice(&[1f32]);
        let err = g.all_reduce_sum(&[t]).expect_err("no peer to reduce with");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "took {:?}",
            started.elapsed()
        );
        assert!(matches!(err, DistError::Collective { .. }), "{err}");
    }

    #[test]
    fn backends_resolve_by_device_and_choice() {
        let cpu = tch::Device::Cpu;
        assert_eq!(
            Backend::resolve("auto", cpu, false).ok(),
            Some(Backend::Gloo)
        );
        assert_eq!(
            Backend::resolve("gloo", tch::Device::Cuda(0), false).ok(),
            Some(Backend::Gloo)
        );
        assert_eq!(
            Backend::resolve("auto", tch::Device::Cuda(0), true).ok(),
            Some(Backend::Gloo),
            "two ranks on one GPU fall back to Gloo"
        );
        let err = Backend::resolve("nccl", cpu, false).expect_err("no GPU");
        assert!(err.to_string().contains("CUDA device"), "{err}");
        let err = Backend::resolve("nccl", tch::Device::Cuda(0), true).expect_err("shared GPU");
        assert!(err.to_string().contains("one GPU"), "{err}");
        let err = Backend::resolve("mpi", cpu, false).expect_err("unknown");
        assert!(err.to_string().contains("auto, gloo or nccl"), "{err}");
        if pcb_vision::cuda::load().is_err() {
            // Here NCCL cannot load: `nccl` says why, `auto` falls back.
            let err = Backend::resolve("nccl", tch::Device::Cuda(0), false).expect_err("no CUDA");
            assert!(
                err.to_string().contains("NCCL backend unavailable"),
                "{err}"
            );
            assert_eq!(
                Backend::resolve("auto", tch::Device::Cuda(0), false).ok(),
                Some(Backend::Gloo)
            );
        }
    }

    /// NCCL on this machine's first GPU, one rank: the collectives, the store and the
    /// image-weighted gradient average, with every tensor staying on the GPU. Needs a GPU,
    /// libtorch_cuda.so on LD_LIBRARY_PATH and the shim (deploy/build-nccl-shim.sh).
    #[test]
    #[ignore = "needs a CUDA GPU and libpcb_nccl.so: cargo test -p pcb-trainer -- --ignored nccl"]
    fn nccl_collectives_and_gradient_average_on_a_gpu() {
        let backend = Backend::resolve("nccl", tch::Device::Cuda(0), false).expect("NCCL loads");
        let g = ProcessGroup::join(&DistConfig {
            master_addr: "127.0.0.1".into(),
            master_port: free_port(),
            rank: 0,
            world: 1,
            timeout: Duration::from_secs(60),
            job: "nccl/".into(),
            backend,
        })
        .expect("join");
        assert_eq!(g.device(), tch::Device::Cuda(0));
        let gpu = (Kind::Float, tch::Device::Cuda(0));
        let t = Tensor::from_slice(&[1f32, 2.0]).to_device(tch::Device::Cuda(0));
        g.all_reduce_sum(&[t.shallow_clone()]).expect("all-reduce");
        g.broadcast(&[t.shallow_clone()], 0).expect("broadcast");
        g.barrier().expect("barrier");
        assert_eq!(
            Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu)).expect("vec"),
            [1.0, 2.0]
        );
        let host = Tensor::from_slice(&[1f32]);
        assert!(
            g.all_reduce_sum(&[host]).is_err(),
            "host tensors are refused"
        );
        g.store_set("k", b"v").expect("set");
        assert_eq!(g.store_get("k").expect("get"), b"v");
        let params: Vec<Tensor> = (0..3)
            .map(|_| Tensor::zeros([1000], gpu).set_requires_grad(true))
            .collect();
        let loss: Tensor = params.iter().map(|p| (p * 3.0).sum(Kind::Float)).sum();
        loss.backward();
        let sync = GradSync::new(params.iter().map(|p| p.shallow_clone()).collect(), 4000);
        let (total, mean) = sync.average(&g, 5, 0.25).expect("average");
        assert_eq!(total, 5.0);
        assert!((mean - 0.25).abs() < 1e-6, "{mean}");
        for p in &params {
            assert_eq!(p.grad().device(), tch::Device::Cuda(0));
            let v = Vec::<f32>::try_from(&p.grad().to_device(tch::Device::Cpu)).expect("vec");
            assert!(v.iter().all(|x| (*x - 3.0).abs() < 1e-6));
        }
    }

    #[test]
    fn a_library_without_the_nccl_entry_points_is_refused_by_name() {
        // SAFETY: dlopen(NULL) is the running test binary, which has no `pcb_nccl_*`.
        let this = unsafe { libc::dlopen(std::ptr::null(), libc::RTLD_NOW) };
        assert!(!this.is_null());
        let err = Shim::nccl("this binary", this)
            .err()
            .expect("no NCCL entry points");
        assert_eq!(
            err,
            "this binary has no symbol pcb_nccl_init: rebuild it from this source"
        );
    }

    #[test]
    fn bad_arguments_are_errors() {
        let err = ProcessGroup::join(&DistConfig {
            master_addr: "127.0.0.1".into(),
            master_port: 1,
            rank: 2,
            world: 2,
            timeout: Duration::from_secs(1),
            job: "x/".into(),
            backend: Backend::Gloo,
        })
        .err()
        .expect("rank outside the world");
        assert!(err.to_string().contains("outside a world of 2"), "{err}");
    }
}
