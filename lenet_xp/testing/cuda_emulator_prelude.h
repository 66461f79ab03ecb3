// What CUDA provides to a kernel source, for running it on the CPU (lenet_xp/testing/cuda_emulator.py).
//
// The emulator compiles `prelude + kernel source + generated launch wrappers` with g++ into
// a shared library. A launch runs the grid's blocks one after another (so `__shared__`
// variables can be function-local statics: one block uses them at a time):
//   - a kernel without __syncthreads runs its threads one after another on the caller's
//     thread (emu::launch_sequential);
//   - a kernel with __syncthreads runs each block's threads as coroutines on the caller's
//     thread (emu::launch_threaded): every CUDA thread has its own stack, __syncthreads()
//     switches to the next thread, and once every thread of the block waits at the barrier
//     they all go on (exact barrier semantics, deterministic order, no OS threads).
// A fault in kernel code (SIGSEGV / SIGBUS / SIGFPE, a coroutine's stack overflow included)
// or a C++ exception ends the launch with an error code and a message instead of killing
// the process.
#pragma once

// glibc's _FORTIFY_SOURCE turns _longjmp into __longjmp_chk, which aborts on a jump to a
// lower stack (the scheduler resuming a coroutine): coroutines need the plain one.
#undef _FORTIFY_SOURCE

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

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
    // SA_ONSTACK: a coroutine whose stack overflowed faults on its guard pages, and
    // the handler must run elsewhere (launch_threaded installs an alternate stack).
    action.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
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

// -- threaded launches: a block's threads as coroutines on the calling thread ---------------
// Each CUDA thread of the block is a coroutine with its own stack (kStackBytes, guard pages
// below it). It is entered the first time with setcontext (makecontext'd onto its stack);
// after that every switch is a _setjmp/_longjmp pair, which, unlike swapcontext, makes no
// system call. The scheduler runs the block in rounds: it resumes every thread in turn
// (x fastest); each runs until it reaches __syncthreads() (waiting) or returns from the
// kernel (done). A round that ends with every thread waiting starts the next one; with every
// thread done the block is over; a mix (some returned while others wait at a barrier: a
// deadlock, or undefined behaviour, on a GPU) fails the launch. Coroutines are reused for
// every block of the launch; their stacks are kept for the next launch (stack_pool).
constexpr size_t kStackBytes = 256 * 1024;  // per CUDA thread; CUDA's default is 1 KiB
constexpr size_t kGuardBytes = 64 * 1024;   // inaccessible, below each stack
constexpr size_t kAltStackBytes = 64 * 1024;

enum CoroutineState : int { kRunnable, kWaiting, kDone };

struct Coroutine {
  jmp_buf context;   // where it goes on (valid once started)
  ucontext_t entry;  // its first entry: coroutine_main on its own stack
  bool started = false;
  int state = kRunnable;
  dim3 thread;
};

struct Scheduler {
  jmp_buf context;  // where a coroutine switches back to
  Coroutine* current = nullptr;
  void (*body)(void*) = nullptr;  // runs the kernel for the current threadIdx / blockIdx
  void* kernel = nullptr;
  bool failed = false;  // a C++ exception escaped the kernel: message says which
  std::string message;
};

// The scheduler of the threaded launch running on this thread (nullptr outside one).
inline thread_local Scheduler* scheduler = nullptr;

// Suspend the current coroutine; returns when the scheduler resumes it.
[[gnu::noinline]] inline void switch_to_scheduler() {
  Scheduler* s = scheduler;
  if (_setjmp(s->current->context) == 0) _longjmp(s->context, 1);
}

// Every coroutine's whole life: the kernel once per block, until the launch ends.
inline void coroutine_main() {
  for (;;) {
    Scheduler* s = scheduler;
    Coroutine* self = s->current;
    try {
      s->body(s->kernel);
    } catch (const std::exception& exc) {
      s->failed = true;
      s->message = exc.what();
    } catch (...) {
      s->failed = true;
      s->message = "a C++ exception that is not a std::exception";
    }
    self->state = kDone;
    switch_to_scheduler();
  }
}

// Run coroutine c until it reaches __syncthreads() or returns from the kernel.
[[gnu::noinline]] inline void resume(Scheduler& s, Coroutine& c) {
  s.current = &c;
  threadIdx = c.thread;
  c.state = kRunnable;
  if (_setjmp(s.context) == 0) {
    if (c.started) _longjmp(c.context, 1);
    c.started = true;
    setcontext(&c.entry);
  }
}

// The coroutines' stacks: one mapping, [guard | stack] per thread; unmapped on destruction.
struct Stacks {
  char* base = nullptr;
  size_t total = 0;
  size_t count = 0;
  explicit Stacks(size_t n) : count(n) {
    total = n * (kGuardBytes + kStackBytes);
    void* p = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap failed for the coroutine stacks");
    base = static_cast<char*>(p);
    for (size_t i = 0; i < n; ++i)
      if (mprotect(stack(i), kStackBytes, PROT_READ | PROT_WRITE) != 0) {
        munmap(base, total);
        throw std::runtime_error("mprotect failed for the coroutine stacks");
      }
  }
  ~Stacks() { munmap(base, total); }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  char* stack(size_t i) const { return base + i * (kGuardBytes + kStackBytes) + kGuardBytes; }
  bool in_guard(long long address) const {
    const char* a = reinterpret_cast<const char*>((intptr_t)address);
    if (a < base || a >= base + total) return false;
    return (size_t)(a - base) % (kGuardBytes + kStackBytes) < kGuardBytes;
  }
};

// The stacks of the largest block so far, kept for the library's lifetime: mapping,
// protecting and first touching them costs more than a small launch (2-4 ms for 256).
// A launch that ends early (fault, error) leaves frames on them that the next one overwrites.
inline std::optional<Stacks> stack_pool;

inline Stacks& stacks_for(size_t n) {
  if (!stack_pool || stack_pool->count < n) {
    stack_pool.reset();
    stack_pool.emplace(n);
  }
  return *stack_pool;
}

// An alternate signal stack while it lives (the fault handler cannot run on an overflowed
// coroutine stack); the previous one is restored.
struct AltStack {
  std::vector<char> memory;
  stack_t previous{};
  bool installed = false;
  AltStack() : memory(kAltStackBytes) {
    stack_t ss{};
    ss.ss_sp = memory.data();
    ss.ss_size = memory.size();
    ss.ss_flags = 0;
    installed = sigaltstack(&ss, &previous) == 0;
  }
  ~AltStack() {
    if (installed) sigaltstack(&previous, nullptr);
  }
  AltStack(const AltStack&) = delete;
  AltStack& operator=(const AltStack&) = delete;
};

// Every block in order; each block's blockDim threads as coroutines (see above).
template <typename F>
int launch_threaded(const unsigned* dims, F&& kernel, char* err, int errlen, FaultInfo* info) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  gridDim = dim3(dims[0], dims[1], dims[2]);
  blockDim = dim3(dims[3], dims[4], dims[5]);
  const unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
  using Kernel = std::remove_reference_t<F>;

  Stacks* stacks = nullptr;
  std::vector<Coroutine> coroutines;
  try {
    stacks = &stacks_for(nthreads);
    coroutines.resize(nthreads);
  } catch (const std::exception& exc) {
    info->kind = 1;
    write_message(err, errlen, std::string("could not set up the block's threads: ") + exc.what());
    return 1;
  }
  for (unsigned t = 0; t < nthreads; ++t) {
    Coroutine& c = coroutines[t];
    c.thread = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y,
                    t / (blockDim.x * blockDim.y));
    getcontext(&c.entry);
    c.entry.uc_stack.ss_sp = stacks->stack(t);
    c.entry.uc_stack.ss_size = kStackBytes;
    c.entry.uc_link = nullptr;  // coroutine_main never returns
    makecontext(&c.entry, coroutine_main, 0);
  }
  Scheduler sched;
  sched.body = [](void* k) { (*static_cast<Kernel*>(k))(); };
  sched.kernel = const_cast<void*>(static_cast<const void*>(&kernel));

  SignalGuard guard;
  AltStack alt_stack;
  sigjmp_buf jump;
  int status = 0;
  fault_jump = &jump;
  scheduler = &sched;
  if (sigsetjmp(jump, 1) == 0) {
    for (unsigned bz = 0; bz < gridDim.z && status == 0; ++bz)
      for (unsigned by = 0; by < gridDim.y && status == 0; ++by)
        for (unsigned bx = 0; bx < gridDim.x && status == 0; ++bx) {
          blockIdx = dim3(bx, by, bz);
          for (;;) {  // rounds: from one barrier of the block to the next
            unsigned waiting = 0;
            const Coroutine* returned = nullptr;
            for (Coroutine& c : coroutines) {
              resume(sched, c);
              if (sched.failed) {
                info->kind = 1;
                record_position(info);
                write_message(err, errlen, sched.message);
                status = 1;
                break;
              }
              if (c.state == kWaiting)
                ++waiting;
              else if (returned == nullptr)
                returned = &c;
            }
            if (status != 0 || waiting == 0) break;  // failed, or the block is done
            if (returned != nullptr) {
              threadIdx = returned->thread;
              info->kind = 1;
              record_position(info);
              write_message(err, errlen,
                            "returned from the kernel while " + std::to_string(waiting) +
                                " of the block's " + std::to_string(nthreads) +
                                " threads wait at __syncthreads() (every thread of a block "
                                "must reach each barrier)");
              status = 1;
              break;
            }
          }
        }
  } else {
    info->kind = 2;
    info->signal = fault_signal;
    info->address = fault_address;
    record_position(info);
    std::string text = strsignal((int)fault_signal);
    if (stacks->in_guard(fault_address))
      text += " (stack overflow: a thread's stack is " + std::to_string(kStackBytes / 1024) +
              " KiB)";
    write_message(err, errlen, text);
    status = 2;
  }
  scheduler = nullptr;
  fault_jump = nullptr;
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
  if (emu::scheduler == nullptr)
    throw emu::UsageError(
        "__syncthreads() called in a kernel run sequentially (the emulator found no "
        "__syncthreads in its body; call it there, not only in a device function)");
  emu::scheduler->current->state = emu::kWaiting;
  emu::switch_to_scheduler();
}
