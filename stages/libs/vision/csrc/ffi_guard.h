// Shared by the C++ shims over libtorch (this crate's onednn_shim.cpp, the trainer's
// dist_shim.cpp): an exception must never cross into Rust (it would abort the process), so
// every entry point runs its body through `guarded`, which hands the exception's text back
// through `err`, malloc'd (the Rust side frees it with the shim's free_string).
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace pcb_ffi {

inline char* copy_string(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

// Runs `f`: 0 when it returned, -1 when it threw (its message in `*err`, when `err` is set).
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

}  // namespace pcb_ffi
