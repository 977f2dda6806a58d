//! oneDNN's fused convolutions for CPU inference (`csrc/onednn_shim.cpp`): a convolution
//! and its ReLU, or a ResNet block's last convolution with the residual sum and ReLU, in one
//! primitive, on a weight packed once into oneDNN's blocked layout.
//!
//! Why: libtorch's plain `conv2d` reorders the weight into that layout on every call and
//! writes each activation once more for its ReLU and again for the sum. On the README's AMX
//! Xeon the ResNet-50 body in bf16 runs in 0.045 s instead of 0.085 this way (`stage_times`;
//! README, "oneDNN's fused kernels"), in f32 0.23 instead of 0.26. Results change by rounding
//! only (bf16: the sum is added before the output is rounded, once instead of twice). Where
//! libtorch's oneDNN refuses a kind (bf16 without AVX-512), [`runs`] says so once and the
//! plain convolutions serve.

use std::cell::OnceCell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

extern "C" {
    fn pcb_onednn_available(err: *mut *mut c_char) -> c_int;
    fn pcb_onednn_conv(
        out: *mut *mut c_void,
        sum: *mut c_void,
        x: *const c_void,
        w: *const c_void,
        b: *const c_void,
        padding: *const i64,
        stride: *const i64,
        dilation: *const i64,
        groups: i64,
        attr: *const c_char,
        err: *mut *mut c_char,
    ) -> c_int;
    fn pcb_onednn_free_string(s: *mut c_char);
}

/// A fused call that libtorch refused, with its message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("oneDNN fused convolution: {0}")]
pub struct Error(String);

/// Turns the shim's return code and error string into a result.
fn check(rc: c_int, err: *mut c_char) -> Result<(), Error> {
    if rc == 0 {
        return Ok(());
    }
    let text = if err.is_null() {
        "unknown error".to_string()
    } else {
        // SAFETY: the shim hands back a NUL-terminated malloc'd string, or null.
        let s = unsafe { CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: allocated by the shim with malloc, freed once here.
        unsafe { pcb_onednn_free_string(err) };
        s
    };
    Err(Error(text))
}

/// Whether this libtorch has the fused operators (asked once per process).
pub fn available() -> Result<(), Error> {
    static ANSWER: OnceLock<Result<(), Error>> = OnceLock::new();
    ANSWER
        .get_or_init(|| {
            let mut err = std::ptr::null_mut();
            // SAFETY: only writes `err`.
            let ok = unsafe { pcb_onednn_available(&mut err) };
            if ok == 1 {
                Ok(())
            } else {
                check(-1, err)
            }
        })
        .clone()
}

/// Whether the fused kernels run tensors of `kind` on this CPU, asked once per kind with a
/// one-pixel convolution through them: libtorch's oneDNN refuses bf16 on CPUs without
/// AVX-512 (or AVX-NE-CONVERT), where the plain path then serves.
pub fn runs(kind: Kind) -> bool {
    static F32: OnceLock<bool> = OnceLock::new();
    static BF16: OnceLock<bool> = OnceLock::new();
    let cell = match kind {
        Kind::Float => &F32,
        Kind::BFloat16 => &BF16,
        _ => return false,
    };
    *cell.get_or_init(|| {
        if available().is_err() {
            return false;
        }
        let one = Tensor::ones([1, 1, 1, 1], (kind, Device::Cpu));
        let conv = FusedConv {
            w: one.shallow_clone(),
            b: Tensor::zeros([1], (kind, Device::Cpu)),
            geometry: [[1, 1], [0, 0], [1, 1]],
            packed: OnceCell::from(None),
        };
        match conv.forward(&one, Post::Relu) {
            Ok(_) => true,
            Err(e) => {
                tracing::info!(?kind, error = %e, "oneDNN's fused kernels do not run this kind here; the plain convolutions do");
                false
            }
        }
    })
}

/// Logs the first failed fused call of the process (each falls back to the plain path).
fn log_failure(e: &Error) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::warn!(error = %e, "a fused oneDNN convolution failed; such calls run on libtorch's plain convolution");
    });
}

/// What follows the convolution inside the primitive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Post {
    /// Nothing.
    None,
    /// ReLU.
    Relu,
}

/// A stride-`stride`, square-padded convolution (folded weight and bias) run by oneDNN's
/// fused kernels. The weight is packed for the first input's shape; inputs of another shape
/// still compute correctly (oneDNN reorders the packed weight for them).
#[derive(Debug)]
pub struct FusedConv {
    /// The dense weight (packing's source).
    w: Tensor,
    /// The bias.
    b: Tensor,
    /// Stride, padding and dilation, two each as oneDNN takes them.
    geometry: [[i64; 2]; 3],
    /// The packed weight; `None` inside when packing failed (then the dense one serves).
    packed: OnceCell<Option<Tensor>>,
}

impl FusedConv {
    /// For weight `w` (`[out, in, k, k]`, f32 or bf16 on the CPU) and bias `b` of the same
    /// kind, or `None` where the fused kernels cannot run it (another device, another kind,
    /// a kind this CPU's oneDNN refuses, or a libtorch without them).
    pub fn new(w: &Tensor, b: &Tensor, stride: i64, padding: i64) -> Option<FusedConv> {
        let kind_ok = b.kind() == w.kind() && runs(w.kind());
        if w.device() != Device::Cpu || w.dim() != 4 || !kind_ok {
            return None;
        }
        Some(FusedConv {
            w: w.detach(),
            b: b.detach(),
            geometry: [[stride, stride], [padding, padding], [1, 1]],
            packed: OnceCell::new(),
        })
    }

    /// The weight to run with: packed for `x`'s shape at the first call.
    fn weight(&self, x: &Tensor) -> &Tensor {
        let packed = self.packed.get_or_init(|| {
            let [stride, padding, dilation] = self.geometry;
            let size = x.size();
            tch::no_grad(|| {
                self.w
                    .contiguous()
                    .f_to_mkldnn(None)
                    .and_then(|m| {
                        m.f_mkldnn_reorder_conv2d_weight(
                            padding,
                            stride,
                            dilation,
                            1,
                            size.as_slice(),
                        )
                    })
                    .map_err(|e| {
                        tracing::warn!(error = %e, "packing a convolution weight for oneDNN failed; it runs on the dense weight");
                    })
                    .ok()
            })
        });
        packed.as_ref().unwrap_or(&self.w)
    }

    /// Whether `x` is what this convolution runs on: its weight's kind, on the CPU.
    pub fn accepts(&self, x: &Tensor) -> bool {
        x.kind() == self.w.kind() && x.device() == Device::Cpu
    }

    /// Whether the weight has been packed (at the first call).
    pub fn is_packed(&self) -> bool {
        matches!(self.packed.get(), Some(Some(_)))
    }

    /// `post(conv(x) + b)` in one primitive.
    pub fn forward(&self, x: &Tensor, post: Post) -> Result<Tensor, Error> {
        self.call(x, None, post)
    }

    /// `other = relu(conv(x) + b + other)`, in place: `other` must be a tensor no one
    /// else reads afterwards (a fresh shortcut output), of the output's shape and kind.
    pub fn forward_add_relu_(&self, x: &Tensor, other: &mut Tensor) -> Result<(), Error> {
        self.call(x, Some(other), Post::Relu).map(drop)
    }

    /// [`FusedConv::forward`] where the caller has the plain convolution to fall back on:
    /// `None` when `x` is not of this convolution's kind, or when the call failed (the
    /// process's first failure logged).
    pub fn try_forward(&self, x: &Tensor, post: Post) -> Option<Tensor> {
        if !self.accepts(x) {
            return None;
        }
        self.forward(x, post).map_err(|e| log_failure(&e)).ok()
    }

    /// [`FusedConv::forward_add_relu_`] as [`FusedConv::try_forward`] does it.
    pub fn try_add_relu_(&self, x: &Tensor, other: &mut Tensor) -> Option<()> {
        if !self.accepts(x) {
            return None;
        }
        self.forward_add_relu_(x, other)
            .map_err(|e| log_failure(&e))
            .ok()
    }

    /// One call into the shim: plain, or with `sum` added in place before `post`.
    fn call(&self, x: &Tensor, sum: Option<&mut Tensor>, post: Post) -> Result<Tensor, Error> {
        let w = self.weight(x);
        let [stride, padding, dilation] = self.geometry;
        let attr: &CStr = match post {
            Post::None => c"none",
            Post::Relu => c"relu",
        };
        let sum = sum.map_or(std::ptr::null_mut(), |t| t.as_mut_ptr().cast());
        let mut out = std::ptr::null_mut();
        let mut err = std::ptr::null_mut();
        // SAFETY: every tensor pointer is a live tch tensor borrowed for the call (`sum`
        // mutably, for the in-place write); the arrays hold two values each, as the shim
        // reads; on success `out` is a fresh `at::Tensor*` whose ownership passes to the
        // returned Tensor.
        let rc = unsafe {
            pcb_onednn_conv(
                &mut out,
                sum,
                x.as_ptr().cast(),
                w.as_ptr().cast(),
                self.b.as_ptr().cast(),
                padding.as_ptr(),
                stride.as_ptr(),
                dilation.as_ptr(),
                1,
                attr.as_ptr(),
                &mut err,
            )
        };
        check(rc, err)?;
        // SAFETY: see above; non-null on success.
        Ok(unsafe { Tensor::from_ptr(out.cast()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Tensor, b: &Tensor, tol: f64) {
        let d = (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        let m = b.to_kind(Kind::Float).abs().max().double_value(&[]);
        assert!(d <= tol * m.max(1.0), "max |diff| {d} against max |b| {m}");
    }

    fn nhwc(t: Tensor) -> Tensor {
        crate::resnet::to_channels_last(&t)
    }

    #[test]
    fn fused_convolutions_match_libtorchs_plain_ones_in_f32_and_bf16() {
        available().expect("this libtorch has the fused operators");
        assert!(runs(Kind::Float), "oneDNN runs f32 on every x86 CPU");
        tch::manual_seed(3);
        for kind in [Kind::Float, Kind::BFloat16] {
            let w = Tensor::ones([4, 2, 3, 3], (kind, Device::Cpu));
            let b = Tensor::zeros([4], (kind, Device::Cpu));
            if !runs(kind) {
                // bf16 where this CPU's oneDNN refuses it: nothing is built, the plain
                // convolution serves.
                assert!(FusedConv::new(&w, &b, 1, 1).is_none());
                continue;
            }
            let tol = if kind == Kind::Float { 1e-5 } else { 2e-2 };
            for (stride, padding, k) in [(1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 0, 1), (2, 3, 7)] {
                let x =
                    nhwc(Tensor::randn([2, 8, 19, 23], (Kind::Float, Device::Cpu))).to_kind(kind);
                let w = nhwc(Tensor::randn([16, 8, k, k], (Kind::Float, Device::Cpu)) * 0.2)
                    .to_kind(kind);
                let b = Tensor::randn([16], (Kind::Float, Device::Cpu)).to_kind(kind);
                let plain = x.conv2d(
                    &w,
                    Some(&b),
                    [stride, stride],
                    [padding, padding],
                    [1, 1],
                    1,
                );
                let conv = FusedConv::new(&w, &b, stride, padding).expect("fusable");
                assert!(!conv.is_packed());
                close(&conv.forward(&x, Post::None).unwrap(), &plain, tol);
                assert!(conv.is_packed(), "packed at the first call");
                close(&conv.forward(&x, Post::Relu).unwrap(), &plain.relu(), tol);
                // A second shape after packing for the first still computes correctly.
                let x2 =
                    nhwc(Tensor::randn([1, 8, 11, 9], (Kind::Float, Device::Cpu))).to_kind(kind);
                let plain2 = x2.conv2d(
                    &w,
                    Some(&b),
                    [stride, stride],
                    [padding, padding],
                    [1, 1],
                    1,
                );
                close(&conv.forward(&x2, Post::Relu).unwrap(), &plain2.relu(), tol);
                // The residual sum, in place into the shortcut.
                let shortcut = nhwc(plain.randn_like());
                let mut other = shortcut.copy();
                conv.forward_add_relu_(&x, &mut other).unwrap();
                close(&other, &(&plain + &shortcut).relu(), tol);
            }
        }
    }

    #[test]
    fn what_cannot_be_fused_is_refused_up_front_and_a_bad_call_is_an_error() {
        let w = Tensor::randn([4, 2, 3, 3], (Kind::Float, Device::Cpu));
        let b = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        assert!(FusedConv::new(&w.to_kind(Kind::Double), &b.to_kind(Kind::Double), 1, 1).is_none());
        assert!(FusedConv::new(&w, &b.to_kind(Kind::BFloat16), 1, 1).is_none());
        let conv = FusedConv::new(&w, &b, 1, 1).expect("fusable");
        // Three input channels against a weight for two: libtorch's message, not a crash.
        let x = Tensor::randn([1, 3, 8, 8], (Kind::Float, Device::Cpu));
        let e = conv.forward(&x, Post::Relu).unwrap_err();
        assert!(
            e.to_string().starts_with("oneDNN fused convolution: "),
            "{e}"
        );
    }
}
