#include "workspace_pool.h"

#include <mutex>

namespace rloss {

namespace {
std::mutex g_pool_mutex;
std::vector<std::unique_ptr<Lattice>> g_pool;
}  // namespace

LatticeLease::LatticeLease(int64_t count) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  for (int64_t i = 0; i < count; ++i) {
    if (!g_pool.empty()) {
      items_.push_back(std::move(g_pool.back()));
      g_pool.pop_back();
    } else {
      items_.push_back(std::make_unique<Lattice>());
    }
  }
}

LatticeLease::~LatticeLease() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  for (auto& l : items_) g_pool.push_back(std::move(l));
}

std::size_t workspace_bytes() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  std::size_t s = 0;
  for (const auto& l : g_pool) s += l->memory_bytes();
  return s;
}

}  // namespace rloss
