// What CUDA provides to a kernel source, for running it on the CPU (tests/cuda_emulator.py).
//
// The emulator compiles `prelude + kernel source + generated launch wrappers` with g++ into
// a shared library. A launch runs the grid's blocks one after another (so `__shared__`
// variables can be function-local statics: one block uses them at a time):
//   - a kernel without __syncthreads runs its threads one after another on the caller's
//     thread (emu::launch_sequential);
//   - a kernel with __syncthreads runs blockDim threads as std::threads, created once per
//     launch, which walk the blocks together with a barrier between blocks
//     (emu::launch_threaded); __syncthreads is a std::barrier over the block's threads.
// A fault in kernel code (SIGSEGV / SIGBUS / SIGFPE) or a C++ exception ends the launch with
// an error code and a message instead of killing the process.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// -- launch geometry ---------------------------------------------------------------------
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

// -- qualifiers --------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// One block of a launch runs at a time, so a function-local static is the block's memory.
#define __shared__ static

// -- math (float and double overloads, as CUDA's C++ math API) ------------------------------
using std::ceil;
using std::exp;
using std::fabs;
using std::floor;
using std::fmax;
using std::fmin;
using std::isinf;
using std::isnan;
using std::log;
using std::nan;
using std::pow;
using std::sqrt;
using std::tanh;
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// min / max of CUDA's integer and floating overloads: the usual arithmetic conversions.
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return (C)b < (C)a ? (C)b : (C)a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return (C)a < (C)b ? (C)b : (C)a;
}

// -- emulator runtime --------------------------------------------------------------------
namespace emu {

// Filled by a launch that fails: what the Python side reports.
struct FaultInfo {
  long long kind;     // 0 none, 1 C++ exception / usage error, 2 signal
  long long signal;   // SIGSEGV, SIGBUS, SIGFPE
  long long address;  // faulting address (si_addr)
  long long block[3];
  long long thread[3];
};

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local sigjmp_buf* fault_jump = nullptr;
inline thread_local long long fault_signal = 0;
inline thread_local long long fault_address = 0;
inline std::mutex launch_mutex;  // one launch at a time per library (blockDim, gridDim, statics)

constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGFPE};
inline struct sigaction saved_actions[3];

inline void on_fault(int sig, siginfo_t* info, void*) {
  if (fault_jump == nullptr) {
    // Not a kernel thread of ours: hand the signal to whoever handled it before.
    for (int i = 0; i < 3; ++i)
      if (kSignals[i] == sig) sigaction(sig, &saved_actions[i], nullptr);
    return;  // the instruction faults again and goes to the previous handler
  }
  fault_signal = sig;
  fault_address = (long long)(intptr_t)info->si_addr;
  siglongjmp(*fault_jump, 1);
}

struct SignalGuard {
  SignalGuard() {
    struct sigaction action;
    std::memset(&action, 0, sizeof action);
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &action, &saved_actions[i]);
  }
  ~SignalGuard() {
    for (int i = 0; i < 3; ++i) sigaction(kSignals[i], &saved_actions[i], nullptr);
  }
};

inline void record_position(FaultInfo* info) {
  info->block[0] = blockIdx.x, info->block[1] = blockIdx.y, info->block[2] = blockIdx.z;
  info->thread[0] = threadIdx.x, info->thread[1] = threadIdx.y, info->thread[2] = threadIdx.z;
}

inline void write_message(char* err, int errlen, const std::string& text) {
  if (err && errlen > 0) {
    std::strncpy(err, text.c_str(), (size_t)errlen - 1);
    err[errlen - 1] = '\0';
  }
}

// Every thread of every block on the calling thread, in order (x fastest).
template <typename F>
int launch_sequential(const unsigned* dims, F&& kernel, char* err, int errlen,
                      FaultInfo* info) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  gridDim = dim3(dims[0], dims[1], dims[2]);
  blockDim = dim3(dims[3], dims[4], dims[5]);
  SignalGuard guard;
  sigjmp_buf jump;
  int status = 0;
  fault_jump = &jump;
  if (sigsetjmp(jump, 1) == 0) {
    try {
      for (unsigned bz = 0; bz < gridDim.z; ++bz)
        for (unsigned by = 0; by < gridDim.y; ++by)
          for (unsigned bx = 0; bx < gridDim.x; ++bx) {
            blockIdx = dim3(bx, by, bz);
            for (unsigned tz = 0; tz < blockDim.z; ++tz)
              for (unsigned ty = 0; ty < blockDim.y; ++ty)
                for (unsigned tx = 0; tx < blockDim.x; ++tx) {
                  threadIdx = dim3(tx, ty, tz);
                  kernel();
                }
          }
    } catch (const std::exception& exc) {
      info->kind = 1;
      record_position(info);
      write_message(err, errlen, exc.what());
      status = 1;
    }
  } else {
    info->kind = 2;
    info->signal = fault_signal;
    info->address = fault_address;
    record_position(info);
    write_message(err, errlen, strsignal((int)fault_signal));
    status = 2;
  }
  fault_jump = nullptr;
  return status;
}

// blockDim threads as std::threads, created once; they walk the blocks together with a
// barrier after each block (so no thread starts block b+1 while another is still in b and
// the block's __shared__ statics are in use). __syncthreads() is the same barrier.
template <typename F>
int launch_threaded(const unsigned* dims, F&& kernel, char* err, int errlen, FaultInfo* info) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  gridDim = dim3(dims[0], dims[1], dims[2]);
  blockDim = dim3(dims[3], dims[4], dims[5]);
  const unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
  std::barrier<> barrier((std::ptrdiff_t)nthreads);
  std::atomic<bool> aborted{false};
  std::atomic<int> gate{0};  // 0 wait, 1 run, 2 give up (thread creation failed)
  std::mutex error_mutex;
  int status = 0;

  auto fail = [&](int kind, const std::string& text) {
    std::lock_guard<std::mutex> hold(error_mutex);
    if (status == 0) {
      status = kind;
      info->kind = kind;
      info->signal = fault_signal;
      info->address = fault_address;
      record_position(info);
      write_message(err, errlen, text);
    }
    aborted.store(true);
  };

  auto worker = [&](unsigned t) {
    gate.wait(0);
    if (gate.load() != 1) return;
    threadIdx = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y,
                     t / (blockDim.x * blockDim.y));
    block_barrier = &barrier;
    sigjmp_buf jump;
    fault_jump = &jump;
    if (sigsetjmp(jump, 1) != 0) {
      fault_jump = nullptr;
      fail(2, strsignal((int)fault_signal));
      block_barrier = nullptr;
      barrier.arrive_and_drop();  // the others go on without this thread, then stop
      return;
    }
    try {
      for (unsigned bz = 0; bz < gridDim.z; ++bz)
        for (unsigned by = 0; by < gridDim.y; ++by)
          for (unsigned bx = 0; bx < gridDim.x; ++bx) {
            blockIdx = dim3(bx, by, bz);
            kernel();
            barrier.arrive_and_wait();
            if (aborted.load()) goto done;
          }
    } catch (const std::exception& exc) {
      fault_jump = nullptr;
      fail(1, exc.what());
      block_barrier = nullptr;
      barrier.arrive_and_drop();
      return;
    }
  done:
    fault_jump = nullptr;
    block_barrier = nullptr;
  };

  SignalGuard guard;
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  try {
    for (unsigned t = 0; t < nthreads; ++t) threads.emplace_back(worker, t);
  } catch (const std::exception& exc) {
    gate.store(2);
    gate.notify_all();
    for (auto& thread : threads) thread.join();
    info->kind = 1;
    write_message(err, errlen,
                  std::string("could not start the block's threads: ") + exc.what());
    return 1;
  }
  gate.store(1);
  gate.notify_all();
  for (auto& thread : threads) thread.join();
  return status;
}

// The value of kernel argument i: args[i] points at it (CUDA's kernelParams convention).
template <typename P>
inline P arg(void** args, int i) {
  return *static_cast<P*>(args[i]);
}

}  // namespace emu

// A barrier over the block's threads; outside a threaded launch it is an error (the
// emulator decided from the kernel's text that it needs none).
inline void __syncthreads() {
  if (emu::block_barrier == nullptr)
    throw emu::UsageError(
        "__syncthreads() called in a kernel run sequentially (the emulator found no "
        "__syncthreads in its body; call it there, not only in a device function)");
  emu::block_barrier->arrive_and_wait();
}
