#include "hash_tables.h"

#include <algorithm>
#include <climits>
#include <cstring>

#include "common.h"

namespace rloss {

namespace {

// Open-addressing geometry for `expected` keys: a power-of-two capacity of at least twice that
// (16 at least) and the shift that maps a 64-bit multiplicative hash onto it.
std::size_t table_capacity(std::size_t expected, int* shift) {
  std::size_t cap = 16;
  while (cap < 2 * expected) cap *= 2;
  int bits = 0;
  while ((std::size_t{1} << bits) < cap) ++bits;
  *shift = 64 - bits;
  return cap;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// KeyTable

void KeyTable::reset(int key_len, std::size_t expected) {
  key_len_ = key_len;
  count_ = 0;
  slots_.assign(table_capacity(expected, &shift_), Slot{0, -1});
  keys_.clear();
  hashes_.clear();
  keys_.reserve(expected * key_len);
  hashes_.reserve(expected);
}

void KeyTable::grow() {
  const std::size_t cap = slots_.size() * 2;
  shift_ -= 1;
  slots_.assign(cap, Slot{0, -1});
  const std::size_t mask = cap - 1;
  for (int32_t i = 0; i < count_; ++i) {
    const uint64_t h = hashes_[i];
    std::size_t s = static_cast<std::size_t>(h >> shift_);
    while (slots_[s].index >= 0) s = (s + 1) & mask;
    slots_[s] = Slot{static_cast<uint32_t>(h), i};
  }
}

int32_t KeyTable::find_or_insert(const int32_t* key, uint64_t h) {
  if (2 * static_cast<std::size_t>(count_) + 2 >= slots_.size()) grow();
  const std::size_t mask = slots_.size() - 1;
  const uint32_t tag = static_cast<uint32_t>(h);
  std::size_t s = static_cast<std::size_t>(h >> shift_);
  for (;;) {
    const Slot sl = slots_[s];
    if (sl.index < 0) break;
    if (sl.tag == tag && std::memcmp(keys_.data() + static_cast<std::size_t>(sl.index) * key_len_, key,
                                     sizeof(int32_t) * key_len_) == 0)
      return sl.index;
    s = (s + 1) & mask;
  }
  if (count_ == INT32_MAX) throw InvalidArgument("lattice: too many lattice points for int32 indices");
  const int32_t idx = count_++;
  slots_[s] = Slot{tag, idx};
  keys_.insert(keys_.end(), key, key + key_len_);
  hashes_.push_back(h);
  return idx;
}

std::size_t KeyTable::memory_bytes() const {
  return slots_.capacity() * sizeof(Slot) + keys_.capacity() * sizeof(int32_t) +
         hashes_.capacity() * sizeof(uint64_t);
}

// ------------------------------------------------------------------------------------------------
// PackedTable

void PackedTable::reset(std::size_t expected) {
  count_ = 0;
  slots_.assign(table_capacity(expected, &shift_), Slot{0, -1, 0});
  keys_.resize(expected);
}

void PackedTable::grow() {
  const std::size_t cap = slots_.size() * 2;
  shift_ -= 1;
  slots_.assign(cap, Slot{0, -1, 0});
  const std::size_t mask = cap - 1;
  for (int32_t i = 0; i < count_; ++i) {
    const uint64_t k = keys_[i];
    std::size_t s = static_cast<std::size_t>((k * kHashMul) >> shift_);
    while (slots_[s].key != 0) s = (s + 1) & mask;
    slots_[s] = Slot{k, i, 0};
  }
}

int32_t PackedTable::find_or_insert(uint64_t key) {
  int32_t idx;
  insert_batch(&key, 1, &idx);
  return idx;
}

void PackedTable::insert_batch(const uint64_t* keys, int count, int32_t* out) {
  while (2 * (static_cast<std::size_t>(count_) + count) + 2 >= slots_.size()) grow();
  if (keys_.size() < static_cast<std::size_t>(count_) + count) {
    const std::size_t want = std::max<std::size_t>(2 * keys_.size(), static_cast<std::size_t>(count_) + count);
    if (want > static_cast<std::size_t>(INT32_MAX)) throw InvalidArgument("lattice: too many lattice points");
    keys_.resize(want);
  }
  Slot* const slots = slots_.data();
  uint64_t* const kstore = keys_.data();
  const std::size_t mask = slots_.size() - 1;
  const int sh = shift_;
  std::size_t home[64];
  int32_t n = count_;
  for (int b0 = 0; b0 < count; b0 += 64) {
    const int b1 = std::min(count, b0 + 64);
    for (int i = b0; i < b1; ++i) {
      home[i - b0] = static_cast<std::size_t>((keys[i] * kHashMul) >> sh);
      __builtin_prefetch(slots + home[i - b0]);
    }
    for (int i = b0; i < b1; ++i) {
      const uint64_t key = keys[i];
      std::size_t s = home[i - b0];
      int32_t idx;
      for (;;) {
        const uint64_t k = slots[s].key;
        if (k == key) {
          idx = slots[s].index;
          break;
        }
        if (k == 0) {
          idx = n++;
          slots[s].key = key;
          slots[s].index = idx;
          kstore[idx] = key;
          break;
        }
        s = (s + 1) & mask;
      }
      out[i] = idx;
    }
  }
  count_ = n;
}

std::size_t PackedTable::memory_bytes() const {
  return slots_.capacity() * sizeof(Slot) + keys_.capacity() * sizeof(uint64_t);
}

}  // namespace rloss
