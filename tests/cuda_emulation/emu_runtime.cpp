// Fiber scheduler of the CUDA emulation (see include/emu_runtime.h).
#include "emu_runtime.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace emu {

dim3 thread_idx, block_idx, block_dim, grid_dim;
cudaError_t last_error = cudaSuccess;
long long launches = 0;

namespace {

constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  dim3 tid;
  bool done = false;
};

std::vector<Fiber> fibers;
ucontext_t scheduler;
int current = 0;
int nthreads = 0;
const std::function<void()>* body = nullptr;
unsigned long long events = 0;  // barrier arrivals and finished threads: progress

// Block barrier: a generation count. Warp barriers: one per warp.
int block_arrived = 0;
unsigned long long block_generation = 0;
std::vector<int> warp_arrived;
std::vector<unsigned long long> warp_generation;
std::vector<unsigned char> warp_buffer;

// Deferred cp.async copies per thread: (group, dst, src, bytes); group -1 = not committed.
struct AsyncCopy {
  long long group;
  void* dst;
  const void* src;
  int bytes;
};
std::vector<std::vector<AsyncCopy>> async_copies;
std::vector<long long> async_groups;  // groups committed so far, per thread

void yield() { swapcontext(&fibers[current].ctx, &scheduler); }

void fiber_main() {
  (*body)();
  fibers[current].done = true;
  ++events;
}  // returns to `scheduler` through uc_link

void wait_at(int& arrived, unsigned long long& generation, int members) {
  ++events;
  const unsigned long long mine = generation;
  if (++arrived == members) {
    arrived = 0;
    ++generation;
    return;
  }
  while (generation == mine) yield();
}

}  // namespace

void misaligned_access(const void* p, const char* file, int line) {
  std::fprintf(stderr, "emu: misaligned 16-byte access to %p at %s:%d (faults on a GPU)\n", p,
               file, line);
  std::abort();
}

void cp_async(void* dst, const void* src, int bytes) {
  const int t = linear_thread();
  async_copies[t].push_back({-1, dst, src, bytes});
  std::memset(dst, 0xff, bytes);  // NaN until the wait that covers it
}

void cp_async_commit() {
  const int t = linear_thread();
  for (AsyncCopy& c : async_copies[t])
    if (c.group < 0) c.group = async_groups[t];
  ++async_groups[t];
}

void cp_async_wait(int pending_groups_allowed) {
  const int t = linear_thread();
  const long long done_below = async_groups[t] - pending_groups_allowed;
  std::vector<AsyncCopy> rest;
  for (const AsyncCopy& c : async_copies[t]) {
    if (c.group >= 0 && c.group < done_below)
      std::memcpy(c.dst, c.src, c.bytes);
    else
      rest.push_back(c);
  }
  async_copies[t].swap(rest);
}

int linear_thread() {
  return static_cast<int>(thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z));
}

void sync_block() { wait_at(block_arrived, block_generation, nthreads); }

void sync_warp() {
  const int w = linear_thread() >> 5;
  const int members = std::min(32, nthreads - 32 * w);
  wait_at(warp_arrived[w], warp_generation[w], members);
}

unsigned char* warp_slots() { return warp_buffer.data() + (linear_thread() >> 5) * 32 * 16; }

void run_grid(dim3 grid, dim3 block, const std::function<void()>& fn) {
  nthreads = static_cast<int>(block.x * block.y * block.z);
  const int nwarps = (nthreads + 31) / 32;
  if (static_cast<int>(fibers.size()) < nthreads) fibers.resize(nthreads);
  warp_arrived.assign(nwarps, 0);
  warp_generation.assign(nwarps, 0);
  warp_buffer.assign(static_cast<size_t>(nwarps) * 32 * 16, 0);
  async_copies.assign(nthreads, {});
  async_groups.assign(nthreads, 0);
  body = &fn;
  grid_dim = grid;
  block_dim = block;
  for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        block_idx = dim3(bx, by, bz);
        block_arrived = 0;
        for (int i = 0; i < nthreads; ++i) {
          Fiber& f = fibers[i];
          if (!f.stack) f.stack.reset(new char[kStackBytes]);
          f.tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          f.done = false;
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.get();
          f.ctx.uc_stack.ss_size = kStackBytes;
          f.ctx.uc_link = &scheduler;
          makecontext(&f.ctx, fiber_main, 0);
        }
        for (int i = 0; i < nthreads; ++i) {
          async_copies[i].clear();
          async_groups[i] = 0;
        }
        int remaining = nthreads;
        while (remaining > 0) {
          const unsigned long long before = events;
          for (int i = 0; i < nthreads; ++i) {
            if (fibers[i].done) continue;
            current = i;
            thread_idx = fibers[i].tid;
            swapcontext(&scheduler, &fibers[i].ctx);
            if (fibers[i].done) --remaining;
          }
          if (remaining == 0) {
            for (int i = 0; i < nthreads; ++i)
              if (!async_copies[i].empty()) {
                std::fprintf(stderr, "emu: thread %d of block (%u,%u,%u) ended with %zu cp.async "
                             "copies never waited for\n", i, bx, by, bz, async_copies[i].size());
                std::abort();
              }
          }
          if (remaining > 0 && events == before) {
            std::fprintf(stderr,
                         "emu: deadlock in block (%u,%u,%u): %d of %d threads wait at a barrier "
                         "the others never reach\n",
                         bx, by, bz, remaining, nthreads);
            std::abort();
          }
        }
      }
}

}  // namespace emu
