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

namespace skillgraft::io {

class mapped_file {
 public:
  // Throws std::invalid_argument when the file cannot be opened (missing, no
  // permission) or is not a regular file, std::system_error when mapping fails.
  explicit mapped_file(std::filesystem::path file) : path_(std::move(file)) {
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0)
      throw std::invalid_argument("skillgraft: cannot open " + path_.string() + ": " + std::strerror(errno));
    // The descriptor is only needed until the mapping exists.
    struct closer {
      int fd;
      ~closer() { ::close(fd); }
    } close_on_exit{fd};

    struct stat st {};
    if (::fstat(fd, &st) != 0)
      throw std::system_error(errno, std::generic_category(), "skillgraft: cannot stat " + path_.string());
    if (!S_ISREG(st.st_mode)) throw std::invalid_argument("skillgraft: " + path_.string() + " is not a regular file");
    if (static_cast<std::uintmax_t>(st.st_size) > std::numeric_limits<std::size_t>::max())
      throw std::invalid_argument("skillgraft: " + path_.string() + " is too large to map");
    size_ = static_cast<std::size_t>(st.st_size);
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
