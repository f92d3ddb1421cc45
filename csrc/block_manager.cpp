// Implementation of axpo::BlockManager (see block_manager.h) and its pybind11 module `axpo._C`.
#include "block_manager.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>

namespace axpo {

namespace {

std::string seq_str(int64_t seq) { return "sequence " + std::to_string(seq); }

}  // namespace

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  if (num_blocks <= 0 || num_blocks > INT32_MAX) {
    throw std::invalid_argument("BlockManager: num_blocks must be in [1, 2^31), got " +
                                std::to_string(num_blocks));
  }
  if (block_size <= 0) {
    throw std::invalid_argument("BlockManager: block_size must be positive, got " +
                                std::to_string(block_size));
  }
  ref_.assign(static_cast<size_t>(num_blocks), 0);
  free_.reserve(static_cast<size_t>(num_blocks));
  // Pushed in reverse so that a fresh manager hands out blocks 0, 1, 2, ...
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

Sequence& BlockManager::get(int64_t seq, const char* op) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) {
    if (seq >= 0 && seq < next_id_) {
      throw std::invalid_argument(std::string(op) + ": " + seq_str(seq) + " was already freed");
    }
    throw std::invalid_argument(std::string(op) + ": unknown " + seq_str(seq));
  }
  return it->second;
}

int32_t BlockManager::pop_free() {
  int32_t b = free_.back();
  free_.pop_back();
  ref_[b] = 1;
  return b;
}

void BlockManager::release_blocks(const std::vector<int32_t>& blocks) {
  // Reverse order: with a LIFO free list the sequence's first block is handed out first again.
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    if (--ref_[*it] == 0) free_.push_back(*it);
  }
}

int64_t BlockManager::allocate(int64_t num_tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  if (num_tokens < 0) {
    throw std::invalid_argument("allocate: num_tokens must be >= 0, got " + std::to_string(num_tokens));
  }
  int64_t need = blocks_for(num_tokens);
  if (need > static_cast<int64_t>(free_.size())) {
    throw PoolExhausted("allocate: pool exhausted (need " + std::to_string(need) + " blocks, " +
                        std::to_string(free_.size()) + " free)");
  }
  Sequence s;
  s.num_tokens = num_tokens;
  s.blocks.reserve(static_cast<size_t>(need));
  for (int64_t i = 0; i < need; ++i) s.blocks.push_back(pop_free());
  int64_t id = new_id();
  seqs_.emplace(id, std::move(s));
  ++stats_.allocations;
  return id;
}

int64_t BlockManager::append_blocks_needed(int64_t seq, int64_t k) {
  std::lock_guard<std::mutex> lock(mu_);
  Sequence& s = get(seq, "append_blocks_needed");
  if (k <= 0) return 0;
  bool cow = s.num_tokens % block_size_ != 0 && ref_[s.blocks.back()] > 1;
  return blocks_for(s.num_tokens + k) - static_cast<int64_t>(s.blocks.size()) + (cow ? 1 : 0);
}

std::vector<std::pair<int32_t, int32_t>> BlockManager::append(int64_t seq, int64_t k) {
  std::lock_guard<std::mutex> lock(mu_);
  Sequence& s = get(seq, "append");
  if (s.pinned) {
    throw std::invalid_argument("append: " + seq_str(seq) + " is pinned (read-only); fork it to continue");
  }
  if (k < 0) throw std::invalid_argument("append: k must be >= 0, got " + std::to_string(k));
  std::vector<std::pair<int32_t, int32_t>> copies;
  if (k == 0) return copies;
  // The next token lands in the existing last block unless the sequence ends on a boundary.
  bool cow = s.num_tokens % block_size_ != 0 && ref_[s.blocks.back()] > 1;
  int64_t fresh = blocks_for(s.num_tokens + k) - static_cast<int64_t>(s.blocks.size());
  int64_t need = fresh + (cow ? 1 : 0);
  if (need > static_cast<int64_t>(free_.size())) {
    throw PoolExhausted("append: pool exhausted (need " + std::to_string(need) + " blocks, " +
                        std::to_string(free_.size()) + " free)");
  }
  if (cow) {
    int32_t src = s.blocks.back();
    int32_t dst = pop_free();
    --ref_[src];  // still > 0: another holder keeps it
    s.blocks.back() = dst;
    copies.emplace_back(src, dst);
    ++stats_.cow_copies;
  }
  for (int64_t i = 0; i < fresh; ++i) s.blocks.push_back(pop_free());
  s.num_tokens += k;
  return copies;
}

std::vector<int64_t> BlockManager::fork_impl(int64_t seq, int64_t num_tokens, int64_t n, const char* op) {
  Sequence& s = get(seq, op);
  if (n < 0) throw std::invalid_argument(std::string(op) + ": n must be >= 0, got " + std::to_string(n));
  if (num_tokens < 0 || num_tokens > s.num_tokens) {
    throw std::invalid_argument(std::string(op) + ": num_tokens " + std::to_string(num_tokens) +
                                " out of range [0, " + std::to_string(s.num_tokens) + "] for " +
                                seq_str(seq));
  }
  std::vector<int32_t> shared(s.blocks.begin(), s.blocks.begin() + blocks_for(num_tokens));
  std::vector<int64_t> children;
  children.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    for (int32_t b : shared) ++ref_[b];
    Sequence c;
    c.blocks = shared;
    c.num_tokens = num_tokens;
    int64_t id = new_id();
    seqs_.emplace(id, std::move(c));
    children.push_back(id);
  }
  stats_.forks += n;
  return children;
}

std::vector<int64_t> BlockManager::fork(int64_t seq, int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  return fork_impl(seq, get(seq, "fork").num_tokens, n, "fork");
}

std::vector<int64_t> BlockManager::fork_at(int64_t seq, int64_t num_tokens, int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  return fork_impl(seq, num_tokens, n, "fork_at");
}

int64_t BlockManager::fork_work(int64_t seq, int64_t num_tokens, int64_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = seqs_.find(seq);
  if (it == seqs_.end() || n <= 0) return 0;
  int64_t t = std::min<int64_t>(std::max<int64_t>(num_tokens, 0), it->second.num_tokens);
  return n * blocks_for(t);
}

void BlockManager::free(int64_t seq) {
  std::lock_guard<std::mutex> lock(mu_);
  Sequence& s = get(seq, "free");
  if (s.pinned) throw std::invalid_argument("free: " + seq_str(seq) + " is pinned; release it with unpin");
  release_blocks(s.blocks);
  seqs_.erase(seq);
  ++stats_.frees;
}

void BlockManager::free_many(const std::vector<int64_t>& seqs) {
  std::lock_guard<std::mutex> lock(mu_);
  // Validate everything first: a bad id leaves the manager unchanged.
  std::vector<int64_t> sorted(seqs);
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (i > 0 && sorted[i] == sorted[i - 1]) {
      throw std::invalid_argument("free_many: " + seq_str(sorted[i]) + " listed twice");
    }
    Sequence& s = get(sorted[i], "free_many");
    if (s.pinned) {
      throw std::invalid_argument("free_many: " + seq_str(sorted[i]) + " is pinned; release it with unpin");
    }
  }
  for (int64_t seq : seqs) {
    release_blocks(seqs_[seq].blocks);
    seqs_.erase(seq);
  }
  stats_.frees += static_cast<int64_t>(seqs.size());
}

int64_t BlockManager::pin(int64_t seq, int64_t num_tokens) {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t id = fork_impl(seq, num_tokens, 1, "pin")[0];
  --stats_.forks;  // a pin is not a fork
  seqs_[id].pinned = true;
  ++stats_.pins;
  return id;
}

void BlockManager::unpin(int64_t pin_id) {
  std::lock_guard<std::mutex> lock(mu_);
  Sequence& s = get(pin_id, "unpin");
  if (!s.pinned) throw std::invalid_argument("unpin: " + seq_str(pin_id) + " is not pinned");
  release_blocks(s.blocks);
  seqs_.erase(pin_id);
  ++stats_.frees;
}

std::vector<int32_t> BlockManager::block_table(int64_t seq) {
  std::lock_guard<std::mutex> lock(mu_);
  return get(seq, "block_table").blocks;
}

std::vector<int64_t> BlockManager::slots(int64_t seq, int64_t start, int64_t end) {
  std::lock_guard<std::mutex> lock(mu_);
  Sequence& s = get(seq, "slots");
  if (start < 0 || end < start || end > s.num_tokens) {
    throw std::invalid_argument("slots: range [" + std::to_string(start) + ", " + std::to_string(end) +
                                ") out of [0, " + std::to_string(s.num_tokens) + "] for " + seq_str(seq));
  }
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(end - start));
  for (int64_t i = start; i < end; ++i) {
    out.push_back(static_cast<int64_t>(s.blocks[i / block_size_]) * block_size_ + i % block_size_);
  }
  return out;
}

int64_t BlockManager::num_tokens(int64_t seq) {
  std::lock_guard<std::mutex> lock(mu_);
  return get(seq, "num_tokens").num_tokens;
}

bool BlockManager::has_sequence(int64_t seq) {
  std::lock_guard<std::mutex> lock(mu_);
  return seqs_.count(seq) > 0;
}

bool BlockManager::is_pinned(int64_t seq) {
  std::lock_guard<std::mutex> lock(mu_);
  return get(seq, "is_pinned").pinned;
}

std::vector<int64_t> BlockManager::sequence_ids() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<int64_t> out;
  out.reserve(seqs_.size());
  for (const auto& kv : seqs_) out.push_back(kv.first);
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<int32_t> BlockManager::ref_counts() {
  std::lock_guard<std::mutex> lock(mu_);
  return ref_;
}

std::vector<int32_t> BlockManager::free_block_ids() {
  std::lock_guard<std::mutex> lock(mu_);
  return free_;
}

int64_t BlockManager::num_free_blocks() {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(free_.size());
}

Stats BlockManager::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

int64_t BlockManager::num_sequences() {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(seqs_.size());
}

int64_t BlockManager::num_pinned() {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t n = 0;
  for (const auto& kv : seqs_) n += kv.second.pinned ? 1 : 0;
  return n;
}

}  // namespace axpo

namespace py = pybind11;
using axpo::BlockManager;

PYBIND11_MODULE(_C, m) {
  m.doc() = "AXPO C++ extension: the paged-KV block manager (metadata only).";
  py::register_exception<axpo::PoolExhausted>(m, "PoolExhaustedError", PyExc_RuntimeError);

  py::class_<BlockManager>(m, "BlockManager", R"doc(
Block tables, reference counts and a LIFO free list for a paged KV cache (see
axpo/rollout/block_manager.py for the documented Python interface; both backends behave
identically, block ids included). Misuse raises ValueError; running out of blocks raises
PoolExhaustedError (a RuntimeError) and leaves the state unchanged.)doc")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def("allocate", &BlockManager::allocate, py::arg("num_tokens") = 0)
      .def("append", &BlockManager::append, py::arg("seq"), py::arg("k"))
      .def("append_blocks_needed", &BlockManager::append_blocks_needed, py::arg("seq"), py::arg("k"))
      .def(
          "fork",
          [](BlockManager& bm, int64_t seq, int64_t n) {
            if (bm.fork_work(seq, INT64_MAX, n) > BlockManager::kReleaseGilWork) {
              py::gil_scoped_release release;
              return bm.fork(seq, n);
            }
            return bm.fork(seq, n);
          },
          py::arg("seq"), py::arg("n"))
      .def(
          "fork_at",
          [](BlockManager& bm, int64_t seq, int64_t num_tokens, int64_t n) {
            if (bm.fork_work(seq, num_tokens, n) > BlockManager::kReleaseGilWork) {
              py::gil_scoped_release release;
              return bm.fork_at(seq, num_tokens, n);
            }
            return bm.fork_at(seq, num_tokens, n);
          },
          py::arg("seq"), py::arg("num_tokens"), py::arg("n"))
      .def("free", &BlockManager::free, py::arg("seq"))
      .def(
          "free_many",
          [](BlockManager& bm, const std::vector<int64_t>& seqs) {
            // Freeing a whole batch of rollouts touches every table entry: long enough to let
            // other Python threads (tool workers) run meanwhile.
            if (static_cast<int64_t>(seqs.size()) > 64) {
              py::gil_scoped_release release;
              bm.free_many(seqs);
            } else {
              bm.free_many(seqs);
            }
          },
          py::arg("seqs"))
      .def("pin", &BlockManager::pin, py::arg("seq"), py::arg("num_tokens"))
      .def("unpin", &BlockManager::unpin, py::arg("pin_id"))
      .def("block_table", &BlockManager::block_table, py::arg("seq"))
      .def("slots", &BlockManager::slots, py::arg("seq"), py::arg("start"), py::arg("end"))
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq"))
      .def("has_sequence", &BlockManager::has_sequence, py::arg("seq"))
      .def("is_pinned", &BlockManager::is_pinned, py::arg("seq"))
      .def("sequence_ids", &BlockManager::sequence_ids)
      .def("ref_counts", &BlockManager::ref_counts)
      .def("free_block_ids", &BlockManager::free_block_ids)
      .def("stats", [](BlockManager& bm) {
        axpo::Stats s = bm.stats();
        py::dict d;
        d["blocks_total"] = bm.num_blocks();
        d["blocks_free"] = bm.num_free_blocks();
        d["blocks_used"] = bm.num_blocks() - bm.num_free_blocks();
        d["sequences"] = bm.num_sequences();
        d["pinned"] = bm.num_pinned();
        d["allocations"] = s.allocations;
        d["forks"] = s.forks;
        d["cow_copies"] = s.cow_copies;
        d["frees"] = s.frees;
        d["pins"] = s.pins;
        return d;
      });
}
