// Lattices borrowed from a process-wide pool, so that repeated batch calls reuse their buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "lattice.h"

namespace rloss {

// `count` lattices taken from the pool (new ones when it runs dry), returned to it when the lease ends.
class LatticeLease {
 public:
  explicit LatticeLease(int64_t count);
  ~LatticeLease();
  LatticeLease(const LatticeLease&) = delete;
  LatticeLease& operator=(const LatticeLease&) = delete;
  Lattice& operator[](int64_t i) { return *items_[static_cast<std::size_t>(i)]; }
  std::size_t size() const { return items_.size(); }

 private:
  std::vector<std::unique_ptr<Lattice>> items_;
};

// Bytes held by the lattices resting in the pool.
std::size_t workspace_bytes();

}  // namespace rloss
