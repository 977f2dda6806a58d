//! Data-parallel plumbing over libtorch's own c10d: rendezvous through a `TCPStore`,
//! collectives through `ProcessGroupGloo`, gradients all-reduced in flat buckets.

use std::ffi::{c_char, c_int, c_longlong, c_uchar, c_void, CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

use tch::{Kind, Tensor};

extern "C" {
    fn pcb_dist_init(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: c_longlong,
        prefix: *const c_char,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn pcb_dist_free(handle: *mut c_void);
    fn pcb_dist_free_string(s: *mut c_char);
    fn pcb_dist_allreduce_sum(
        handle: *mut c_void,
        tensors: *const *mut c_void,
        n: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn pcb_dist_broadcast(
        handle: *mut c_void,
        tensors: *const *mut c_void,
        n: c_int,
        root: c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn pcb_dist_barrier(handle: *mut c_void, err: *mut *mut c_char) -> c_int;
    fn pcb_dist_store_set(
        handle: *mut c_void,
        key: *const c_char,
        value: *const c_uchar,
        len: usize,
        err: *mut *mut c_char,
    ) -> c_int;
    fn pcb_dist_store_check(
        handle: *mut c_void,
        key: *const c_char,
        exists: *mut c_int,
        err: *mut *mut c_char,
    ) -> c_int;
    fn pcb_dist_store_get(
        handle: *mut c_void,
        key: *const c_char,
        value: *mut *mut c_uchar,
        len: *mut usize,
        err: *mut *mut c_char,
    ) -> c_int;
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
}

/// One rank's membership of a Gloo process group.
pub struct ProcessGroup {
    handle: NonNull<c_void>,
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
        let mut err = std::ptr::null_mut();
        // SAFETY: valid C strings; the shim catches every exception.
        let handle = unsafe {
            pcb_dist_init(
                host.as_ptr(),
                c_int::from(cfg.master_port),
                cfg.rank as c_int,
                cfg.world as c_int,
                cfg.timeout.as_millis() as c_longlong,
                prefix.as_ptr(),
                &mut err,
            )
        };
        match NonNull::new(handle) {
            Some(handle) => Ok(ProcessGroup {
                handle,
                rank: cfg.rank,
                world: cfg.world,
            }),
            None => Err(DistError::Rendezvous {
                addr: format!("{}:{}", cfg.master_addr, cfg.master_port),
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

    fn check(&self, op: &'static str, rc: c_int, err: *mut c_char) -> Result<(), DistError> {
        if rc == 0 {
            Ok(())
        } else {
            Err(DistError::Collective {
                op,
                rank: self.rank,
                message: take_error(err),
            })
        }
    }

    fn pointers(tensors: &[Tensor]) -> Result<Vec<*mut c_void>, DistError> {
        tensors
            .iter()
            .map(|t| {
                if t.device() != tch::Device::Cpu || !t.is_contiguous() {
                    Err(DistError::Argument(
                        "collectives take contiguous CPU tensors".into(),
                    ))
                } else {
                    Ok(t.as_ptr() as *mut c_void)
                }
            })
            .collect()
    }

    /// Sums every tensor across ranks, in place; the collectives are issued together.
    pub fn all_reduce_sum(&self, tensors: &[Tensor]) -> Result<(), DistError> {
        let ptrs = Self::pointers(tensors)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: the pointers are live tensors borrowed for the call.
        let rc = unsafe {
            pcb_dist_allreduce_sum(
                self.handle.as_ptr(),
                ptrs.as_ptr(),
                ptrs.len() as c_int,
                &mut err,
            )
        };
        self.check("all-reduce", rc, err)
    }

    /// Overwrites every tensor with rank `root`'s values, in place.
    pub fn broadcast(&self, tensors: &[Tensor], root: usize) -> Result<(), DistError> {
        let ptrs = Self::pointers(tensors)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: as above.
        let rc = unsafe {
            pcb_dist_broadcast(
                self.handle.as_ptr(),
                ptrs.as_ptr(),
                ptrs.len() as c_int,
                root as c_int,
                &mut err,
            )
        };
        self.check("broadcast", rc, err)
    }

    /// Waits until every rank reaches this point.
    pub fn barrier(&self) -> Result<(), DistError> {
        let mut err = std::ptr::null_mut();
        // SAFETY: a live handle.
        let rc = unsafe { pcb_dist_barrier(self.handle.as_ptr(), &mut err) };
        self.check("barrier", rc, err)
    }

    /// Writes a key of the job's store.
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<(), DistError> {
        let k = cstring(key)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: a live handle, a C string and a borrowed slice.
        let rc = unsafe {
            pcb_dist_store_set(
                self.handle.as_ptr(),
                k.as_ptr(),
                value.as_ptr(),
                value.len(),
                &mut err,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(DistError::Store {
                key: key.into(),
                message: take_error(err),
            })
        }
    }

    /// Whether a key of the job's store exists now.
    pub fn store_check(&self, key: &str) -> Result<bool, DistError> {
        let k = cstring(key)?;
        let mut err = std::ptr::null_mut();
        let mut exists: c_int = 0;
        // SAFETY: a live handle, a C string and an out-pointer to a local.
        let rc = unsafe {
            pcb_dist_store_check(self.handle.as_ptr(), k.as_ptr(), &mut exists, &mut err)
        };
        if rc == 0 {
            Ok(exists != 0)
        } else {
            Err(DistError::Store {
                key: key.into(),
                message: take_error(err),
            })
        }
    }

    /// Reads a key of the job's store, waiting for it up to the timeout.
    pub fn store_get(&self, key: &str) -> Result<Vec<u8>, DistError> {
        let k = cstring(key)?;
        let mut err = std::ptr::null_mut();
        let mut value: *mut c_uchar = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: out-pointers to locals; the value is malloc'd by the shim and freed here.
        let rc = unsafe {
            pcb_dist_store_get(
                self.handle.as_ptr(),
                k.as_ptr(),
                &mut value,
                &mut len,
                &mut err,
            )
        };
        if rc != 0 {
            return Err(DistError::Store {
                key: key.into(),
                message: take_error(err),
            });
        }
        // SAFETY: the shim wrote `len` bytes at `value`.
        let out = unsafe { std::slice::from_raw_parts(value, len) }.to_vec();
        unsafe { pcb_dist_free_string(value as *mut c_char) };
        Ok(out)
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from pcb_dist_init and is freed once.
        unsafe { pcb_dist_free(self.handle.as_ptr()) }
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
                            .to_device(tch::Device::Cpu)
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
        let count = Tensor::from_slice(&[loss as f32, weight as f32]);
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
mod tests {
    use super::*;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    /// Runs `f(group)` on `world` ranks as threads of this process.
    fn with_ranks<T: Send + 'static>(
        world: usize,
        f: impl Fn(ProcessGroup) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let port = free_port();
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
    fn bad_arguments_are_errors() {
        let err = ProcessGroup::join(&DistConfig {
            master_addr: "127.0.0.1".into(),
            master_port: 1,
            rank: 2,
            world: 2,
            timeout: Duration::from_secs(1),
            job: "x/".into(),
        })
        .err()
        .expect("rank outside the world");
        assert!(err.to_string().contains("outside a world of 2"), "{err}");
    }
}
