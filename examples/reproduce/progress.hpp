#pragma once
// A progress display on stderr: one line per phase, redrawn in place on a terminal
// (at most five times a second), or a line at every quarter when stderr is a file or pipe.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

namespace skillgraft::reproduce {

class progress {
 public:
  explicit progress(bool quiet = false, bool redraw = true) : quiet_(quiet), tty_(redraw && ::isatty(2) == 1) {}

  void begin(std::string label, int total) {
    label_ = std::move(label);
    total_ = total;
    start_ = last_ = clock::now();
    quarter_ = 0;
  }
  // Every step's loss is appended to *out from now on (tests compare two runs step by step).
  void keep_losses(std::vector<double>* out) { losses_ = out; }

  void step(int done, double loss) {
    if (losses_) losses_->push_back(loss);
    if (quiet_) return;
    const auto now = clock::now();
    if (tty_) {
      if (done != total_ && now - last_ < std::chrono::milliseconds(200)) return;
      last_ = now;
      std::fprintf(stderr, "\r%s", line(done, loss).c_str());
    } else {
      const int q = total_ > 0 ? 4 * done / total_ : 4;
      if (q <= quarter_) return;
      quarter_ = q;
      std::fprintf(stderr, "%s\n", line(done, loss).c_str());
    }
    std::fflush(stderr);
  }
  void end() {
    if (!quiet_ && tty_) std::fprintf(stderr, "\n");
  }
  // A message on its own line.
  void note(const std::string& text) const {
    if (!quiet_) std::fprintf(stderr, "%s\n", text.c_str());
  }

 private:
  using clock = std::chrono::steady_clock;
  std::string line(int done, double loss) const {
    const int width = 24, filled = total_ > 0 ? width * done / total_ : width;
    const double secs = std::chrono::duration<double>(clock::now() - start_).count();
    char buf[256];
    std::snprintf(buf, sizeof buf, "%-34s [%s%s] %5d/%-5d loss %7.4f  %6.1f s", label_.c_str(),
                  std::string(std::size_t(filled), '#').c_str(), std::string(std::size_t(width - filled), '.').c_str(),
                  done, total_, loss, secs);
    return buf;
  }
  bool quiet_, tty_;
  std::string label_;
  int total_ = 0, quarter_ = 0;
  clock::time_point start_, last_;
  std::vector<double>* losses_ = nullptr;
};

}  // namespace skillgraft::reproduce
