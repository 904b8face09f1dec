#pragma once
// Reading and writing safetensors checkpoints with CPU tensors.
//
//   io::safetensors_file f("model.safetensors");            // maps and validates the whole header
//   auto w = f.load<float>("model.embed_tokens.weight");      // F32/F16/BF16/... converted to float
//   f.load_into("model.norm.weight", weights.norm);           // into a pre-shaped tensor, shape checked
//   auto ids = f.load_ids("input_ids");                       // I64/I32 as int64
//
//   io::safetensors_writer out;
//   out.set_metadata("format", "pt");
//   out.add("lm_head.weight", head, io::dtype::bf16);         // refers to `head` until write()
//   out.write("checkpoint.safetensors");                      // atomic replace
//
// Scalars: a tensor of shape [] in a file (one element) loads as shape [1],
// because rank 0 means "no tensor" for cpu::tensor. load_into accepts a [1]
// destination for it, and add_ids can write shape [] back.
// Rank: cpu::tensor has at most 4 dimensions; a file may hold tensors of higher
// rank (its header still parses): such tensors load through load_ids (integers) or raw().
#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "skillgraft/backend/cpu/tensor.hpp"
#include "skillgraft/io/atomic_file.hpp"
#include "skillgraft/io/half.hpp"
#include "skillgraft/io/mapped_file.hpp"
#include "skillgraft/io/printable.hpp"
#include "skillgraft/io/safetensors_format.hpp"

namespace skillgraft::io {

// A safetensors file opened for reading: mapped read-only, header validated in the
// constructor, tensors converted on demand. Movable, not copyable; tensors loaded
// from it own their memory and outlive it.
class safetensors_file {
 public:
  explicit safetensors_file(const std::filesystem::path& file)
      : map_(file), header_(parse_safetensors(map_.data(), map_.size(), file.string())) {
    for (std::size_t i = 0; i < header_.tensors.size(); ++i) index_.emplace(header_.tensors[i].name, i);
  }

  const std::filesystem::path& path() const { return map_.path(); }
  const safetensors_header& header() const { return header_; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  bool contains(std::string_view name) const { return index_.find(name) != index_.end(); }

  // Throws safetensors_error naming the tensor and the file when it is absent.
  const tensor_info& info(std::string_view name) const {
    const auto it = index_.find(name);
    if (it == index_.end())
      throw safetensors_error("skillgraft: no tensor named " + printable(name) + " in " + path().string());
    return header_.tensors[it->second];
  }

  // The stored bytes of a tensor (little-endian, row-major), valid while this object lives.
  std::span<const std::uint8_t> raw(std::string_view name) const {
    const tensor_info& t = info(name);
    return {map_.data() + header_.data_start + t.begin, t.bytes()};
  }

  // A new tensor of T holding the named tensor's values (see convert_elements for
  // which dtypes convert to T and how).
  template <loadable_element T>
  cpu::tensor<T> load(std::string_view name, memory_use use = memory_use::weights) const {
    const tensor_info& t = info(name);
    cpu::tensor<T> out(tensor_shape(t), use);
    convert(t, out.data());
    return out;
  }

  // Fills a tensor that already has the shape the caller expects; throws
  // "<name> has shape [..] in <file>, expected [..]" otherwise, leaving dst untouched.
  template <loadable_element T>
  void load_into(std::string_view name, cpu::tensor<T>& dst) const {
    const tensor_info& t = info(name);
    if (!same_shape(t, dst.shape()))
      throw safetensors_error("skillgraft: " + printable(t.name) + " has shape " + shape_string(t.shape) + " in " +
                              path().string() + ", expected " + dst.shape().str());
    // Convert into scratch first only when a failure could happen half-way (an
    // integer that does not fit): dst must not be left half-written.
    if (!can_fail_midway<T>(t.type)) {
      convert(t, dst.data());
    } else {
      std::vector<T> scratch(t.elements());
      convert(t, scratch.data());
      std::copy(scratch.begin(), scratch.end(), dst.data());
    }
  }

  // Throws, as load_into would, when the named tensor holds a value T cannot take (an
  // integer T cannot hold exactly, a finite F64 beyond float's range), without writing
  // anything: loaders check every tensor first so that a failure changes nothing.
  template <loadable_element T>
  void check_range(std::string_view name) const {
    const tensor_info& t = info(name);
    if (!can_fail_midway<T>(t.type)) return;
    constexpr std::size_t block = 4096;
    std::vector<T> scratch(std::min<std::size_t>(block, t.elements()));
    for (std::size_t start = 0; start < t.elements(); start += block) {
      const std::size_t n = std::min(block, t.elements() - start);
      const std::size_t width = static_cast<std::size_t>(dtype_bits(t.type) / 8);
      const conversion_result r =
          convert_elements<T>(t.type, map_.data() + header_.data_start + t.begin + start * width, n, scratch.data());
      report<T>(t, r, start);
    }
  }

  // Token ids and other integer tensors of any rank, flattened row-major. Any
  // integer dtype (U64 values above 2^63 - 1 are rejected).
  std::vector<std::int64_t> load_ids(std::string_view name) const {
    const tensor_info& t = info(name);
    if (!converts_to<std::int64_t>(t.type))
      throw safetensors_error("skillgraft: " + printable(t.name) + " in " + path().string() + " is " +
                              std::string(dtype_name(t.type)) + "; load_ids reads integer tensors (I64, I32, ...)");
    std::vector<std::int64_t> ids(t.elements());
    convert(t, ids.data());
    return ids;
  }

 private:
  // [] (a scalar) -> [1]; more than 4 dimensions cannot be a cpu::tensor.
  cpu::shape_t tensor_shape(const tensor_info& t) const {
    if (t.shape.size() > 4)
      throw safetensors_error("skillgraft: " + printable(t.name) + " has shape " + shape_string(t.shape) + " in " +
                              path().string() + "; tensors have at most 4 dimensions");
    cpu::shape_t s;
    if (t.shape.empty()) {
      s.rank = 1;
      s.dims[0] = 1;
      return s;
    }
    s.rank = static_cast<int>(t.shape.size());
    for (std::size_t i = 0; i < t.shape.size(); ++i) s.dims[i] = t.shape[i];
    return s;
  }
  static bool same_shape(const tensor_info& t, const cpu::shape_t& s) {
    if (t.shape.empty()) return s.rank == 1 && s.dims[0] == 1;
    if (t.shape.size() != static_cast<std::size_t>(s.rank)) return false;
    for (std::size_t i = 0; i < t.shape.size(); ++i)
      if (t.shape[i] != s.dims[i]) return false;
    return true;
  }
  template <class T>
  static bool can_fail_midway(dtype from) {
    if (from == dtype::f64) return !std::is_same_v<T, double>;  // a value beyond float's range
    return from != dtype::f32 && from != dtype::f16 && from != dtype::bf16 &&
           !(std::is_same_v<T, std::int64_t> && from == dtype::i64);
  }
  template <loadable_element T>
  void convert(const tensor_info& t, T* dst) const {
    const std::uint8_t* src = map_.data() + header_.data_start + t.begin;
    report<T>(t, convert_elements<T>(t.type, src, t.elements(), dst));
  }
  // Throws for a failed conversion; `first` is the index of the first converted element.
  template <loadable_element T>
  void report(const tensor_info& t, const conversion_result& r, std::size_t first = 0) const {
    if (!r.supported)
      throw safetensors_error("skillgraft: " + printable(t.name) + " in " + path().string() + " is " +
                              std::string(dtype_name(t.type)) + ", which does not convert to " +
                              std::string(element_name<T>()));
    if (r.inexact_index == conversion_result::none) return;
    const std::size_t i = first + r.inexact_index;
    if (r.out_of_range) {
      const double x = std::bit_cast<double>(
          detail::load_le<std::uint64_t>(map_.data() + header_.data_start + t.begin + 8 * i));
      char value[32], largest[32];
      std::snprintf(value, sizeof value, "%.17g", x);
      std::snprintf(largest, sizeof largest, "%.9g", double(std::numeric_limits<T>::max()));
      throw safetensors_error("skillgraft: element " + std::to_string(i) + " of " + printable(t.name) + " in " +
                              path().string() + " (F64) is " + value + ", outside the range of " +
                              std::string(element_name<T>()) + " (largest " + largest + "); it would load as infinity");
    }
    throw safetensors_error("skillgraft: element " + std::to_string(i) + " of " + printable(t.name) + " in " +
                            path().string() + " (" + std::string(dtype_name(t.type)) +
                            ") is not exactly representable as " + std::string(element_name<T>()));
  }

  mapped_file map_;
  safetensors_header header_;
  std::map<std::string, std::size_t, std::less<>> index_;
};

// Collects tensors and metadata, then writes them as one safetensors file the way
// Hugging Face's writer does (same order, same JSON, same padding), replacing the
// target atomically.
//
// The writer refers to the tensors given to add() instead of copying them -- a
// checkpoint of a model must not double its memory -- so they must stay alive and
// keep their shape until write() returns; passing a temporary does not compile, and
// a tensor whose shape changed is an error at write() (the old file is kept).
class safetensors_writer {
 public:
  // Stores t as `as`: f32, f64, f16 or bf16 (16-bit formats round to nearest even;
  // values beyond their range become infinity, as in PyTorch).
  template <class T>
    requires std::is_same_v<T, float> || std::is_same_v<T, double>
  void add(std::string name, const cpu::tensor<T>& t, dtype as = dtype::f32) {
    if (as != dtype::f32 && as != dtype::f64 && as != dtype::f16 && as != dtype::bf16)
      throw std::invalid_argument("skillgraft: cannot write " + printable(name) + " as " + std::string(dtype_name(as)) +
                                  "; tensors are written as F32, F64, F16 or BF16");
    if (t.rank() == 0)
      throw std::invalid_argument("skillgraft: cannot write " + printable(name) + ": the tensor is empty (rank 0)");
    std::vector<std::size_t> shape(t.shape().dims.begin(), t.shape().dims.begin() + t.rank());
    const cpu::shape_t added = t.shape();
    const cpu::tensor<T>* source = &t;
    const std::string label = name;
    insert(std::move(name), as, std::move(shape), [source, added, as, label](atomic_file& out) {
      if (!(source->shape() == added))
        throw std::invalid_argument("skillgraft: " + printable(label) + " changed shape from " + added.str() + " to " +
                                    source->shape().str() + " between add() and write()");
      write_elements(out, source->data(), source->size(), as);
    });
  }
  template <class T>
  void add(std::string name, const cpu::tensor<T>&& t, dtype as = dtype::f32) = delete;

  // Integer ids (token ids, labels) as I64; `shape` may be [] for a scalar.
  void add_ids(std::string name, std::vector<std::int64_t> ids, std::vector<std::size_t> shape) {
    std::size_t n = 1;
    for (std::size_t d : shape)
      if (!detail::checked_mul(n, d, n)) throw std::invalid_argument("skillgraft: shape of " + printable(name) + " overflows");
    if (n != ids.size())
      throw std::invalid_argument("skillgraft: " + printable(name) + " has " + std::to_string(ids.size()) +
                                  " ids, but shape " + shape_string(shape) + " holds " + std::to_string(n));
    insert(std::move(name), dtype::i64, std::move(shape), [ids = std::move(ids)](atomic_file& out) {
      write_integers(out, ids);
    });
  }

  void set_metadata(std::string key, std::string value) {
    if (!detail::is_valid_utf8(key) || !detail::is_valid_utf8(value))
      throw std::invalid_argument("skillgraft: safetensors metadata must be UTF-8 (key " + printable(key) + ")");
    metadata_[std::move(key)] = std::move(value);
  }

  std::size_t size() const { return entries_.size(); }

  // Writes "<file>.tmp-<pid>", fsyncs it, renames it over `file` and fsyncs the
  // directory. On any failure the temporary is removed and an existing `file` is
  // left byte-identical.
  void write(const std::filesystem::path& file) const {
    std::vector<const entry*> order;
    for (const auto& e : entries_) order.push_back(&e);
    std::sort(order.begin(), order.end(),
              [](const entry* a, const entry* b) { return hf_write_order(a->info, b->info); });
    std::vector<tensor_info> layout;
    std::size_t offset = 0;
    for (const entry* e : order) {
      tensor_info t = e->info;
      t.begin = offset;
      offset += e->bytes;
      t.end = offset;
      layout.push_back(std::move(t));
    }
    const std::string header = encode_safetensors_header(layout, metadata_);

    atomic_file out(file);
    std::uint8_t length[8];
    detail::store_le<std::uint64_t>(length, header.size());
    out.write(length, sizeof length);
    out.write(header.data(), header.size());
    try {
      for (const entry* e : order) e->emit(out);
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(std::string(e.what()) + " (writing " + file.string() + "; it was left unchanged)");
    }
    out.commit();
  }

 private:
  struct entry {
    tensor_info info;  // name, dtype, shape; offsets are assigned by write()
    std::size_t bytes;
    std::function<void(atomic_file&)> emit;
  };

  void insert(std::string name, dtype as, std::vector<std::size_t> shape, std::function<void(atomic_file&)> emit) {
    if (name == "__metadata__")
      throw std::invalid_argument("skillgraft: __metadata__ is reserved and cannot name a tensor");
    if (!detail::is_valid_utf8(name)) throw std::invalid_argument("skillgraft: tensor names must be UTF-8");
    if (names_.contains(name)) throw std::invalid_argument("skillgraft: the writer already has a tensor named " + printable(name));
    names_.insert(name);
    entry e;
    e.info.name = std::move(name);
    e.info.type = as;
    e.info.shape = std::move(shape);
    e.bytes = e.info.elements() * static_cast<std::size_t>(dtype_bits(as) / 8);
    e.emit = std::move(emit);
    entries_.push_back(std::move(e));
  }

  // Converts in blocks so a large tensor never needs a full-size staging copy.
  template <class T>
  static void write_elements(atomic_file& out, const T* data, std::size_t n, dtype as) {
    if (as == dtype::f32 && std::is_same_v<T, float> && std::endian::native == std::endian::little) {
      out.write(data, n * sizeof(float));
      return;
    }
    if (as == dtype::f64 && std::is_same_v<T, double> && std::endian::native == std::endian::little) {
      out.write(data, n * sizeof(double));
      return;
    }
    constexpr std::size_t block = 4096;
    std::uint8_t buffer[block * 8];
    for (std::size_t start = 0; start < n; start += block) {
      const std::size_t m = std::min(block, n - start);
      std::uint8_t* p = buffer;
      for (std::size_t i = 0; i < m; ++i) {
        const T x = data[start + i];
        switch (as) {
          case dtype::f32: detail::store_le(p, std::bit_cast<std::uint32_t>(static_cast<float>(x))), p += 4; break;
          case dtype::f64: detail::store_le(p, std::bit_cast<std::uint64_t>(static_cast<double>(x))), p += 8; break;
          case dtype::f16: detail::store_le(p, to_half(x)), p += 2; break;
          default: detail::store_le(p, to_bfloat16(x)), p += 2; break;
        }
      }
      out.write(buffer, static_cast<std::size_t>(p - buffer));
    }
  }
  static void write_integers(atomic_file& out, const std::vector<std::int64_t>& ids) {
    if constexpr (std::endian::native == std::endian::little) {
      out.write(ids.data(), ids.size() * sizeof(std::int64_t));
    } else {
      for (std::int64_t v : ids) {
        std::uint8_t b[8];
        detail::store_le(b, static_cast<std::uint64_t>(v));
        out.write(b, 8);
      }
    }
  }

  std::vector<entry> entries_;
  std::set<std::string, std::less<>> names_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace skillgraft::io
