#pragma once
// Opening a file that must be a regular file, without ever blocking on something else.
//
// A named pipe (FIFO) in place of a checkpoint file would make a plain open() wait for
// a writer forever, and a directory in its place gives an error that does not say
// which path was wrong. The file is opened with O_NONBLOCK (which only matters for
// FIFOs and devices), checked with fstat on that same descriptor (no race between the
// check and the use), and only then switched back to blocking reads.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>

namespace skillgraft::io {

// What a path that is not a regular file is, for messages ("a directory", ...).
inline std::string file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a named pipe (FIFO)";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "of another kind";
}

// A read-only descriptor of `file`, closed on destruction. Throws std::invalid_argument
// naming the file when it is missing, unreadable or not a regular file.
class regular_file {
 public:
  explicit regular_file(const std::filesystem::path& file) : path_(file) {
    fd_ = ::open(file.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd_ < 0)
      throw std::invalid_argument("skillgraft: cannot open " + file.string() + ": " + std::strerror(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      close();
      throw std::system_error(err, std::generic_category(), "skillgraft: cannot stat " + file.string());
    }
    if (!S_ISREG(st.st_mode)) {
      close();
      throw std::invalid_argument("skillgraft: " + file.string() + " is not a regular file (it is " + file_kind(st.st_mode) +
                                  ")");
    }
    size_ = static_cast<std::uintmax_t>(st.st_size);
    const int flags = ::fcntl(fd_, F_GETFL);
    if (flags >= 0) ::fcntl(fd_, F_SETFL, flags & ~O_NONBLOCK);
  }
  regular_file(const regular_file&) = delete;
  regular_file& operator=(const regular_file&) = delete;
  ~regular_file() { close(); }

  int fd() const { return fd_; }
  std::uintmax_t size() const { return size_; }
  const std::filesystem::path& path() const { return path_; }

  // The whole file as bytes (for small side files such as config.json).
  std::string read_all(std::uintmax_t limit = std::uintmax_t{1} << 30) const {
    if (size_ > limit)
      throw std::invalid_argument("skillgraft: " + path_.string() + " is " + std::to_string(size_) +
                                  " bytes, more than the " + std::to_string(limit) + " a side file may have");
    std::string text;
    char buffer[1 << 16];
    for (;;) {
      const ::ssize_t n = ::read(fd_, buffer, sizeof buffer);
      if (n < 0) {
        if (errno == EINTR) continue;
        throw std::system_error(errno, std::generic_category(), "skillgraft: cannot read " + path_.string());
      }
      if (n == 0) break;
      text.append(buffer, static_cast<std::size_t>(n));
      if (text.size() > limit)
        throw std::invalid_argument("skillgraft: " + path_.string() + " grew past " + std::to_string(limit) +
                                    " bytes while it was read");
    }
    return text;
  }

 private:
  void close() {
    if (fd_ >= 0) ::close(std::exchange(fd_, -1));
  }
  std::filesystem::path path_;
  int fd_ = -1;
  std::uintmax_t size_ = 0;
};

}  // namespace skillgraft::io
