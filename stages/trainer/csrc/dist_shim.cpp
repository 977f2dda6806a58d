// C ABI over libtorch's own c10d: a TCPStore for the rendezvous and a ProcessGroupGloo
// for the collectives. Every entry point catches every C++ exception and hands its text
// back through `err` (malloc'd; the caller frees it with pcb_dist_free_string), because
// an exception crossing into Rust would abort the process.

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  std::chrono::milliseconds timeout;
};

char* copy_string(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

template <typename F>
int guarded(char** err, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    if (err != nullptr) *err = copy_string(e.what());
  } catch (...) {
    if (err != nullptr) *err = copy_string("unknown C++ exception");
  }
  return -1;
}

std::vector<at::Tensor> tensors_of(at::Tensor** ptrs, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*ptrs[i]);
  return out;
}

void wait_all(std::vector<c10::intrusive_ptr<c10d::Work>>& works,
              std::chrono::milliseconds timeout) {
  for (auto& w : works) w->wait(timeout);
}

}  // namespace

extern "C" {

// Joins (rank 0: hosts) the store at host:port and builds the Gloo group over it.
// `timeout_ms` bounds the rendezvous and every later collective.
void* pcb_dist_init(const char* host, int port, int rank, int world,
                    long long timeout_ms, const char* prefix, char** err) {
  Group* group = nullptr;
  int rc = guarded(err, [&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = rank == 0;
    opts.numWorkers = world;
    opts.waitWorkers = true;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto options = c10d::ProcessGroupGloo::Options::create(timeout);
    options->devices.push_back(
        c10d::ProcessGroupGloo::createDeviceForHostname(std::string(host)));
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    group = new Group{store, pg, timeout};
  });
  return rc == 0 ? group : nullptr;
}

void pcb_dist_free(void* handle) {
  delete static_cast<Group*>(handle);
}

void pcb_dist_free_string(char* s) { std::free(s); }

// Sums each tensor across ranks, in place. The tensors are reduced as separate
// collectives issued together, so buckets travel while later ones are queued.
int pcb_dist_allreduce_sum(void* handle, at::Tensor** tensors, int n, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (auto& t : tensors_of(tensors, n)) {
      std::vector<at::Tensor> one{t};
      works.push_back(g->pg->allreduce(one));
    }
    wait_all(works, g->timeout);
  });
}

// Overwrites each tensor with rank `root`'s copy.
int pcb_dist_broadcast(void* handle, at::Tensor** tensors, int n, int root, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    for (auto& t : tensors_of(tensors, n)) {
      std::vector<at::Tensor> one{t};
      works.push_back(g->pg->broadcast(one, opts));
    }
    wait_all(works, g->timeout);
  });
}

int pcb_dist_barrier(void* handle, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    auto work = g->pg->barrier();
    work->wait(g->timeout);
  });
}

int pcb_dist_store_set(void* handle, const char* key, const unsigned char* value,
                       size_t len, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    std::vector<uint8_t> v(value, value + len);
    g->store->set(std::string(key), v);
  });
}

// Blocks until the key exists (up to the group's timeout); the value is malloc'd.
int pcb_dist_store_get(void* handle, const char* key, unsigned char** value,
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
int pcb_dist_store_check(void* handle, const char* key, int* exists, char** err) {
  return guarded(err, [&] {
    auto* g = static_cast<Group*>(handle);
    *exists = g->store->check({std::string(key)}) ? 1 : 0;
  });
}

}  // extern "C"
