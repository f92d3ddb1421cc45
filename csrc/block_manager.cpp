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
  if (block_size <= 0 || block_size > INT32_MAX) {
    throw std::invalid_argument("BlockManager: block_size must be in [1, 2^31), got " +
                                std::to_string(block_size));
  }
  ref_.assign(static_cast<size_t>(num_blocks), 0);
  free_.reserve(static_cast<size_t>(num_blocks));
  // Pushed in reverse so that a fresh manager hands out blocks 0, 1, 2, ...
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

int64_t BlockManager::append_need(const Sequence& s, int64_t k, int64_t* fresh) const {
  // ceil((n + k) / bs) without forming n + k (it can exceed int64): n / bs < 2^31 and
  // k / bs < 2^63, so their sum fits in uint64; the remainders' part is below 3 * 2^31.
  const int64_t n = s.num_tokens, bs = block_size_;
  uint64_t total = static_cast<uint64_t>(n / bs) + static_cast<uint64_t>(k / bs) +
                   static_cast<uint64_t>((n % bs + k % bs + bs - 1) / bs);
  // total >= blocks.size() == ceil(n / bs), and total - blocks.size() <= ceil(k / bs) < 2^63.
  *fresh = static_cast<int64_t>(total - static_cast<uint64_t>(s.blocks.size()));
  // The next token lands in the existing last block unless the sequence ends on a boundary;
  // a shared last block is copied first. (cow implies bs >= 2, so *fresh + 1 cannot overflow.)
  bool cow = n % bs != 0 && ref_[s.blocks.back()] > 1;
  return *fresh + (cow ? 1 : 0);
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
  if (static_cast<int64_t>(seqs_.size()) >= kMaxSequences) {
    throw std::invalid_argument("allocate: too many sequences (" + std::to_string(seqs_.size()) +
                                " live, 1 more would pass " + std::to_string(kMaxSequences) + ")");
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
  int64_t fresh = 0;
  return append_need(s, k, &fresh);
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
  int64_t fresh = 0;
  int64_t need = append_need(s, k, &fresh);
  bool cow = need > fresh;
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
  s.num_tokens += k;  // <= blocks * block_size <= num_blocks * block_size < 2^62
  return copies;
}

std::vector<int64_t> BlockManager::fork_impl(int64_t seq, int64_t num_tokens, int64_t n, const char* op) {
  Sequence& s = get(seq, op);
  if (n < 0) throw std::invalid_argument(std::string(op) + ": n must be >= 0, got " + std::to_string(n));
  if (n > kMaxForkChildren) {
    throw std::invalid_argument(std::string(op) + ": n must be <= " + std::to_string(kMaxForkChildren) +
                                ", got " + std::to_string(n));
  }
  if (static_cast<int64_t>(seqs_.size()) > kMaxSequences - n) {
    throw std::invalid_argument(std::string(op) + ": too many sequences (" + std::to_string(seqs_.size()) +
                                " live, " + std::to_string(n) + " more would pass " +
                                std::to_string(kMaxSequences) + ")");
  }
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
  if (it == seqs_.end() || n <= 0 || n > kMaxForkChildren) return 0;  // the fork itself will throw
  int64_t t = std::min<int64_t>(std::max<int64_t>(num_tokens, 0), it->second.num_tokens);
  return n * blocks_for(t);  // < 2^16 * 2^31
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

namespace {

// Argument conversion, identical to the Python twin's `_int_arg` / `_seq_arg`: a bool or a
// non-integer (no __index__) is a TypeError; an integer outside int64 is a ValueError for a count
// and an unknown sequence for an id. pybind11's own int64_t caster would accept bool and answer
// "incompatible function arguments" for big integers, so every integer goes through these.

[[noreturn]] void throw_type(py::handle v, const std::string& op, const char* name) {
  std::string type = py::str(py::handle(reinterpret_cast<PyObject*>(Py_TYPE(v.ptr()))).attr("__name__"));
  throw py::type_error(op + ": " + name + " must be an integer, got " + type);
}

py::int_ index_arg(py::handle v, const std::string& op, const char* name) {
  if (PyBool_Check(v.ptr())) throw_type(v, op, name);
  PyObject* idx = PyNumber_Index(v.ptr());
  if (idx == nullptr) {
    if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw py::error_already_set();  // __index__ raised
    PyErr_Clear();
    throw_type(v, op, name);
  }
  return py::reinterpret_steal<py::int_>(idx);
}

// true and *out set if v fits in int64.
bool fits_int64(const py::int_& v, int64_t* out) {
  int overflow = 0;
  long long x = PyLong_AsLongLongAndOverflow(v.ptr(), &overflow);
  if (overflow != 0) return false;
  if (x == -1 && PyErr_Occurred()) throw py::error_already_set();
  *out = static_cast<int64_t>(x);
  return true;
}

int64_t int_arg(py::handle v, const std::string& op, const char* name) {
  py::int_ i = index_arg(v, op, name);
  int64_t x = 0;
  if (!fits_int64(i, &x)) {
    throw py::value_error(op + ": " + name + " " + std::string(py::str(i)) + " does not fit in 64 bits");
  }
  return x;
}

int64_t seq_arg(py::handle v, const std::string& op, const char* name = "seq") {
  py::int_ i = index_arg(v, op, name);
  int64_t x = 0;
  if (!fits_int64(i, &x)) throw py::value_error(op + ": unknown sequence " + std::string(py::str(i)));
  return x;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "AXPO C++ extension: the paged-KV block manager (metadata only).";
  py::register_exception<axpo::PoolExhausted>(m, "PoolExhaustedError", PyExc_RuntimeError);
  m.attr("MAX_FORK_CHILDREN") = BlockManager::kMaxForkChildren;
  m.attr("MAX_SEQUENCES") = BlockManager::kMaxSequences;

  py::class_<BlockManager>(m, "BlockManager", R"doc(
Block tables, reference counts and a LIFO free list for a paged KV cache (see
axpo/rollout/block_manager.py for the documented Python interface; both backends behave
identically, block ids and error messages included). Misuse raises ValueError (TypeError for a
bool or non-integer argument); running out of blocks raises PoolExhaustedError (a RuntimeError)
and leaves the state unchanged.)doc")
      .def(py::init([](py::handle num_blocks, py::handle block_size) {
             int64_t nb = int_arg(num_blocks, "BlockManager", "num_blocks");
             int64_t bs = int_arg(block_size, "BlockManager", "block_size");
             return new BlockManager(nb, bs);
           }),
           py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def(
          "allocate",
          [](BlockManager& bm, py::handle num_tokens) {
            return bm.allocate(int_arg(num_tokens, "allocate", "num_tokens"));
          },
          py::arg("num_tokens") = 0)
      .def(
          "append",
          [](BlockManager& bm, py::handle seq, py::handle k) {
            int64_t s = seq_arg(seq, "append");
            return bm.append(s, int_arg(k, "append", "k"));
          },
          py::arg("seq"), py::arg("k"))
      .def(
          "append_blocks_needed",
          [](BlockManager& bm, py::handle seq, py::handle k) {
            int64_t s = seq_arg(seq, "append_blocks_needed");
            return bm.append_blocks_needed(s, int_arg(k, "append_blocks_needed", "k"));
          },
          py::arg("seq"), py::arg("k"))
      .def(
          "fork",
          [](BlockManager& bm, py::handle seq, py::handle n) {
            int64_t s = seq_arg(seq, "fork");
            int64_t nn = int_arg(n, "fork", "n");
            if (bm.fork_work(s, INT64_MAX, nn) > BlockManager::kReleaseGilWork) {
              py::gil_scoped_release release;
              return bm.fork(s, nn);
            }
            return bm.fork(s, nn);
          },
          py::arg("seq"), py::arg("n"))
      .def(
          "fork_at",
          [](BlockManager& bm, py::handle seq, py::handle num_tokens, py::handle n) {
            int64_t s = seq_arg(seq, "fork_at");
            int64_t t = int_arg(num_tokens, "fork_at", "num_tokens");
            int64_t nn = int_arg(n, "fork_at", "n");
            if (bm.fork_work(s, t, nn) > BlockManager::kReleaseGilWork) {
              py::gil_scoped_release release;
              return bm.fork_at(s, t, nn);
            }
            return bm.fork_at(s, t, nn);
          },
          py::arg("seq"), py::arg("num_tokens"), py::arg("n"))
      .def(
          "free", [](BlockManager& bm, py::handle seq) { bm.free(seq_arg(seq, "free")); }, py::arg("seq"))
      .def(
          "free_many",
          [](BlockManager& bm, py::handle seqs) {
            std::vector<int64_t> ids;
            for (py::handle item : py::iter(seqs)) ids.push_back(seq_arg(item, "free_many"));
            // Freeing a whole batch of rollouts touches every table entry: long enough to let
            // other Python threads (tool workers) run meanwhile.
            if (static_cast<int64_t>(ids.size()) > 64) {
              py::gil_scoped_release release;
              bm.free_many(ids);
            } else {
              bm.free_many(ids);
            }
          },
          py::arg("seqs"))
      .def(
          "pin",
          [](BlockManager& bm, py::handle seq, py::handle num_tokens) {
            int64_t s = seq_arg(seq, "pin");
            return bm.pin(s, int_arg(num_tokens, "pin", "num_tokens"));
          },
          py::arg("seq"), py::arg("num_tokens"))
      .def(
          "unpin", [](BlockManager& bm, py::handle pin_id) { bm.unpin(seq_arg(pin_id, "unpin", "pin_id")); },
          py::arg("pin_id"))
      .def(
          "block_table", [](BlockManager& bm, py::handle seq) { return bm.block_table(seq_arg(seq, "block_table")); },
          py::arg("seq"))
      .def(
          "slots",
          [](BlockManager& bm, py::handle seq, py::handle start, py::handle end) {
            int64_t s = seq_arg(seq, "slots");
            int64_t a = int_arg(start, "slots", "start");
            return bm.slots(s, a, int_arg(end, "slots", "end"));
          },
          py::arg("seq"), py::arg("start"), py::arg("end"))
      .def(
          "num_tokens", [](BlockManager& bm, py::handle seq) { return bm.num_tokens(seq_arg(seq, "num_tokens")); },
          py::arg("seq"))
      .def(
          "has_sequence",
          [](BlockManager& bm, py::handle seq) {
            int64_t s = 0;
            if (!fits_int64(index_arg(seq, "has_sequence", "seq"), &s)) return false;
            return bm.has_sequence(s);
          },
          py::arg("seq"))
      .def(
          "is_pinned", [](BlockManager& bm, py::handle seq) { return bm.is_pinned(seq_arg(seq, "is_pinned")); },
          py::arg("seq"))
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
