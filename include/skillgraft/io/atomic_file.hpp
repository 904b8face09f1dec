#pragma once
// Replace a file all at once or not at all.
//
// Bytes go to "<target>.tmp-<pid>" in the target's own directory (rename is only
// atomic within one file system); `commit()` flushes, fsyncs the data, renames the
// temporary over the target and fsyncs the directory so that the rename itself
// survives a crash. Until the rename the old target is never opened, so any failure
// before it -- a full disk, a size limit, an exception thrown while producing the
// bytes -- leaves the last good file byte-identical. The destructor of an
// uncommitted file removes the temporary, so no half-written file is left behind; the
// temporaries of killed processes (which no destructor removed) are removed by the next
// atomic_file for the same target.
//
// The new file gets default permissions (0666 minus the umask), not those of the
// file it replaces; a symbolic link at the target is replaced, not followed.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace skillgraft::io {

namespace detail {

// The pid in "<prefix><pid>" or "<prefix><pid>-<n>", or -1.
inline long pid_after(std::string_view name, std::string_view prefix) {
  if (!name.starts_with(prefix)) return -1;
  name.remove_prefix(prefix.size());
  long pid = -1;
  const auto [end, ec] = std::from_chars(name.data(), name.data() + name.size(), pid);
  if (ec != std::errc{} || pid <= 0) return -1;
  if (end != name.data() + name.size() && *end != '-') return -1;
  return pid;
}

inline bool process_gone(long pid) {
  return pid != static_cast<long>(::getpid()) && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

// An atomic_file temporary ("<file>.tmp-<pid>") inside a checkpoint directory.
inline long temp_file_pid(const std::string& name) {
  const auto at = name.rfind(".tmp-");
  if (at == std::string::npos) return -1;
  return pid_after(std::string_view(name).substr(at), ".tmp-");
}

}  // namespace detail

class atomic_file {
 public:
  // Creates (or truncates a stale) "<target>.tmp-<pid>". Throws std::system_error
  // naming the target when the directory does not exist or is not writable.
  explicit atomic_file(std::filesystem::path target) : target_(std::move(target)) {
    remove_stale_temporaries();
    temp_ = target_;
    temp_ += ".tmp-" + std::to_string(::getpid());
    fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd_ < 0) fail("cannot create temporary file " + temp_.string());
    buffer_.reserve(buffer_bytes);
  }
  atomic_file(const atomic_file&) = delete;
  atomic_file& operator=(const atomic_file&) = delete;
  ~atomic_file() { discard(); }

  // Buffered; large blocks go straight to the file.
  void write(const void* data, std::size_t n) {
    const auto* p = static_cast<const char*>(data);
    if (buffer_.size() + n > buffer_bytes) flush();
    if (n >= buffer_bytes) {
      write_fully(p, n);
    } else {
      buffer_.insert(buffer_.end(), p, p + n);
    }
  }

  // Makes the written bytes the content of the target. After a failure the
  // temporary is removed and the target is as it was.
  void commit() {
    flush();
    if (::fsync(fd_) != 0) fail("cannot sync " + temp_.string());
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) fail("cannot close " + temp_.string());
    if (std::rename(temp_.c_str(), target_.c_str()) != 0)
      fail("cannot rename " + temp_.string() + " to " + target_.string());
    committed_ = true;
    sync_directory();
  }

  const std::filesystem::path& target() const { return target_; }
  const std::filesystem::path& temp_path() const { return temp_; }

 private:
  static constexpr std::size_t buffer_bytes = std::size_t{1} << 20;

  // "<target>.tmp-<pid>" files of processes that no longer run (a save killed before its
  // rename) are removed, so killed saves do not pile up copies of the file.
  void remove_stale_temporaries() const {
    std::error_code ec;
    const std::filesystem::path dir = target_.parent_path().empty() ? "." : target_.parent_path();
    const std::string prefix = target_.filename().string() + ".tmp-";
    for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
      const long pid = detail::pid_after(e.path().filename().string(), prefix);
      if (pid > 0 && detail::process_gone(pid)) std::filesystem::remove(e.path(), ec);
    }
  }

  void flush() {
    if (!buffer_.empty()) write_fully(buffer_.data(), buffer_.size());
    buffer_.clear();
  }
  void write_fully(const char* p, std::size_t n) {
    while (n > 0) {
      const ::ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        fail("cannot write " + temp_.string());
      }
      p += w;
      n -= static_cast<std::size_t>(w);
    }
  }
  // The rename is only durable once the directory entry is on disk.
  void sync_directory() {
    std::filesystem::path dir = target_.parent_path();
    if (dir.empty()) dir = ".";
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) fail("wrote the file but cannot open its directory to sync it");
    const int rc = ::fsync(dfd);
    const int err = errno;
    ::close(dfd);
    // Some file systems cannot sync a directory (EINVAL); nothing more can be done there.
    if (rc != 0 && err != EINVAL) {
      errno = err;
      fail("wrote the file but cannot sync its directory");
    }
  }
  void discard() noexcept {
    if (fd_ >= 0) ::close(std::exchange(fd_, -1));
    if (!committed_) ::unlink(temp_.c_str());
  }
  // Cleans up before throwing so the caller sees the old target and no temporary.
  [[noreturn]] void fail(const std::string& what) {
    const int err = errno;
    discard();
    throw std::system_error(err, std::generic_category(), "skillgraft: cannot write " + target_.string() + ": " + what);
  }

  std::filesystem::path target_;
  std::filesystem::path temp_;
  int fd_ = -1;
  bool committed_ = false;
  std::vector<char> buffer_;
};

}  // namespace skillgraft::io
