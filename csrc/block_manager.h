// Block manager for a paged KV cache: metadata only (block tables, reference counts, free list).
// The KV tensors live in PyTorch; this class hands out block ids and (src, dst) copy lists.
//
// Semantics (after vLLM v0's block manager, plus AXPO's truncate-then-fork):
//   allocate(n)           new sequence holding n tokens (ceil(n / block_size) fresh blocks)
//   append(seq, k)        room for k more tokens; if the partially filled last block is shared
//                         (refcount > 1) it is copied first (copy-on-write): returns (src, dst) pairs
//   fork(seq, n)          n children with the same table; every block gains n references
//   fork_at(seq, t, n)    n children sharing the blocks that cover tokens [0, t); the block holding
//                         token t-1 may be partially shared and is copied before a child writes it
//   free(seq)             drop references; blocks at zero go back to the free list
//   pin(seq, t)           a read-only retained sequence holding tokens [0, t): its blocks cannot be
//                         freed or written until unpin(pin_id)
// Free list: LIFO. The most recently freed block is handed out first (its memory is the most
// likely to still be in cache). Sequence ids are never reused, so a double free is told apart
// from an id that never existed.
//
// Ranges (every count and size is checked before any state changes, with overflow-free
// arithmetic, and out-of-range values raise std::invalid_argument, i.e. ValueError):
//   num_blocks, block_size in [1, 2^31), so a slot id (block * block_size + offset) fits in int64;
//   token counts >= 0 (a count that needs more blocks than are free raises PoolExhausted, whatever
//   its size); n (children per fork) in [0, kMaxForkChildren]; at most kMaxSequences live sequences,
//   so an int32 reference count cannot overflow. The Python bindings also reject bool and
//   non-integer arguments (TypeError) and integers outside int64 (ValueError), as the Python twin
//   (axpo/rollout/block_manager.py) does, with the same messages.
//
// Thread safety: every method takes the manager's mutex. The mutex is never held while
// re-acquiring the GIL, so the methods that release the GIL for long loops cannot deadlock.
#pragma once

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace axpo {

// Raised (as axpo._C.PoolExhaustedError, a RuntimeError) when an operation needs more free
// blocks than the pool has. The manager's state is unchanged when it is raised.
class PoolExhausted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Sequence {
  std::vector<int32_t> blocks;
  int64_t num_tokens = 0;
  bool pinned = false;
};

struct Stats {
  int64_t allocations = 0;   // sequences created by allocate
  int64_t forks = 0;         // children created by fork / fork_at
  int64_t cow_copies = 0;    // blocks copied on write
  int64_t frees = 0;         // sequences freed (unpin included)
  int64_t pins = 0;
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size);

  int64_t allocate(int64_t num_tokens);
  std::vector<std::pair<int32_t, int32_t>> append(int64_t seq, int64_t k);
  int64_t append_blocks_needed(int64_t seq, int64_t k);
  std::vector<int64_t> fork(int64_t seq, int64_t n);
  std::vector<int64_t> fork_at(int64_t seq, int64_t num_tokens, int64_t n);
  void free(int64_t seq);
  void free_many(const std::vector<int64_t>& seqs);
  int64_t pin(int64_t seq, int64_t num_tokens);
  void unpin(int64_t pin_id);

  std::vector<int32_t> block_table(int64_t seq);
  std::vector<int64_t> slots(int64_t seq, int64_t start, int64_t end);
  int64_t num_tokens(int64_t seq);
  bool has_sequence(int64_t seq);
  bool is_pinned(int64_t seq);
  std::vector<int64_t> sequence_ids();
  std::vector<int32_t> ref_counts();
  std::vector<int32_t> free_block_ids();
  int64_t num_free_blocks();
  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  Stats stats();
  int64_t num_sequences();
  int64_t num_pinned();
  // Table entries a fork of seq into n children touches (0 for an unknown sequence): the bindings
  // release the GIL when this exceeds kReleaseGilWork.
  int64_t fork_work(int64_t seq, int64_t num_tokens, int64_t n);

  // Work above which fork/free release the GIL (table entries touched).
  static constexpr int64_t kReleaseGilWork = 1 << 15;
  // Most children one fork / fork_at may create.
  static constexpr int64_t kMaxForkChildren = 1 << 16;
  // Most live sequences (pins included): bounds every reference count below INT32_MAX.
  static constexpr int64_t kMaxSequences = INT32_MAX;

 private:
  // ceil(tokens / block_size) for tokens >= 0, without overflow.
  int64_t blocks_for(int64_t tokens) const {
    return tokens / block_size_ + (tokens % block_size_ != 0 ? 1 : 0);
  }
  // Blocks an append of k >= 1 tokens to s needs (fresh blocks, copy-on-write included).
  int64_t append_need(const Sequence& s, int64_t k, int64_t* fresh) const;
  Sequence& get(int64_t seq, const char* op);
  int64_t new_id() { return next_id_++; }
  int32_t pop_free();
  void release_blocks(const std::vector<int32_t>& blocks);
  std::vector<int64_t> fork_impl(int64_t seq, int64_t num_tokens, int64_t n, const char* op);

  int64_t num_blocks_;
  int64_t block_size_;
  std::vector<int32_t> ref_;
  std::vector<int32_t> free_;  // LIFO stack: back() is handed out next
  std::unordered_map<int64_t, Sequence> seqs_;
  int64_t next_id_ = 0;
  Stats stats_;
  std::mutex mu_;
};

}  // namespace axpo
