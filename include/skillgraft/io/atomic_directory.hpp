#pragma once
// Replace a directory of files (a checkpoint: weights, config.json, ...) all at once or
// not at all.
//
//   io::atomic_directory out("ckpt");
//   writer.write(out.staging() / "model.safetensors");   // every file goes to staging()
//   io::write_json_file(out.staging() / "config.json", config);
//   out.commit();                                         // the one switch
//
// staging() is a fresh sibling directory "<target>.saving-<pid>-<n>" on the same file
// system. commit() carries over the entries of the old target that the new files do
// not replace (tokenizer files, a README: hard links, so nothing is copied), syncs the
// staging directory, and then swaps it with the target in one rename
// (renameat2 RENAME_EXCHANGE); a reader sees either the whole old directory or the
// whole new one, never new weights beside an old config.json. The old directory, now
// at the staging name, is removed afterwards.
//
// A save killed before the switch leaves the target untouched and a staging directory
// beside it; one killed after the switch leaves the old checkpoint under the staging
// name. The next save into the same target removes such leftovers of processes that no
// longer run (stale_leftovers lists them), and the loaders ignore them.
//
// File systems without RENAME_EXCHANGE (some network file systems) fall back to two
// renames: old target aside, staging in its place. A kill between them leaves no
// directory at the target; the old checkpoint is then the "<target>.saving-<pid>-<n>"
// directory beside it, which the next save does not remove while the target is missing.
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "skillgraft/io/atomic_file.hpp"

namespace skillgraft::io {

namespace detail {

inline void fsync_path(const std::filesystem::path& p, bool directory) {
  const int fd = ::open(p.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "skillgraft: cannot open " + p.string() + " to sync it");
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0 && err != EINVAL)  // some file systems cannot sync a directory
    throw std::system_error(err, std::generic_category(), "skillgraft: cannot sync " + p.string());
}

}  // namespace detail

// Leftovers of saves into `target` by processes that no longer run: staging
// directories beside it and atomic_file temporaries inside it.
inline std::vector<std::filesystem::path> stale_leftovers(const std::filesystem::path& target) {
  namespace fs = std::filesystem;
  std::vector<fs::path> found;
  std::error_code ec;
  const fs::path parent = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  const std::string prefix = target.filename().string() + ".saving-";
  // Without the target, a staging directory may hold the only copy of the old checkpoint.
  if (fs::is_directory(target, ec))
    for (const auto& e : fs::directory_iterator(parent, ec))
      if (const long pid = detail::pid_after(e.path().filename().string(), prefix); pid > 0 && detail::process_gone(pid))
        found.push_back(e.path());
  if (fs::is_directory(target, ec))
    for (const auto& e : fs::directory_iterator(target, ec))
      if (const long pid = detail::temp_file_pid(e.path().filename().string()); pid > 0 && detail::process_gone(pid))
        found.push_back(e.path());
  return found;
}

class atomic_directory {
 public:
  // Removes stale leftovers of earlier saves into `target`, then creates the staging
  // directory. Throws std::system_error naming the target when that is impossible, and
  // std::invalid_argument when the target exists and is not a directory.
  explicit atomic_directory(std::filesystem::path target) : target_(std::move(target)) {
    namespace fs = std::filesystem;
    if (target_.filename().empty()) target_ = target_.parent_path();  // "dir/" -> "dir"
    std::error_code ec;
    // A symbolic link to a directory: the directory it points to is replaced, the link kept.
    if (fs::is_symlink(fs::symlink_status(target_, ec)) && fs::is_directory(target_, ec))
      target_ = fs::canonical(target_);
    if (fs::exists(fs::symlink_status(target_, ec)) && !fs::is_directory(fs::symlink_status(target_, ec)))
      throw std::invalid_argument("skillgraft: cannot save a checkpoint to " + target_.string() +
                                  ": it exists and is not a directory");
    for (const auto& p : stale_leftovers(target_)) fs::remove_all(p, ec);
    const fs::path parent = target_.parent_path();
    if (!parent.empty()) fs::create_directories(parent);
    static std::atomic<unsigned> counter{0};
    staging_ = target_;
    staging_ += ".saving-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
    fs::remove_all(staging_, ec);
    if (::mkdir(staging_.c_str(), 0777) != 0)
      throw std::system_error(errno, std::generic_category(),
                              "skillgraft: cannot save " + target_.string() + ": cannot create " + staging_.string());
  }
  atomic_directory(const atomic_directory&) = delete;
  atomic_directory& operator=(const atomic_directory&) = delete;
  ~atomic_directory() {
    std::error_code ec;
    if (!committed_) std::filesystem::remove_all(staging_, ec);
  }

  const std::filesystem::path& target() const { return target_; }
  const std::filesystem::path& staging() const { return staging_; }

  // Makes the staging directory the target (see the top of this file). On a failure
  // before the switch the target is as it was and the staging directory is removed.
  void commit() {
    namespace fs = std::filesystem;
    std::error_code ec;
    const bool replacing = fs::is_directory(fs::symlink_status(target_, ec));
    try {
      if (replacing) {
        carry_over(target_, staging_);
        struct stat st {};
        if (::stat(target_.c_str(), &st) == 0) ::chmod(staging_.c_str(), st.st_mode & 07777);
      }
      detail::fsync_path(staging_, true);
    } catch (...) {
      fs::remove_all(staging_, ec);
      throw;
    }
    if (!replacing) {
      if (::renameat2(AT_FDCWD, staging_.c_str(), AT_FDCWD, target_.c_str(), RENAME_NOREPLACE) != 0 &&
          !((errno == EINVAL || errno == ENOSYS) && std::rename(staging_.c_str(), target_.c_str()) == 0))
        fail("cannot rename " + staging_.string() + " to " + target_.string());
      committed_ = true;
      sync_parent();
      return;
    }
    if (::renameat2(AT_FDCWD, staging_.c_str(), AT_FDCWD, target_.c_str(), RENAME_EXCHANGE) != 0) {
      if (errno != EINVAL && errno != ENOSYS) fail("cannot exchange " + staging_.string() + " and " + target_.string());
      // No atomic exchange here: old target aside under a name the next save recognises.
      fs::path aside = staging_;
      aside += "-old";
      if (std::rename(target_.c_str(), aside.c_str()) != 0) fail("cannot move " + target_.string() + " aside");
      if (std::rename(staging_.c_str(), target_.c_str()) != 0) {
        const int err = errno;
        std::rename(aside.c_str(), target_.c_str());
        errno = err;
        fail("cannot rename " + staging_.string() + " to " + target_.string());
      }
      committed_ = true;
      sync_parent();
      fs::remove_all(aside, ec);
      return;
    }
    committed_ = true;
    sync_parent();
    fs::remove_all(staging_, ec);  // the old checkpoint now lives there
  }

 private:
  // Entries of the old directory that the new one does not have, as hard links (copies
  // where the file system has none); leftovers of earlier saves are not carried.
  static void carry_over(const std::filesystem::path& from, const std::filesystem::path& to) {
    namespace fs = std::filesystem;
    for (const auto& e : fs::directory_iterator(from)) {
      const fs::path dst = to / e.path().filename();
      std::error_code ec;
      if (fs::exists(fs::symlink_status(dst, ec))) continue;
      if (detail::temp_file_pid(e.path().filename().string()) > 0) continue;
      const auto st = e.symlink_status();
      if (fs::is_symlink(st)) {
        fs::copy_symlink(e.path(), dst);
      } else if (fs::is_directory(st)) {
        fs::create_directory(dst, e.path());
        carry_over(e.path(), dst);
        detail::fsync_path(dst, true);
      } else if (fs::is_regular_file(st)) {
        fs::create_hard_link(e.path(), dst, ec);
        if (ec) fs::copy_file(e.path(), dst);
      }
      // Sockets, FIFOs and devices are not part of a checkpoint and are not carried.
    }
  }
  void sync_parent() {
    const std::filesystem::path parent = target_.parent_path().empty() ? "." : target_.parent_path();
    detail::fsync_path(parent, true);
  }
  [[noreturn]] void fail(const std::string& what) {
    const int err = errno;
    std::error_code ec;
    std::filesystem::remove_all(staging_, ec);
    throw std::system_error(err, std::generic_category(), "skillgraft: cannot save " + target_.string() + ": " + what);
  }

  std::filesystem::path target_;
  std::filesystem::path staging_;
  bool committed_ = false;
};

// Writes a directory atomically: write(staging) puts every file into the staging
// directory, then it replaces `target` in one switch. Any failure leaves `target` as it
// was and is rethrown with the target named ("cannot save <target> (it was left
// unchanged): ..."), keeping the exception's type for std::system_error and
// std::invalid_argument.
template <class Write>
void save_directory(const std::filesystem::path& target, Write&& write) {
  const std::string prefix = "skillgraft: cannot save " + target.string() + " (it was left unchanged): ";
  auto strip = [](std::string what) {
    if (what.rfind("skillgraft: ", 0) == 0) what.erase(0, 12);
    return what;
  };
  try {
    atomic_directory staged(target);
    write(staged.staging());
    staged.commit();
  } catch (const std::system_error& e) {
    std::string what = strip(e.what());
    const std::string tail = ": " + e.code().message();  // system_error appends it again
    if (what.ends_with(tail)) what.erase(what.size() - tail.size());
    throw std::system_error(e.code(), prefix + what);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(prefix + strip(e.what()));
  }
}

}  // namespace skillgraft::io
