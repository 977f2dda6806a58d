// C ABI over libtorch's own c10d: a TCPStore for the rendezvous and a process group for
// the collectives. Compiled twice from this one source: with Gloo into the trainer itself
// (entry points pcb_dist_*), and with PCB_BACKEND_NCCL into libpcb_nccl.so (pcb_nccl_*),
// which links libtorch_cuda.so and is opened at run time only on GPUs, so the trainer
// binary still starts where there is no CUDA. Every entry point runs through `guarded`
// (stages/libs/vision/csrc/ffi_guard.h): a C++ exception comes back as text in `err`
// (malloc'd; the caller frees it with pcb_dist_free_string), since one crossing into Rust
// would abort the process.

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#if defined(PCB_BACKEND_NCCL)
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#define PCB_FN(name) pcb_nccl_##name
#else
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#define PCB_FN(name) pcb_dist_##name
#endif

// Quoted and relative, so that deploy/build-nccl-shim.sh needs no include flag for it.
#include "../../libs/vision/csrc/ffi_guard.h"

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> pg;
  std::chrono::milliseconds timeout;
};

using pcb_ffi::copy_string;
using pcb_ffi::guarded;

std::vector<at::Tensor> tensors_of(at::Tensor** ptrs, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*ptrs[i]);
  return out;
}

// libtorch's flight recorder is one per process, and its record() registers a group in a
// std::map before taking its own lock, so two groups issuing collectives at once (ranks as
// threads of one process, as in the unit tests) corrupt that map and crash. Issuing
// under one process-wide lock closes that race. Only issuing: a collective's wait, and
// a group's construction, block on the peers.
std::mutex& issue_mutex() {
  static std::mutex m;
  return m;
}

void wait_all(std::vector<c10::intrusive_ptr<c10d::Work>>& works,
              std::chrono::milliseconds timeout) {
  for (auto& w : works) w->wait(timeout);
}

#if defined(PCB_BACKEND_NCCL)
c10::intrusive_ptr<c10d::Backend> make_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                               const std::string&, int rank, int world,
                                               int device,
                                               std::chrono::milliseconds timeout) {
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
  // Without blocking wait, Work::wait only orders the CUDA streams and a dead peer is
  // noticed by the watchdog aborting the process; with it, wait throws after the
  // timeout, which the trainer turns into an error naming the lost peer.
  setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
}
#else
c10::intrusive_ptr<c10d::Backend> make_backend(const c10::intrusive_ptr<c10d::Store>& store,
                                               const std::string& host, int rank, int world,
                                               int, std::chrono::milliseconds timeout) {
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
}
#endif

}  // namespace

extern "C" {

// Joins (rank 0: hosts) the store at host:port and builds the process group over it.
// `timeout_ms` bounds the rendezvous and every later collective; `device` is the CUDA
// device of this rank (NCCL only). `listen_fd` (rank 0, or -1) is a socket the caller
// bound to the master address and listens on: the store takes it over, so it is reachable
// on that address only (c10d would otherwise listen on every interface).
void* PCB_FN(init)(const char* host, int port, int rank, int world, int device,
                   long long timeout_ms, const char* prefix, int listen_fd, char** err) {
  Group* group = nullptr;
  int rc = guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = rank == 0;
    opts.numWorkers = world;
    opts.waitWorkers = true;
    opts.timeout = timeout;
    if (rank == 0 && listen_fd >= 0) opts.masterListenFd = listen_fd;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    // Not under issue_mutex: construction waits for the peers to connect, and a peer
    // that is a thread of this process would need that lock to get there.
    auto pg = make_backend(store, std::string(host), rank, world, device, timeout);
    group = new Group{store, pg, timeout};
  });
  return rc == 0 ? group : nullptr;
}

void PCB_FN(free)(void* handle) {
  auto* g = static_cast<Group*>(handle);
  // NCCL wants its communicators shut down before the group goes (else it warns and
  // aborts them); Gloo's shutdown does nothing.
  try {
    g->pg->shutdown();
  } catch (...) {
  }
  delete g;
}

void PCB_FN(free_string)(char* s) { std::free(s); }

// Sums each tensor across ranks, in place. The tensors are reduced as separate
// collectives issued together, so buckets travel while later ones are queued.
int PCB_FN(allreduce_sum)(void* handle, at::Tensor** tensors, int n, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    {
      std::lock_guard<std::mutex> issuing(issue_mutex());
      for (auto& t : tensors_of(tensors, n)) {
        std::vector<at::Tensor> one{t};
        works.push_back(g->pg->allreduce(one));
      }
    }
    wait_all(works, g->timeout);
  });
}

// Overwrites each tensor with rank `root`'s copy.
int PCB_FN(broadcast)(void* handle, at::Tensor** tensors, int n, int root, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    {
      std::lock_guard<std::mutex> issuing(issue_mutex());
      for (auto& t : tensors_of(tensors, n)) {
        std::vector<at::Tensor> one{t};
        works.push_back(g->pg->broadcast(one, opts));
      }
    }
    wait_all(works, g->timeout);
  });
}

int PCB_FN(barrier)(void* handle, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    c10::intrusive_ptr<c10d::Work> work;
    {
      std::lock_guard<std::mutex> issuing(issue_mutex());
      work = g->pg->barrier();
    }
    work->wait(g->timeout);
  });
}

int PCB_FN(store_set)(void* handle, const char* key, const unsigned char* value,
                       size_t len, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    std::vector<uint8_t> v(value, value + len);
    g->store->set(std::string(key), v);
  });
}

// Blocks until the key exists (up to the group's timeout); the value is malloc'd.
int PCB_FN(store_get)(void* handle, const char* key, unsigned char** value,
                       size_t* len, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    auto v = g->store->get(std::string(key));
    *len = v.size();
    *value = static_cast<unsigned char*>(std::malloc(v.size() == 0 ? 1 : v.size()));
    if (*value == nullptr) throw std::runtime_error("out of memory");
    if (!v.empty()) std::memcpy(*value, v.data(), v.size());
  });
}

// Whether the key exists, without waiting.
int PCB_FN(store_check)(void* handle, const char* key, int* exists, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    *exists = g->store->check({std::string(key)}) ? 1 : 0;
  });
}

}  // extern "C"
