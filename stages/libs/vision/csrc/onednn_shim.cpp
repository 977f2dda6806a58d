// C ABI over libtorch's fused oneDNN convolutions (the `mkldnn::_convolution_pointwise`
// operators that torch.compile's CPU backend emits): a convolution with its ReLU, or with a
// residual sum and ReLU, in one oneDNN primitive, on a weight packed once into oneDNN's own
// layout. tch binds only the ATen namespace, so these go through the dispatcher, boxed (the
// cost is nothing beside a convolution, and a boxed call does not depend on how this libtorch
// spells the C++ types of the schema). Every entry point runs through `guarded` (ffi_guard.h):
// a C++ exception comes back as text in `err` (the caller frees it with
// pcb_onednn_free_string).

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include "ffi_guard.h"

namespace {

using pcb_ffi::guarded;

std::vector<int64_t> ints(const int64_t* p) { return {p[0], p[1]}; }

c10::IValue optional_tensor(const at::Tensor* t) {
  return t == nullptr ? c10::IValue() : c10::IValue(*t);
}

// The arguments both overloads share after their tensors: bias, geometry, groups.
void push_geometry(torch::jit::Stack& s, const at::Tensor* b, const int64_t* padding,
                   const int64_t* stride, const int64_t* dilation, int64_t groups) {
  s.emplace_back(optional_tensor(b));
  s.emplace_back(ints(padding));
  s.emplace_back(ints(stride));
  s.emplace_back(ints(dilation));
  s.emplace_back(groups);
}

}  // namespace

extern "C" {

void pcb_onednn_free_string(char* s) { std::free(s); }

// 1 when this libtorch has the fused operators (built with oneDNN), else 0 and `err` says
// why.
int pcb_onednn_available(char** err) {
  int rc = guarded(err, [&] {
    if (!at::hasMKLDNN()) throw std::runtime_error("this libtorch was built without oneDNN");
    c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
    c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise_", "binary");
  });
  return rc == 0 ? 1 : 0;
}

// out = attr(conv(x, w) + b), attr "none" or "relu"; with `sum` (else null), in place:
// *sum = attr(conv(x, w) + b + *sum), the residual sum of a ResNet block, and `out` the same
// tensor. `w` dense or packed (aten::mkldnn_reorder_conv2d_weight); padding, stride,
// dilation: two each.
int pcb_onednn_conv(at::Tensor** out, at::Tensor* sum, const at::Tensor* x,
                    const at::Tensor* w, const at::Tensor* b, const int64_t* padding,
                    const int64_t* stride, const int64_t* dilation, int64_t groups,
                    const char* attr, char** err) {
  return guarded(err, [&] {
    static const c10::OperatorHandle plain =
        c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_convolution_pointwise", "");
    static const c10::OperatorHandle binary = c10::Dispatcher::singleton().findSchemaOrThrow(
        "mkldnn::_convolution_pointwise_", "binary");
    torch::jit::Stack s;
    if (sum != nullptr) s.emplace_back(*sum);
    s.emplace_back(*x);
    s.emplace_back(*w);
    push_geometry(s, b, padding, stride, dilation, groups);
    if (sum != nullptr) {
      s.emplace_back(std::string("add"));
      s.emplace_back(at::Scalar(1.0));
    }
    s.emplace_back(std::string(attr));
    s.emplace_back(c10::List<std::optional<at::Scalar>>());
    s.emplace_back(c10::IValue());
    (sum != nullptr ? binary : plain).callBoxed(&s);
    *out = new at::Tensor(s.at(0).toTensor());
  });
}

}  // extern "C"
