// Producer/consumer plumbing of the sm_90a kernels: mbarriers in shared
// memory, TMA loads that complete on them, rings of tile buffers, turns
// between the consumer warpgroups, and register reallocation.
//
// The kernels' roles: warpgroup 0 produces (one thread issues TMA loads),
// warpgroups 1 .. kConsumers consume (wgmma), kThreads threads together.
#pragma once

namespace flashjit {
namespace mma {

constexpr int kStages = FJ_STAGES;
constexpr int kProducerThreads = 128;
constexpr int kConsumers = kWarps / 4;  // consumer warpgroups: 2, or 3 (a forward variant at head dim 64)
static_assert(kWarps % 4 == 0 && (kConsumers == 2 || kConsumers == 3), "two or three consumer warpgroups");
// The launch bounds (384 threads at 168 registers, or 512 at 128) reserve 3 x 168 = 504 (or
// 4 x 128 = 512) registers a thread slot, which the roles share after setmaxnreg: 24 + 2 x 240
// (or 3 x 160). A consumer asking for more than the producer gave back would wait in
// setmaxnreg forever. (The one pass's dQ writer, on the producer warpgroup, lives within 24;
// 40 + 2 x 232 made the consumers of its masked, dropout and softcap kernels spill.)
constexpr int kProducerRegisters = 24;
constexpr int kConsumerRegisters = kConsumers == 2 ? 240 : 160;
static_assert(kProducerRegisters + kConsumers * kConsumerRegisters <= (kConsumers == 2 ? 504 : 512),
              "the roles' registers within what the launch bounds reserve");
// Consumer w issues its wgmma after named barrier kTurnBarrier + w, then passes
// the turn to the next, so that one consumer's softmax runs beside the others'
// products. Each turn barrier joins two warpgroups: the one waiting for its
// turn and the one passing it.
constexpr int kTurnBarrier = 1;
constexpr int kTurnThreads = 256;

// The first 1024-byte boundary of dynamic shared memory: swizzled tiles start there.
FJ_DEVICE unsigned char* aligned_for_swizzle(unsigned char* shared) {
  return shared + ((1024 - (shared_address(shared) & 1023)) & 1023);
}

FJ_DEVICE void mbarrier_init(unsigned long long* barrier, unsigned arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(barrier)), "r"(arrivals));
}
// Makes initialised mbarriers visible to the async proxy (TMA) before use.
FJ_DEVICE void mbarrier_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

FJ_DEVICE void mbarrier_arrive(unsigned long long* barrier) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(barrier)) : "memory");
}
// Arrives and announces `bytes` that asynchronous copies will complete.
FJ_DEVICE void mbarrier_expect_bytes(unsigned long long* barrier, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(barrier)), "r"(bytes)
               : "memory");
}
// Whether the phase of `parity` has completed (after the hardware's own short wait).
FJ_DEVICE bool mbarrier_try_wait(unsigned long long* barrier, unsigned parity) {
  unsigned done;
  asm volatile(
      "{\n.reg .pred ready;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 ready, [%1], %2;\n"
      "selp.u32 %0, 1, 0, ready;\n}\n"
      : "=r"(done)
      : "r"(shared_address(barrier)), "r"(parity)
      : "memory");
  return done != 0;
}
FJ_DEVICE void mbarrier_wait(unsigned long long* barrier, unsigned parity) {
  while (!mbarrier_try_wait(barrier, parity)) {
  }
}
// The producer's waits for free buffers (FJ_PRODUCER_SUSPEND): try_wait with a suspend-time hint,
// so that the thread stays suspended until the phase completes (or the hint's 10 ms pass) rather
// than coming back to retry, which takes issue slots of the scheduler it shares with two consumer
// warps. Without it, the plain wait.
FJ_DEVICE void producer_wait(unsigned long long* barrier, unsigned parity) {
#if FJ_PRODUCER_SUSPEND
  unsigned done = 0;
  while (!done) {
    asm volatile(
        "{\n.reg .pred ready;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 ready, [%1], %2, %3;\n"
        "selp.u32 %0, 1, 0, ready;\n}\n"
        : "=r"(done)
        : "r"(shared_address(barrier)), "r"(parity), "r"(10000000u)
        : "memory");
  }
#else
  mbarrier_wait(barrier, parity);
#endif
}

FJ_DEVICE void prefetch_tensor_map(const TensorMap& map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&map)) : "memory");
}

// One TMA box (64 columns x the map's box rows) of operand `map` at column
// `column`, row `row` of (batch b, head h) into shared memory, completing on
// `barrier`. Rows past the sequence and columns past the head dim read as 0.
FJ_DEVICE void tma_load(void* shared, const TensorMap& map, int column, int row, int h, int b,
                        unsigned long long* barrier) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(shared_address(shared)),
      "l"(reinterpret_cast<unsigned long long>(&map)), "r"(column), "r"(row), "r"(h), "r"(b),
      "r"(shared_address(barrier))
      : "memory");
}

// A tile of kRows rows x kDim columns (kDim a multiple of 64) as kDim / 64 boxes,
// one per swizzled region (wgmma.cuh).
template <int kRows, int kDim>
FJ_DEVICE void tma_load_tile(elem_t* tile, const TensorMap& map, long long row, int h, int b,
                             unsigned long long* barrier) {
#pragma unroll
  for (int region = 0; region < kDim / kSwizzleElems; ++region) {
    tma_load(tile + region * kRows * kSwizzleElems, map, region * kSwizzleElems, static_cast<int>(row), h, b, barrier);
  }
}
template <int kRows, int kDim>
constexpr unsigned kTileBytes = kRows * kDim * sizeof(elem_t);

// One TMA box (64 columns x the map's box rows) from shared memory to operand
// `map` at column `column`, row `row` of (batch b, head h); rows past the
// sequence and columns past the head dim are not written. Issued by one thread
// into its bulk async-group (bulk_commit, bulk_wait_read).
FJ_DEVICE void tma_store(const void* shared, const TensorMap& map, int column, int row, int h, int b) {
  asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<unsigned long long>(&map)),
      "r"(shared_address(shared)), "r"(column), "r"(row), "r"(h), "r"(b)
      : "memory");
}
FJ_DEVICE void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Until the thread's committed bulk stores have read their shared memory.
FJ_DEVICE void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// Until the thread's committed bulk stores are complete.
FJ_DEVICE void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Until all but the newest of the thread's committed bulk groups are complete.
FJ_DEVICE void bulk_wait_all_but_newest() { asm volatile("cp.async.bulk.wait_group 1;\n" ::: "memory"); }
// `bytes` (a multiple of 16, both addresses 16-byte aligned) from shared to global memory, stored
// or added (float32) there element by element; into the thread's bulk async-group.
FJ_DEVICE void bulk_store(void* global, const void* shared, unsigned bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(global),
               "r"(shared_address(shared)), "r"(bytes)
               : "memory");
}
FJ_DEVICE void bulk_add_floats(float* global, const float* shared, unsigned bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(global),
               "r"(shared_address(shared)), "r"(bytes)
               : "memory");
}
// Orders this thread's generic-proxy accesses to global memory with its bulk (async-proxy) ones.
FJ_DEVICE void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }

// `bytes` (a multiple of 16) from 16-byte aligned global memory, completing on `barrier`.
FJ_DEVICE void bulk_load(void* shared, const void* global, unsigned bytes, unsigned long long* barrier) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          shared_address(shared)),
      "l"(global), "r"(bytes), "r"(shared_address(barrier))
      : "memory");
}

// A ring of kBuffers tile buffers between the producer thread and the kWarps
// consumer warps, with a "full" and an "empty" mbarrier per buffer. Use j
// (j = 0, 1, ...) takes buffer j % kBuffers in phase (j / kBuffers) % 2: the
// producer waits until the buffer is empty (parity phase ^ 1, which a fresh
// barrier passes at once) and announces the bytes its copies will write;
// consumers wait for full (parity phase), read, and each warp arrives on empty.
template <int kBuffers>
struct Ring {
  static constexpr int kBarriers = 2 * kBuffers;
  unsigned long long* full;   // [kBuffers]
  unsigned long long* empty;  // [kBuffers]

  FJ_DEVICE static Ring at(unsigned long long* barriers) { return Ring{barriers, barriers + kBuffers}; }
  // By one thread, before the block synchronises; `releases` arrivals free a buffer.
  FJ_DEVICE void init(unsigned releases = kWarps) const {
#pragma unroll
    for (int buffer = 0; buffer < kBuffers; ++buffer) {
      mbarrier_init(&full[buffer], 1);
      mbarrier_init(&empty[buffer], releases);
    }
  }
  // Producer: the buffer of use j once it is empty, its full barrier told to expect `bytes`.
  FJ_DEVICE int produce(int use, unsigned bytes) const {
    const int buffer = use % kBuffers;
    producer_wait(&empty[buffer], ((use / kBuffers) & 1) ^ 1);
    mbarrier_expect_bytes(&full[buffer], bytes);
    return buffer;
  }
  FJ_DEVICE static int buffer(int use) { return use % kBuffers; }
  // Consumer: waits until the bytes of use j arrived.
  FJ_DEVICE void consume(int use) const { mbarrier_wait(&full[buffer(use)], (use / kBuffers) & 1); }
  // Consumer warp: done with the buffer of use j (after the wgmma that read it);
  // every lane's reads of it come before lane 0's arrival.
  FJ_DEVICE void release(int use, int lane) const {
    __syncwarp();
    if (lane == 0) mbarrier_arrive(&empty[use % kBuffers]);
  }
};

// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads.
FJ_DEVICE void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
FJ_DEVICE void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Turns among the consumer warpgroups, in order 0, 1, .., kConsumers - 1, 0, ...
// The last consumer gives consumer 0 the first turn (first_turn); each then
// alternates wait_turn, issue, pass_turn; consumer 0 takes the last pass
// (last_turn), so every barrier ends balanced.
FJ_DEVICE void first_turn(int consumer) {
  if (consumer == kConsumers - 1) named_barrier_arrive(kTurnBarrier, kTurnThreads);
}
FJ_DEVICE void wait_turn(int consumer) { named_barrier_sync(kTurnBarrier + consumer, kTurnThreads); }
FJ_DEVICE void pass_turn(int consumer) {
  named_barrier_arrive(kTurnBarrier + (consumer + 1) % kConsumers, kTurnThreads);
}
FJ_DEVICE void last_turn(int consumer) {
  if (consumer == 0) wait_turn(0);
}

// Register reallocation between warpgroups (the kernel's launch bounds cap the
// registers at entry; each warpgroup then releases or claims its share).
template <int kRegisters>
FJ_DEVICE void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
FJ_DEVICE void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// The block's roles: thread 0 initialises the mbarriers (init), the block
// synchronises, then thread 0 of warpgroup 0 produces (the rest of that
// warpgroup only gives its registers away) and warpgroups 1 .. kConsumers
// consume, consume(consumer) with consumer 0 .. kConsumers - 1.
// With `assist`, the producer warpgroup's warps 1 to 3 (96 threads) run it.
template <class Init, class Produce, class Consume, class Assist>
FJ_DEVICE void specialised_roles(Init init, Produce produce, Consume consume, Assist assist) {
  if (threadIdx.x == 0) {
    init();
    mbarrier_init_fence();
  }
  __syncthreads();
  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    release_registers<kProducerRegisters>();
    if (threadIdx.x == 0) {
      produce();
    } else if (threadIdx.x >= 32) {
      assist();
    }
    return;
  }
  claim_registers<kConsumerRegisters>();
  consume(warpgroup - 1);
}
template <class Init, class Produce, class Consume>
FJ_DEVICE void specialised_roles(Init init, Produce produce, Consume consume) {
  specialised_roles(init, produce, consume, [] {});
}

// The consumers' schedule over `steps` tiles (steps > 0), the same in every
// sm_90a kernel. Step j issues, in this warpgroup's turn, the products of tile
// j (issue_first: S and its kin, from shared memory) and those of tile j - 1
// that take registers (issue_second: P V, dS K, ...), each as a commit group;
// the register math on tile j (after_first) runs while tile j - 1's products
// do, after_second(j - 1) follows their completion, and prepare(j) turns tile
// j's results into the register operands of the next issue_second. arrive(j)
// waits, outside the turn, for the buffers step j reads. Step 0 issues no
// second products; a last step issues tile steps - 1's alone. Every phase is
// straight-line code: a wgmma issued under a branch makes ptxas add waits.
// consumer_steps takes turns from wherever the previous steps left them (a
// persistent kernel runs one turn sequence over all its work tiles, so that a
// warpgroup finishing a tile cannot arrive twice on a barrier the other has
// not yet waited on); consumer_schedule is one block's whole sequence.
template <class T>
constexpr bool kReturnsBool = false;
template <>
constexpr bool kReturnsBool<bool> = true;

// The last step of consumer_steps: tile `last`'s second products alone, in a turn of their own
// (also a chained work tile's, where no next tile's step 0 carries them).
template <class Arrive, class IssueSecond, class AfterSecond>
FJ_DEVICE void chained_last_step(int consumer, int last, Arrive arrive, IssueSecond issue_second,
                                 AfterSecond after_second) {
  arrive(last + 1);
  wait_turn(consumer);
  wgmma_fence();
  issue_second(last);
  wgmma_commit();
  pass_turn(consumer);
  wgmma_wait<0>();
  after_second(last);
}
// consumer_steps run on across work tiles (the sm_90a forward's FJ_CHAIN_TILES): with
// `carried`, step 0's turn also issues the previous work tile's last second products
// (issue_second(-1): the ring indices run on, so tile -1 is the previous tile's last),
// after_first(0) runs beside them, then after_second(-1) and carried_done() (the previous
// tile's output) once they are done, before prepare(0); arrive(0) then also waits for what
// they read. With `keep_last`, tile steps - 1's second products are not issued: the next
// work tile's step 0 carries them (or a turn of their own, chained_last_step). Both flags
// must be the same in every consumer warpgroup, so that the turns stay in step. Each branch
// holds whole wgmma stages (fence to wait), as consumer_steps' loop does.
template <class Arrive, class IssueFirst, class AfterFirst, class IssueSecond, class AfterSecond, class Prepare,
          class CarriedDone>
FJ_DEVICE void chained_steps(int consumer, int steps, bool carried, bool keep_last, Arrive arrive,
                             IssueFirst issue_first, AfterFirst after_first, IssueSecond issue_second,
                             AfterSecond after_second, Prepare prepare, CarriedDone carried_done) {
  arrive(0);
  wait_turn(consumer);
  if (carried) {
    wgmma_fence();
    issue_first(0);
    wgmma_commit();
    issue_second(-1);
    wgmma_commit();
    pass_turn(consumer);
    wgmma_wait<1>();  // S_0 done; the previous tile's last products may still run beside after_first
    if constexpr (kReturnsBool<decltype(after_first(0))>) {
      wgmma_wait_all_after(after_first(0));
    } else {
      after_first(0);
      wgmma_wait<0>();
    }
    after_second(-1);
    carried_done();
  } else {
    wgmma_fence();
    issue_first(0);
    wgmma_commit();
    pass_turn(consumer);
    wgmma_wait<0>();
    after_first(0);
  }
  prepare(0);
  for (int j = 1; j < steps; ++j) {
    arrive(j);
    wait_turn(consumer);
    wgmma_fence();
    issue_first(j);
    wgmma_commit();
    issue_second(j - 1);
    wgmma_commit();
    pass_turn(consumer);
    wgmma_wait<1>();  // tile j's products done; tile j - 1's may still run beside after_first
    if constexpr (kReturnsBool<decltype(after_first(j))>) {
      wgmma_wait_all_after(after_first(j));  // after_first returns a warp-uniform value
    } else {
      after_first(j);
      wgmma_wait<0>();
    }
    after_second(j - 1);
    prepare(j);
  }
  if (!keep_last) chained_last_step(consumer, steps - 1, arrive, issue_second, after_second);
}
template <class Arrive, class IssueFirst, class AfterFirst, class IssueSecond, class AfterSecond, class Prepare>
FJ_DEVICE void consumer_steps(int consumer, int steps, Arrive arrive, IssueFirst issue_first, AfterFirst after_first,
                              IssueSecond issue_second, AfterSecond after_second, Prepare prepare) {
  chained_steps(consumer, steps, false, false, arrive, issue_first, after_first, issue_second, after_second, prepare,
                [] {});
}
// consumer_steps for a warpgroup none of whose rows is a query (a work tile's
// last rows past the sequence, a decoding block's packed rows in the first
// warpgroup alone): the same turns, the same buffers waited for and freed
// (after_first(j) frees K_j, after_second(j) V_j), and no product.
template <class Arrive, class AfterFirst, class AfterSecond>
FJ_DEVICE void idle_steps(int consumer, int steps, Arrive arrive, AfterFirst after_first, AfterSecond after_second) {
  for (int j = 0; j <= steps; ++j) {
    arrive(j);
    wait_turn(consumer);
    pass_turn(consumer);
    if (j < steps) after_first(j);
    if (j > 0) after_second(j - 1);
  }
}
// After consumer_steps over a warpgroup's first `steps` tiles of `total`: the turns and
// buffers of tiles steps .. total - 1, which none of its rows sees (a causal work tile's
// first warpgroups end before the later ones' diagonal tiles): arrive(j) waits for K_j and
// V_j, release(j) frees both, no product. One turn a tile, so that the turns stay in step
// with the warpgroups that compute them.
template <class Arrive, class Release>
FJ_DEVICE void idle_tail(int consumer, int steps, int total, Arrive arrive, Release release) {
  for (int j = steps; j < total; ++j) {
    arrive(j);
    wait_turn(consumer);
    pass_turn(consumer);
    release(j);
  }
}
template <class Arrive, class IssueFirst, class AfterFirst, class IssueSecond, class AfterSecond, class Prepare>
FJ_DEVICE void consumer_schedule(int consumer, int steps, Arrive arrive, IssueFirst issue_first, AfterFirst after_first,
                                 IssueSecond issue_second, AfterSecond after_second, Prepare prepare) {
  first_turn(consumer);
  consumer_steps(consumer, steps, arrive, issue_first, after_first, issue_second, after_second, prepare);
  last_turn(consumer);
}

// The work tiles of a persistent block, from the producer thread to the
// consumer warps through two slots: the n-th tile goes into slot n % 2 once the
// consumers have taken tile n - 2 from it.
// FJ_PRODUCER_SETUP: a slot also carries the tile's block (QueryBlock's fields), worked out once
// by the producer.
constexpr int kTileSlotInts = FJ_PRODUCER_SETUP ? layout::kTileSlotInts : 1;
struct TileQueue {
  Ring<2> ring;
  int* slots;  // [2][kTileSlotInts]
  FJ_DEVICE void init() const { ring.init(); }
  // The tile, and (fields, kTileSlotInts - 1 of them) its block's.
  FJ_DEVICE void push(int n, int tile, const int* fields = nullptr) const {
    const int slot = n % 2;
    producer_wait(&ring.empty[slot], ((n / 2) & 1) ^ 1);
    slots[slot * kTileSlotInts] = tile;
    if (fields != nullptr) {
#pragma unroll
      for (int i = 1; i < kTileSlotInts; ++i) slots[slot * kTileSlotInts + i] = fields[i - 1];
    }
    mbarrier_arrive(&ring.full[slot]);  // releases the stores to the consumers
  }
  FJ_DEVICE int pop(int n, int lane, int* fields = nullptr) const {
    ring.consume(n);
    const int slot = n % 2;
    const int tile = slots[slot * kTileSlotInts];
    if (fields != nullptr) {
#pragma unroll
      for (int i = 1; i < kTileSlotInts; ++i) fields[i - 1] = slots[slot * kTileSlotInts + i];
    }
    ring.release(n, lane);  // after every lane's read of the slot
    return tile;
  }
};

// The work tile of a persistent grid after `tile` (first: the block's first):
// each block starts with its own index, then takes tiles from the shared
// counter, or (static_tiles) one tile of each following round of gridDim.x
// tiles, with no round trip to memory: in a snake's order (block i takes place i
// of the even rounds and place grid - 1 - i of the odd ones), so that where tiles
// come heaviest first (causal bounds) a block's heavy and light places even out.
// Without either the grid has a block a tile, and each block stops after its own.
FJ_DEVICE int next_tile(const KernelParams& p, int tile, bool first) {
  if (first) return static_cast<int>(blockIdx.x);
  if (p.tile_counter != nullptr) return static_cast<int>(gridDim.x + atomicAdd(p.tile_counter, 1u));
  if (p.static_tiles) {  // tiles < 2^30 (backend.cpp): no overflow
    const int grid = static_cast<int>(gridDim.x), round = tile / grid, place = tile - round * grid;
    return (round + 1) * grid + (grid - 1 - place);
  }
  return 0x7fffffff;
}

// By the producer thread once next_tile gave it no more work: with a counter
// that resets itself, the last block to get here (every block's fetches of
// tile_counter[0] are done by then) zeroes both counters for the next launch.
FJ_DEVICE void done_taking_tiles(const KernelParams& p) {
  if (p.tile_counter == nullptr || !p.tile_counter_resets) return;
  __threadfence();  // this block's fetches, before its count
  if (atomicAdd(p.tile_counter + 1, 1u) == gridDim.x - 1) {
    atomicExch(p.tile_counter, 0u);
    atomicExch(p.tile_counter + 1, 0u);
  }
}

#if FJ_VARLEN
// The query tiles (kFirstQueryTile) or key tiles (kFirstKeyTile) of all the sequences:
// the table's trailer.
FJ_DEVICE int varlen_tiles(const KernelParams& p, VarlenField field) {
  return p.varlen[p.batch * kVarlenFields + (field == kFirstQueryTile ? 0 : 1)];
}

// The entry of a variable-length batch (KernelParams::varlen) whose work holds tile
// `tile` of the kind `field` (kFirstQueryTile or kFirstKeyTile): the last entry whose
// first tile is at most `tile` (entries without work share the next one's first tile).
FJ_DEVICE int varlen_entry(const KernelParams& p, VarlenField field, int tile) {
  int lo = 0, hi = p.batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.varlen[mid * kVarlenFields + field] <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// The parameters of entry `entry`'s sequence alone, as the host's sequence_problem
// makes them for a launch a sequence: its lengths, blocks, diagonal shift and dropout
// batch entry; o, lse and the gradients from its first rows; the backward's scratch
// rows of the entry and their pitch; batch entry 0 (q_row0 and k_row0 place its rows for TMA).
FJ_DEVICE KernelParams sequence_params(const KernelParams& p, int entry) {
  const int* e = p.varlen + entry * kVarlenFields;
  KernelParams s = p;
  s.batch = 1;
  s.q_row0 = e[kFirstQuery];
  s.seqlen_q = e[kQueries];
  s.k_row0 = e[kFirstKey];
  s.seqlen_k = e[kKeys];
  s.num_query_blocks = (e[kQueries] + kBlockM - 1) / kBlockM;
  s.num_key_blocks = (e[kKeys] + kBlockM - 1) / kBlockM;
  s.diagonal_shift = p.varlen_top_left ? 0 : static_cast<long long>(e[kKeys]) - e[kQueries];
  s.dropout_head_base = p.dropout_head_base + static_cast<long long>(e[kSequence]) * p.heads_q;
  const auto rows_from = [](KernelOperand& x, long long rows) {
    if (x.data != nullptr) x.data = static_cast<elem_t*>(x.data) + rows * x.stride_seq;
  };
  rows_from(s.o, s.q_row0);
  rows_from(s.dout, s.q_row0);
  rows_from(s.dq, s.q_row0);
  rows_from(s.dk, s.k_row0);
  rows_from(s.dv, s.k_row0);
  if (p.lse.data != nullptr) s.lse.data = static_cast<float*>(p.lse.data) + s.q_row0 * p.lse.stride_seq;
  // The backward's scratch (plan_varlen_backward): scratch_pitch is a dQ tile's rows; an
  // entry's rows start at its first dQ tile, a head's at whole tiles of its queries.
  const long long scratch_rows = static_cast<long long>(e[kFirstQueryTile]) * p.scratch_pitch;
  s.scratch_pitch = (e[kQueries] + p.scratch_pitch - 1) / p.scratch_pitch * p.scratch_pitch;
  if (p.delta != nullptr) s.delta = static_cast<float*>(p.delta) + scratch_rows;
  if (p.lse_log2 != nullptr) s.lse_log2 = static_cast<float*>(p.lse_log2) + scratch_rows;
  return s;
}
#endif

// A block of kBlockM query rows (late blocks first, block_coordinates) and the
// tiles of kBlockN keys its rows can see through the causal/window bounds.
struct QueryBlock {
  int b, h, kv_head;
  long long first_query;
  long long key_lo, key_hi;  // keys the block's rows can see
  long long first_tile;      // key_lo rounded down to a tile
  int tiles;
  QueryBlock() = default;
  // The seven fields a tile queue's slot carries (FJ_PRODUCER_SETUP; all fit an int: rows and
  // keys are ints), and the block made again from them, without a division by a run-time value.
  static constexpr int kFields = 7;
  FJ_DEVICE void to_fields(int (&f)[kFields]) const {
    f[0] = b, f[1] = h, f[2] = kv_head, f[3] = static_cast<int>(first_query), f[4] = static_cast<int>(key_lo);
    f[5] = static_cast<int>(key_hi), f[6] = tiles;
  }
  FJ_DEVICE static QueryBlock from_fields(const int (&f)[kFields]) {
    QueryBlock block;
    block.b = f[0], block.h = f[1], block.kv_head = f[2], block.first_query = f[3], block.key_lo = f[4];
    block.key_hi = f[5];
    block.first_tile = block.key_lo / kBlockN * kBlockN;  // count_tiles' (key_lo >= 0)
    block.tiles = f[6];
    return block;
  }
  // The block of this thread block (block_coordinates).
  FJ_DEVICE explicit QueryBlock(const KernelParams& p) {
    int block;
    block_coordinates(p.num_query_blocks, p.heads_q, &block, &b, &h);
    locate(p, block);
  }
  // Work tile `tile` of a persistent grid, in the same order.
  FJ_DEVICE QueryBlock(const KernelParams& p, int tile) {
    int block;
    block_coordinates(tile, p.num_query_blocks, p.heads_q, &block, &b, &h);
    locate(p, block);
  }
  FJ_DEVICE void locate(const KernelParams& p, int block) {
    kv_head = h / p.group_size;
    first_query = static_cast<long long>(block) * kBlockM;
    const long long last_query = min(first_query + kBlockM, static_cast<long long>(p.seqlen_q)) - 1;
    key_lo = key_begin(p, first_query);
    key_hi = key_end(p, last_query);
    count_tiles();
  }
  // Only keys lo .. lo + count - 1 (a split forward's span, lo and count whole tiles).
  FJ_DEVICE void clip_keys(long long lo, long long count) {
    key_lo = max(key_lo, lo);
    key_hi = min(key_hi, lo + count);
    count_tiles();
  }
  FJ_DEVICE void count_tiles() {
    first_tile = key_lo / kBlockN * kBlockN;
    tiles = first_tile < key_hi ? static_cast<int>((key_hi - first_tile + kBlockN - 1) / kBlockN) : 0;
  }
  FJ_DEVICE long long tile_start(int j) const { return first_tile + static_cast<long long>(j) * kBlockN; }
  // Of the block's tiles (tiles > 0), how many the query rows among first .. first + 63
  // reach: the others start past the last such row's last visible key (a row's bounds
  // never fall as the row grows). At least one, so that a schedule runs: 64 rows past
  // the queries compute one tile that nothing stores.
  FJ_DEVICE int tiles_seen_by(const KernelParams& p, long long first) const {
    if (first >= p.seqlen_q) return 1;
    const long long end = min(key_hi, key_end(p, min(first + 63, static_cast<long long>(p.seqlen_q) - 1)));
    const long long seen = end <= first_tile ? 1 : (end - first_tile + kBlockN - 1) / kBlockN;
    return static_cast<int>(min(seen, static_cast<long long>(tiles)));
  }
  // The key tiles wholly visible to query rows first..first + 63 (all below seqlen_q:
  // rows_full) are tiles lo..hi - 1: a row's first and last visible keys never fall as the
  // row grows, so the last row bounds where such a tile may start and the first row where it
  // may end. Found once a work tile, so that a step tests two ints after its S wait.
  struct Interior {
    int lo = 0, hi = 0;
    FJ_DEVICE bool contains(int j) const { return j >= lo && j < hi; }
  };
  FJ_DEVICE Interior interior_tiles(const KernelParams& p, long long first, bool rows_full) const {
    Interior range;
    if (!rows_full) return range;
    const long long start = max(key_lo, key_begin(p, first + 63));
    const long long end = min(key_hi, key_end(p, first));
    range.lo = start <= first_tile ? 0 : static_cast<int>((start - first_tile + kBlockN - 1) / kBlockN);
    range.hi = end <= first_tile ? 0 : static_cast<int>((end - first_tile) / kBlockN);
    if (range.hi < range.lo) range.hi = range.lo;
    return range;
  }
};
static_assert(layout::kTileSlotInts == 1 + QueryBlock::kFields, "a tile queue's slot: the tile and its block");

}  // namespace mma
}  // namespace flashjit
