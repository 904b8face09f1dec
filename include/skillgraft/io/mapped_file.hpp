#pragma once
// A whole file mapped read-only into memory (POSIX mmap), unmapped on destruction.
//
// Checkpoints are read by mapping rather than by reading into a buffer so that
// opening a multi-gigabyte file costs nothing until a tensor is touched, and a
// tensor is converted straight from the page cache into its destination.
// MAP_PRIVATE + PROT_READ: the mapping can never write back to the file.
//
// Caveat of every mmap reader: if another process truncates the file while it is
// mapped, touching the lost pages raises SIGBUS. Checkpoints written through
// `atomic_file` are replaced by rename, never truncated in place, so a reader of the
// old file keeps its (now unlinked) pages.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

#include "skillgraft/io/regular_file.hpp"

namespace skillgraft::io {

class mapped_file {
 public:
  // Throws std::invalid_argument naming the file when it cannot be opened (missing, no
  // permission) or is not a regular file (a directory, a FIFO), std::system_error when
  // mapping fails.
  explicit mapped_file(std::filesystem::path file) : path_(std::move(file)) {
    // Checked as a regular file before anything reads it: a FIFO would block forever.
    const regular_file f(path_);
    if (f.size() > std::numeric_limits<std::size_t>::max())
      throw std::invalid_argument("skillgraft: " + path_.string() + " is too large to map");
    const int fd = f.fd();
    size_ = static_cast<std::size_t>(f.size());
    if (size_ == 0) return;  // mmap rejects length 0; an empty file is an empty span
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED)
      throw std::system_error(errno, std::generic_category(), "skillgraft: cannot map " + path_.string());
    data_ = static_cast<const std::uint8_t*>(p);
  }

  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  mapped_file(mapped_file&& o) noexcept
      : path_(std::move(o.path_)), data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  mapped_file& operator=(mapped_file&& o) noexcept {
    if (this != &o) {
      unmap();
      path_ = std::move(o.path_);
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~mapped_file() { unmap(); }

  const std::uint8_t* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::span<const std::uint8_t> bytes() const { return {data_, size_}; }
  const std::filesystem::path& path() const { return path_; }

 private:
  void unmap() {
    if (data_) ::munmap(const_cast<std::uint8_t*>(data_), size_);
    data_ = nullptr;
    size_ = 0;
  }
  std::filesystem::path path_;
  const std::uint8_t* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace skillgraft::io
