// The two open-addressing hash tables that number the lattice points: entries get indices in
// insertion order (which fixes the original's vertex order).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace rloss {

constexpr uint64_t kHashMul = 0x9E3779B97F4A7C15ull;

// Multiplicative hash of a key of len int32 coordinates (for KeyTable).
inline uint64_t hash_key(const int32_t* k, int len) {
  uint64_t h = 0;
  for (int i = 0; i < len; ++i) h = (h + static_cast<uint32_t>(k[i])) * kHashMul;
  return h ^ (h >> 29);
}

// Keys of fixed length in int32 coordinates (any range the float embedding supports).
class KeyTable {
 public:
  void reset(int key_len, std::size_t expected);
  int32_t find_or_insert(const int32_t* key, uint64_t h);
  int32_t find(const int32_t* key, uint64_t h) const;  // -1 when absent (inline: the neighbour search)
  int32_t size() const { return count_; }
  const int32_t* key(int32_t i) const { return keys_.data() + static_cast<std::size_t>(i) * key_len_; }
  uint64_t hash(int32_t i) const { return hashes_[static_cast<std::size_t>(i)]; }
  std::size_t memory_bytes() const;

 private:
  void grow();
  struct Slot {
    uint32_t tag;
    int32_t index;  // -1 = empty
  };
  int key_len_ = 0;
  int32_t count_ = 0;
  int shift_ = 64;
  std::vector<Slot> slots_;
  std::vector<int32_t> keys_;
  std::vector<uint64_t> hashes_;
};

// Keys packed into one uint64 (fields of `bits` bits per coordinate, biased to be positive; 0 never
// occurs as a key and marks empty slots). The fast path, for feature dimensions up to 8.
class PackedTable {
 public:
  void reset(std::size_t expected);
  int32_t find_or_insert(uint64_t key);
  int32_t find(uint64_t key) const;  // -1 when absent (inline: the neighbour search)
  // Finds or inserts keys[0..count) in order (first slots prefetched first), writes their indices to out.
  void insert_batch(const uint64_t* keys, int count, int32_t* out);
  int32_t size() const { return count_; }
  uint64_t key(int32_t i) const { return keys_[static_cast<std::size_t>(i)]; }
  std::size_t memory_bytes() const;

 private:
  void grow();
  struct Slot {
    uint64_t key;  // 0 = empty
    int32_t index;
    int32_t pad;
  };
  int32_t count_ = 0;
  int shift_ = 64;
  std::vector<Slot> slots_;
  std::vector<uint64_t> keys_;
};

inline int32_t KeyTable::find(const int32_t* key, uint64_t h) const {
  const std::size_t mask = slots_.size() - 1;
  const uint32_t tag = static_cast<uint32_t>(h);
  std::size_t s = static_cast<std::size_t>(h >> shift_);
  for (;;) {
    const Slot sl = slots_[s];
    if (sl.index < 0) return -1;
    if (sl.tag == tag && std::memcmp(keys_.data() + static_cast<std::size_t>(sl.index) * key_len_, key,
                                     sizeof(int32_t) * key_len_) == 0)
      return sl.index;
    s = (s + 1) & mask;
  }
}

inline int32_t PackedTable::find(uint64_t key) const {
  const std::size_t mask = slots_.size() - 1;
  std::size_t s = static_cast<std::size_t>((key * kHashMul) >> shift_);
  for (;;) {
    const uint64_t k = slots_[s].key;
    if (k == key) return slots_[s].index;
    if (k == 0) return -1;
    s = (s + 1) & mask;
  }
}

}  // namespace rloss
