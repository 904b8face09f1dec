// Bad input and crashes: checkpoints survive them as documented (docs/checkpoints.md).
//
// Each test case here was a failure once: a config.json number that divided by zero or
// wrapped, a config of a large model beside small weights that allocated gigabytes, a
// FIFO that blocked the loader, a save killed half-way that left new weights beside an
// old config.json, an AdamW step whose second moment overflowed, a tensor name whose
// escape sequence reached the terminal, an F64 value that loaded as infinity.
#include <catch2/catch.hpp>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "skillgraft/cl/lora_checkpoint.hpp"
#include "skillgraft/io/atomic_directory.hpp"
#include "skillgraft/io/json_file.hpp"
#include "skillgraft/io/printable.hpp"
#include "skillgraft/model/hf_checkpoint.hpp"
#include "skillgraft/model/hf_config.hpp"
#include "skillgraft/train/adamw.hpp"
#include "skillgraft/train/sgd.hpp"
#include "support/random.hpp"
#include "support/temp_dir.hpp"

namespace sg = skillgraft;
namespace io = skillgraft::io;
namespace fs = std::filesystem;
using Catch::Contains;
using sg::test::dir_names;
using sg::test::read_text;
using sg::test::temp_dir;

namespace {

const fs::path llama_dir = fs::path(SKILLGRAFT_TEST_DATA) / "lm_llama";
const fs::path qwen2_dir = fs::path(SKILLGRAFT_TEST_DATA) / "lm_qwen2";

nlohmann::json llama_config() { return io::read_json_file(llama_dir / "config.json"); }

// The message of what f throws ("" when it does not).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

std::string config_error(const nlohmann::json& j) {
  return error_of([&] { sg::model::decoder_config_from_hf(j, "config.json"); });
}

// Runs f in a forked child and returns its exit status (or 128 + the signal that ended
// it). The child is killed after `seconds`, so a call that blocks fails the test
// instead of hanging it.
int in_child(const std::function<int()>& f, unsigned seconds = 20) {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::alarm(seconds);
    int rc = 99;
    try {
      rc = f();
    } catch (...) {
      rc = 98;
    }
    ::_exit(rc);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return WEXITSTATUS(status);
}

// A pid that no process has now (a child that has exited and been reaped).
long dead_pid() {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) ::_exit(0);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return long(pid);
}

void write_config(const fs::path& dir, const nlohmann::json& j) {
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << j.dump(2);
}

}  // namespace

// ---- 1. config.json numbers ------------------------------------------------------------------

TEST_CASE("config: every number is an integer in range before it is used") {
  const auto llama = llama_config();
  auto with = [&](const char* key, nlohmann::json v) {
    auto j = llama;
    j[key] = std::move(v);
    return j;
  };
  // No head_dim and zero heads: refused before hidden_size / num_attention_heads.
  auto no_heads = with("num_attention_heads", 0);
  no_heads.erase("head_dim");
  CHECK(config_error(no_heads) ==
        "skillgraft: config.json has num_attention_heads 0; expected an integer in [1, 2147483647]");
  // The same read from JSON text, where non-negative numbers have an unsigned type.
  auto parsed = nlohmann::json::parse(no_heads.dump());
  REQUIRE(parsed.at("num_attention_heads").is_number_unsigned());
  CHECK(config_error(parsed) ==
        "skillgraft: config.json has num_attention_heads 0; expected an integer in [1, 2147483647]");
  // heads x head_dim would wrap in int (4 x 1073741832 = 32 mod 2^32).
  auto wide = with("head_dim", 1073741832);
  wide["num_attention_heads"] = 4;
  wide["num_key_value_heads"] = 4;
  CHECK(config_error(wide) == "skillgraft: config.json has num_attention_heads 4 x head_dim 1073741832 = 4294967328, "
                              "more than 2147483647");
  CHECK(config_error(with("hidden_size", 4294967328LL)) ==
        "skillgraft: config.json has hidden_size 4294967328; expected an integer in [1, 2147483647]");
  CHECK(config_error(with("hidden_size", 32.7)) ==
        "skillgraft: config.json has hidden_size 32.7; expected an integer in [1, 2147483647]");
  CHECK(config_error(with("hidden_size", 1e300)) ==
        "skillgraft: config.json has hidden_size 1e+300; expected an integer in [1, 2147483647]");
  CHECK(config_error(with("vocab_size", -5)) ==
        "skillgraft: config.json has vocab_size -5; expected an integer in [1, 2147483647]");
  CHECK(config_error(with("num_hidden_layers", true)) ==
        "skillgraft: config.json has num_hidden_layers true (boolean); expected an integer in [0, 2147483647]");
  CHECK(config_error(with("rms_norm_eps", "small")) ==
        "skillgraft: config.json has rms_norm_eps \"small\"; expected a finite number");
  CHECK_THAT(config_error(with("max_position_embeddings", 2147483647)),
             Contains("a rotary table of more than 2^30 values"));
  // Sizes that each fit but whose tensors or model do not fit in 64 bits (bytes).
  auto huge = llama;
  huge["hidden_size"] = huge["vocab_size"] = huge["intermediate_size"] = INT_MAX;
  huge["head_dim"] = 2;
  huge["num_attention_heads"] = huge["num_key_value_heads"] = 1;
  CHECK(config_error(huge) == "skillgraft: config.json describes a model whose size does not fit in 64 bits");
  // A whole number written as a real is fine.
  CHECK(sg::model::decoder_config_from_hf(with("hidden_size", 32.0)).hidden == 32);
  CHECK(sg::model::decoder_config_from_hf(llama).hidden == 32);
}

TEST_CASE("config: the tensor shapes a config implies are the ones the model allocates") {
  for (const auto& dir : {llama_dir, qwen2_dir})
    for (bool tied : {false, true}) {
      auto c = sg::model::read_hf_config(dir / "config.json");
      c.tie_word_embeddings = tied;
      sg::model::lm_weights<float> w(c);
      std::map<std::string, sg::cpu::shape_t, std::less<>> allocated;
      sg::model::for_each_parameter(w, [&](const std::string& name, sg::cpu::tensor<float>& t, auto, int) {
        allocated.emplace(name, t.shape());
      });
      CHECK(sg::model::hf_tensor_shapes(c) == allocated);
    }
}

// ---- 2. shapes against the headers before allocating ------------------------------------------

TEST_CASE("load: a config of a larger model than the weights is refused before anything is allocated") {
  temp_dir tmp;
  fs::copy_file(llama_dir / "model.safetensors", tmp / "model.safetensors");
  auto big = llama_config();  // about 70 billion values: 280 GB as float
  big["hidden_size"] = 8192;
  big["intermediate_size"] = 28672;
  big["num_attention_heads"] = 64;
  big["num_key_value_heads"] = 8;
  big["head_dim"] = 128;
  big["vocab_size"] = 128256;
  SECTION("more layers too") {
    big["num_hidden_layers"] = 80;
    write_config(tmp.path, big);
    CHECK_THAT(error_of([&] { sg::model::load_hf_checkpoint<float>(tmp.path); }),
               Contains("is missing 9 tensors the model needs: model.layers.79.input_layernorm.weight (expected [8192])"));
  }
  SECTION("the same layers") {
    write_config(tmp.path, big);
    CHECK(error_of([&] { sg::model::load_hf_checkpoint<float>(tmp.path); }) ==
          "skillgraft: lm_head.weight has shape [64, 32] in " + (tmp / "model.safetensors").string() +
              ", expected [128256, 8192]");
  }
  SECTION("sizes near INT_MAX") {
    auto near = llama_config();
    near["hidden_size"] = INT_MAX - 1;
    near["head_dim"] = 2;
    near["num_attention_heads"] = near["num_key_value_heads"] = 1;
    write_config(tmp.path, near);
    CHECK_THAT(error_of([&] { sg::model::load_hf_checkpoint<float>(tmp.path); }),
               Contains("expected [64, 2147483646]"));
  }
  // With the address space limited to what the process has plus 512 MB, the load must
  // fail with the shape message, not with bad_alloc after trying to allocate.
  const int rc = in_child([&] {
    std::ifstream statm("/proc/self/statm");
    std::size_t pages = 0;
    statm >> pages;
    struct rlimit lim {};
    lim.rlim_cur = lim.rlim_max = pages * std::size_t(::sysconf(_SC_PAGESIZE)) + (std::size_t{512} << 20);
    ::setrlimit(RLIMIT_AS, &lim);
    try {
      sg::model::load_hf_checkpoint<float>(tmp.path);
    } catch (const std::bad_alloc&) {
      return 1;
    } catch (const std::invalid_argument&) {
      return 0;
    }
    return 2;
  });
  CHECK(rc == 0);
}

// ---- 3. regular files only ---------------------------------------------------------------------

TEST_CASE("load: a FIFO or a directory in place of a checkpoint file is refused by name, never waited on") {
  temp_dir tmp;
  fs::copy_file(llama_dir / "config.json", tmp / "config.json");
  fs::copy_file(llama_dir / "model.safetensors", tmp / "model.safetensors");
  auto load_message = [&](const fs::path& dir) {
    return error_of([&] { sg::model::load_hf_checkpoint<float>(dir); });
  };
  // Each load runs in a child with an alarm: blocking on the FIFO would end it by SIGALRM.
  auto refused_in_time = [&](const fs::path& dir, const std::string& expected) {
    return in_child([&] { return load_message(dir) == expected ? 0 : 1; }, 10);
  };
  SECTION("config.json") {
    fs::remove(tmp / "config.json");
    REQUIRE(::mkfifo((tmp / "config.json").c_str(), 0600) == 0);
    CHECK(refused_in_time(tmp.path, "skillgraft: " + (tmp / "config.json").string() +
                                        " is not a regular file (it is a named pipe (FIFO))") == 0);
    fs::remove(tmp / "config.json");
    fs::create_directory(tmp / "config.json");
    CHECK(load_message(tmp.path) ==
          "skillgraft: " + (tmp / "config.json").string() + " is not a regular file (it is a directory)");
  }
  SECTION("model.safetensors") {
    fs::remove(tmp / "model.safetensors");
    REQUIRE(::mkfifo((tmp / "model.safetensors").c_str(), 0600) == 0);
    CHECK(refused_in_time(tmp.path, "skillgraft: " + (tmp / "model.safetensors").string() +
                                        " is not a regular file (it is a named pipe (FIFO))") == 0);
  }
  SECTION("a shard") {
    fs::remove(tmp / "model.safetensors");
    io::write_json_file(tmp / "model.safetensors.index.json",
                        {{"weight_map", {{"model.norm.weight", "model-00001-of-00001.safetensors"}}}});
    REQUIRE(::mkfifo((tmp / "model-00001-of-00001.safetensors").c_str(), 0600) == 0);
    CHECK(refused_in_time(tmp.path, "skillgraft: " + (tmp / "model-00001-of-00001.safetensors").string() +
                                        " is not a regular file (it is a named pipe (FIFO))") == 0);
  }
  SECTION("the index") {
    fs::remove(tmp / "model.safetensors");
    REQUIRE(::mkfifo((tmp / "model.safetensors.index.json").c_str(), 0600) == 0);
    CHECK(refused_in_time(tmp.path, "skillgraft: " + (tmp / "model.safetensors.index.json").string() +
                                        " is not a regular file (it is a named pipe (FIFO))") == 0);
  }
}

// ---- 4. atomic saves of whole directories ------------------------------------------------------

namespace {

// Two versions of one model that differ in every tensor and in config.json.
struct two_versions {
  sg::model::lm_weights<float> old_w, new_w;
  two_versions() : old_w(config(10000.0)), new_w(config(20000.0)) {
    auto fill = [&](sg::model::lm_weights<float>& w, float offset) {
      std::mt19937 r(7);
      sg::model::for_each_parameter(w, [&](const std::string&, sg::cpu::tensor<float>& t, auto, int) {
        std::normal_distribution<float> n(offset, 1.0f);
        for (std::size_t i = 0; i < t.size(); ++i) t[i] = n(r);
      });
    };
    fill(old_w, 0.0f);
    fill(new_w, 5.0f);
  }
  // Large enough (about 5 MB) that a save takes a while to kill in the middle of.
  static sg::decoder_config config(double theta) {
    auto c = sg::test::tiny_config(false, 2);
    c.vocab_size = 20000;
    c.rope_theta = theta;
    return c;
  }
};

// A copy of w (tensors are not copyable by accident; adapters are not copied).
sg::model::lm_weights<float> copy_of(const sg::model::lm_weights<float>& w) {
  sg::model::lm_weights<float> out(w.config);
  std::vector<const sg::cpu::tensor<float>*> from;
  sg::model::for_each_parameter(const_cast<sg::model::lm_weights<float>&>(w),
                                [&](const std::string&, sg::cpu::tensor<float>& t, auto, int) { from.push_back(&t); });
  std::size_t i = 0;
  sg::model::for_each_parameter(out, [&](const std::string&, sg::cpu::tensor<float>& t, auto, int) {
    REQUIRE(from[i]->shape() == t.shape());
    std::copy_n(from[i++]->data(), t.size(), t.data());
  });
  return out;
}

bool same(const sg::model::lm_weights<float>& a, const sg::model::lm_weights<float>& b) {
  if (!(a.config.rope_theta == b.config.rope_theta)) return false;
  std::vector<const sg::cpu::tensor<float>*> ta;
  sg::model::for_each_parameter(const_cast<sg::model::lm_weights<float>&>(a),
                                [&](const std::string&, sg::cpu::tensor<float>& t, auto, int) { ta.push_back(&t); });
  std::size_t i = 0;
  bool equal = true;
  sg::model::for_each_parameter(const_cast<sg::model::lm_weights<float>&>(b),
                                [&](const std::string&, sg::cpu::tensor<float>& t, auto, int) {
                                  const auto* o = ta[i++];
                                  equal = equal && o->shape() == t.shape() &&
                                          std::memcmp(o->data(), t.data(), t.bytes()) == 0;
                                });
  return equal && i == ta.size();
}

// Saves `save_new` in a child killed after `delay`; returns true when the child finished.
bool save_killed_after(const std::function<void()>& save_new, std::chrono::microseconds delay) {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    try {
      save_new();
    } catch (...) {
      ::_exit(3);
    }
    ::_exit(0);
  }
  const struct timespec ts{time_t(delay.count() / 1000000), long(delay.count() % 1000000) * 1000};
  ::nanosleep(&ts, nullptr);
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// How long f takes in a child (fork included), in microseconds.
long child_duration(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(in_child([&] {
          f();
          return 0;
        }) == 0);
  return long(std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - t0).count());
}

// Kills `save_new` at `tries` points spread over its duration (and as long again past it) and
// checks after each that `which()` finds the old or the new version, never a mixture
// or nothing; `restore` puts the old version back. Returns {old seen, new seen}.
std::pair<int, int> crash_points(const std::function<void()>& save_new, const std::function<int()>& which,
                                 const std::function<void()>& restore, int tries) {
  const long duration = std::max(1L, child_duration(save_new));
  restore();
  int olds = 0, news = 0;
  for (int k = 0; k < tries; ++k) {
    const long delay = duration * k * 2 / (tries - 1);
    INFO("killed after " << delay << " us of a save that takes " << duration << " us");
    save_killed_after(save_new, std::chrono::microseconds(delay));
    const int v = which();
    REQUIRE((v == 0 || v == 1));
    (v == 0 ? olds : news)++;
    if (v == 1) restore();
  }
  return {olds, news};
}

// Only the target: no staging directory beside it, no temporary inside it.
void check_no_leftovers(const fs::path& target) {
  for (const auto& e : fs::directory_iterator(target.parent_path()))
    CHECK(e.path().filename().string().find(".saving-") == std::string::npos);
  for (const auto& e : fs::directory_iterator(target))
    CHECK(e.path().filename().string().find(".tmp-") == std::string::npos);
}

}  // namespace

TEST_CASE("save: a checkpoint killed at any point of a save loads as the old or the new one, never a mixture") {
  temp_dir tmp;
  const fs::path dir = tmp / "ckpt";
  const two_versions v;
  std::ofstream(tmp / "tokenizer.json") << "{}";
  auto restore = [&] {
    sg::model::save_hf_checkpoint(dir, v.old_w);
    fs::copy_file(tmp / "tokenizer.json", dir / "tokenizer.json", fs::copy_options::overwrite_existing);
  };
  auto which = [&] {
    const auto w = sg::model::load_hf_checkpoint<float>(dir);
    CHECK(fs::exists(dir / "tokenizer.json"));  // other files of the directory survive too
    return same(w, v.old_w) ? 0 : same(w, v.new_w) ? 1 : 2;
  };
  const auto [olds, news] = crash_points([&] { sg::model::save_hf_checkpoint(dir, v.new_w); }, which, restore, 40);
  INFO(olds << " kills left the old checkpoint, " << news << " the new one");
  CHECK(olds + news == 40);
  // The next save removes what killed saves left behind.
  sg::model::save_hf_checkpoint(dir, v.new_w);
  check_no_leftovers(dir);
  CHECK(which() == 1);
}

TEST_CASE("save: task checkpoints and PEFT adapters killed at any point load as the old or the new one") {
  temp_dir tmp;
  const two_versions v;
  SECTION("task checkpoint") {
    const fs::path dir = tmp / "task";
    using R = std::remove_cv_t<decltype(sg::recipe::sa_proj)>;
    sg::model::decoder_lm<float, R> lm(v.old_w.config, sg::recipe::sa_proj);
    // config.json says which version the directory claims to be; the weights must be it.
    auto which = [&] {
      const bool is_new = sg::model::read_hf_config(dir / "config.json").rope_theta == 20000.0;
      const auto& claimed = is_new ? v.new_w : v.old_w;
      auto base = copy_of(claimed);
      for (auto& l : base.trunk.layers) l.self_attn.q_proj.weight.fill(0.0f);
      sg::model::apply_task_checkpoint(dir, base);
      return same(base, claimed) ? int(is_new) : 2;
    };
    auto save = [&](const sg::model::lm_weights<float>& w) {
      sg::model::decoder_lm<float, R> m(w.config, sg::recipe::sa_proj);
      sg::model::save_task_checkpoint(dir, m, w);
    };
    const auto [olds, news] = crash_points([&] { save(v.new_w); }, which, [&] { save(v.old_w); }, 15);
    CHECK(olds + news == 15);
    save(v.new_w);  // removes what the killed saves left
    check_no_leftovers(dir);
    CHECK(which() == 1);
  }
  SECTION("PEFT adapter") {
    const fs::path dir = tmp / "adapter";
    using R = std::remove_cv_t<decltype(sg::trainable<sg::lora<sg::proj::q>, sg::lora<sg::proj::v>>)>;
    auto with_adapter = [&](std::uint64_t seed, double alpha) {
      auto w = copy_of(v.old_w);
      auto c = w.config;
      c.lora_rank = 4;
      sg::model::decoder_lm<float, R> lm(c, R{});
      sg::cl::attach_lora(lm, w, {.rank = 4, .alpha = alpha, .seed = seed});
      std::mt19937 rng{unsigned(seed)};
      std::normal_distribution<float> n(0.0f, 1.0f);
      for (auto& l : w.trunk.layers)
        for (auto* p : {&l.self_attn.q_proj, &l.self_attn.v_proj})
          for (std::size_t i = 0; i < p->lora.B.size(); ++i) p->lora.B[i] = n(rng);
      return w;
    };
    const auto a = with_adapter(1, 8.0), b = with_adapter(2, 16.0);
    auto which = [&] {
      auto w = with_adapter(3, 4.0);
      sg::cl::load_lora_adapter(dir, w);
      const auto& got = w.trunk.layers[1].self_attn.v_proj;
      const auto& la = a.trunk.layers[1].self_attn.v_proj;
      const auto& lb = b.trunk.layers[1].self_attn.v_proj;
      if (std::memcmp(got.lora.B.data(), la.lora.B.data(), la.lora.B.bytes()) == 0 && got.lora_scale == la.lora_scale)
        return 0;
      if (std::memcmp(got.lora.B.data(), lb.lora.B.data(), lb.lora.B.bytes()) == 0 && got.lora_scale == lb.lora_scale)
        return 1;
      return 2;
    };
    const auto [olds, news] = crash_points([&] { sg::cl::save_lora_adapter(dir, b); }, which,
                                           [&] { sg::cl::save_lora_adapter(dir, a); }, 15);
    CHECK(olds + news == 15);
    sg::cl::save_lora_adapter(dir, b);  // removes what the killed saves left
    check_no_leftovers(dir);
    CHECK(which() == 1);
  }
}

TEST_CASE("save: a save that fails after the weights were written leaves the old directory as it was") {
  temp_dir tmp;
  const fs::path dir = tmp / "ckpt";
  const two_versions v;
  sg::model::save_hf_checkpoint(dir, v.old_w);
  const std::string weights = read_text(dir / "model.safetensors"), config = read_text(dir / "config.json");
  // The failure of config.json on a full disk, after model.safetensors is complete.
  CHECK_THROWS_WITH(io::save_directory(dir,
                                       [&](const fs::path& staging) {
                                         std::ofstream(staging / "model.safetensors") << "new weights";
                                         throw std::system_error(ENOSPC, std::generic_category(),
                                                                 "skillgraft: cannot write config.json");
                                       }),
                    "skillgraft: cannot save " + dir.string() +
                        " (it was left unchanged): cannot write config.json: No space left on device");
  CHECK(read_text(dir / "model.safetensors") == weights);
  CHECK(read_text(dir / "config.json") == config);
  CHECK(dir_names(tmp.path) == std::vector<std::string>{"ckpt"});
}

TEST_CASE("save: leftovers of killed saves are removed by the next save, those of running ones kept") {
  temp_dir tmp;
  const fs::path dir = tmp / "ckpt";
  const two_versions v;
  sg::model::save_hf_checkpoint(dir, v.old_w);
  const long gone = dead_pid();
  const fs::path stale_dir = tmp / ("ckpt.saving-" + std::to_string(gone) + "-0");
  const fs::path stale_file = dir / ("model.safetensors.tmp-" + std::to_string(gone));
  const fs::path live_file = dir / ("model.safetensors.tmp-" + std::to_string(::getppid()));
  fs::create_directory(stale_dir);
  std::ofstream(stale_dir / "model.safetensors") << "half";
  std::ofstream(stale_file) << "half";
  std::ofstream(live_file) << "someone else's";
  const auto stale = io::stale_leftovers(dir);
  CHECK(std::set<fs::path>(stale.begin(), stale.end()) == std::set<fs::path>{stale_dir, stale_file});
  sg::model::save_hf_checkpoint(dir, v.new_w);
  CHECK(!fs::exists(stale_dir));
  CHECK(!fs::exists(stale_file));
  CHECK(fs::exists(live_file) == false);  // not carried into the new directory either
  CHECK(dir_names(tmp.path) == std::vector<std::string>{"ckpt"});
  CHECK(same(sg::model::load_hf_checkpoint<float>(dir), v.new_w));
  // A single file written atomically removes the temporaries killed writers left beside it.
  const fs::path stale_single = tmp / ("single.safetensors.tmp-" + std::to_string(gone));
  std::ofstream(stale_single) << "half";
  io::write_json_file(tmp / "single.safetensors", {{"x", 1}});
  CHECK(!fs::exists(stale_single));
  fs::remove(tmp / "single.safetensors");
  // A file in place of the directory is refused, not replaced.
  std::ofstream(tmp / "file") << "x";
  CHECK_THROWS_WITH(sg::model::save_hf_checkpoint(tmp / "file", v.new_w),
                    "skillgraft: cannot save " + (tmp / "file").string() +
                        " (it was left unchanged): cannot save a checkpoint to " + (tmp / "file").string() +
                        ": it exists and is not a directory");
}

TEST_CASE("save: a symbolic link to a checkpoint directory stays a link to the new checkpoint") {
  temp_dir tmp;
  const two_versions v;
  sg::model::save_hf_checkpoint(tmp / "real", v.old_w);
  fs::create_directory_symlink(tmp / "real", tmp / "link");
  sg::model::save_hf_checkpoint(tmp / "link", v.new_w);
  CHECK(fs::is_symlink(tmp / "link"));
  CHECK(same(sg::model::load_hf_checkpoint<float>(tmp / "link"), v.new_w));
  CHECK(same(sg::model::load_hf_checkpoint<float>(tmp / "real"), v.new_w));
  CHECK(dir_names(tmp.path) == std::vector<std::string>{"link", "real"});
}

// ---- 6. AdamW moments --------------------------------------------------------------------------

TEST_CASE("AdamW: a finite gradient that would overflow a moment is refused before anything changes") {
  const auto c = sg::test::tiny_config(false, 1);
  auto w = sg::test::random_trunk<float>(c, 9);
  sg::nn::decoder_stack<float, decltype(sg::recipe::mlp_down)> stack(c, sg::recipe::mlp_down);
  auto g = stack.make_grads(w);
  auto& dw = g.layer(0).down_proj.weight;
  auto& pw = w.layers[0].mlp.down_proj.weight;
  for (std::size_t i = 0; i < dw.size(); ++i) dw[i] = float(std::sin(0.37 * double(i)));
  auto w2 = sg::test::random_trunk<float>(c, 9);
  sg::train::adamw<float> adam(stack, w, g), fresh(stack, w2, g);
  const std::vector<float> before(pw.data(), pw.data() + pw.size());
  const float ok = dw[5];
  dw[5] = 1e30f;  // finite, but its square is not
  CHECK(error_of([&] { adam.step(stack, w, g); }) ==
        "skillgraft: the gradient of model.layers.0.mlp.down_proj.weight at element 5 (1e+30) makes the AdamW second "
        "moment overflow; no weight was changed (clip the gradients, or lower the loss scale)");
  CHECK(std::vector<float>(pw.data(), pw.data() + pw.size()) == before);
  CHECK(adam.steps() == 0);
  // Nothing changed: the next good step is bit for bit the first step of a fresh optimizer.
  dw[5] = ok;
  adam.step(stack, w, g);
  fresh.step(stack, w2, g);
  CHECK(std::memcmp(pw.data(), w2.layers[0].mlp.down_proj.weight.data(), pw.bytes()) == 0);
  for (std::size_t i = 0; i < pw.size(); ++i) REQUIRE(std::isfinite(pw[i]));
  CHECK(pw[5] != before[5]);
}

// A model of one flat tensor: the optimizer's CPU packet paths below and past the size where they
// run in parallel, with a tail that is not a whole packet.
struct one_tensor_model {
  template <class W, class G, class F>
  void for_each_trainable(W& w, G& g, F&& f) const {
    f(std::string("t"), w, g);
  }
};

namespace {
template <class T>
std::vector<unsigned char> bytes_of(const sg::cpu::tensor<T>& t) {
  return {(const unsigned char*)t.data(), (const unsigned char*)t.data() + t.bytes()};
}
// Every moment of an AdamW optimizer, byte for byte, in its slots' order.
template <class T>
std::vector<unsigned char> state_bytes(const sg::train::adamw<T>& a) {
  std::vector<unsigned char> b;
  a.for_each_state([&](const std::string&, const auto& m, const auto& v) {
    for (const auto* t : {&m, &v}) {
      const auto x = bytes_of(*t);
      b.insert(b.end(), x.begin(), x.end());
    }
  });
  return b;
}
}  // namespace

TEST_CASE("AdamW on packets: the formula's update, and a bad element in a packet or the tail found before anything changes") {
  const std::size_t n = GENERATE(std::size_t(3001), std::size_t(70001));
  INFO("elements " << n);
  sg::cpu::tensor<float> p({n}, sg::memory_use::weights), g({n}, sg::memory_use::gradients);
  for (std::size_t i = 0; i < n; ++i) {
    p[i] = float(std::cos(0.011 * double(i)));
    g[i] = float(std::sin(0.37 * double(i))) * (i % 7 == 0 ? 1e-6f : 1.f);
  }
  one_tensor_model model;
  const double lr = 1e-2, wd = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8;
  sg::train::adamw<float> opt(model, p, g, {.lr = lr, .beta1 = b1, .beta2 = b2, .eps = eps, .weight_decay = wd});
  const auto moments = [&] { return state_bytes(opt); };
  // A non-finite gradient and one whose square overflows, inside a packet and in the tail.
  for (const std::size_t j : {n / 16 * 9, n - 1})
    for (const float bad : {std::numeric_limits<float>::quiet_NaN(), 1e30f}) {
      const auto p0 = bytes_of(p), m0 = moments();
      const float ok = g[j];
      g[j] = bad;
      const auto e = error_of([&] { opt.step(model, p, g); });
      CHECK_THAT(e, Catch::Contains("at element " + std::to_string(j)));
      CHECK_THAT(e, Catch::Contains(std::isnan(bad) ? "non-finite gradient" : "second moment overflow"));
      CHECK(bytes_of(p) == p0);
      CHECK(moments() == m0);
      CHECK(opt.steps() == 0);
      g[j] = ok;
    }
  // The first step against the formula in double: m = (1 - b1) g, v = (1 - b2) g^2,
  // p -= lr (m / (1 - b1) / (sqrt(v / (1 - b2)) + eps) + wd p); float's rounding of the few
  // operations and of the final subtraction: a few ulp of |p| and of the step. A weight near the
  // top of float's range inside a packet: the packet screen flags it (its bound overflows), the
  // exact check clears it, and it is updated like the others.
  const std::size_t big = n / 7 * 3;
  p[big] = 1e38f;
  // That flagged-but-cleared weight does not end the search: a bad gradient in a later block is
  // still found, and nothing changes.
  {
    const auto p0 = bytes_of(p), m0 = moments();
    const std::size_t j = n - 2;
    const float ok = g[j];
    g[j] = 1e30f;
    CHECK_THAT(error_of([&] { opt.step(model, p, g); }), Catch::Contains("at element " + std::to_string(j)));
    CHECK(bytes_of(p) == p0);
    CHECK(moments() == m0);
    g[j] = ok;
  }
  const std::vector<float> before(p.data(), p.data() + n);
  opt.step(model, p, g);
  CHECK(opt.steps() == 1);
  CHECK(std::isfinite(p[big]));
  CHECK(p[big] < 1e38f);  // decayed
  double worst = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double gi = g[i], m = (1 - b1) * gi, v = (1 - b2) * gi * gi;
    const double step = lr * (m / (1 - b1) / (std::sqrt(v / (1 - b2)) + eps) + wd * before[i]);
    const double ref = before[i] - step;
    const double ulp = std::numeric_limits<float>::epsilon();
    worst = std::max(worst, std::abs(p[i] - ref) / (ulp * (std::abs(before[i]) + 8 * std::abs(step))));
  }
  CHECK(worst <= 1.0);
}

// AdamW given clipping's decision (the form train_step calls) against clipping's own pass and
// then step(): both scale the gradients and update, one in one pass over memory and with a
// screen that reads the weights alone. Same bits of weights, moments and clipped gradients,
// the same refusal (message and nothing changed) and the same state after a refusal.
namespace {
template <class T>
struct adamw_pair {
  using tensor = sg::cpu::tensor<T>;
  tensor p1, g1, p2, g2;
  one_tensor_model model;
  sg::train::adamw<T> fused, reference;
  adamw_pair(const std::vector<T>& p, const sg::train::adamw_options& o)
      : p1({p.size()}, sg::memory_use::weights),
        g1({p.size()}, sg::memory_use::gradients),
        p2({p.size()}, sg::memory_use::weights),
        g2({p.size()}, sg::memory_use::gradients),
        fused(model, p1, g1, o),
        reference(model, p2, g2, o) {
    std::copy(p.begin(), p.end(), p1.data());
    std::copy(p.begin(), p.end(), p2.data());
  }
  void set_lr(double lr) {
    fused.set_lr(lr);
    reference.set_lr(lr);
  }
  // Both restored from the same moments.
  void restore(long t, const std::vector<T>& m, const std::vector<T>& v) {
    for (auto* a : {&fused, &reference}) {
      std::vector<std::pair<tensor, tensor>> mv;
      mv.emplace_back(tensor({m.size()}, sg::memory_use::optimizer_state),
                      tensor({v.size()}, sg::memory_use::optimizer_state));
      std::copy(m.begin(), m.end(), mv[0].first.data());
      std::copy(v.begin(), v.end(), mv[0].second.data());
      a->restore(t, a->options(), std::move(mv));
    }
  }
  // One step on both from the gradient g: the fused form with max_norm, or (plain) step() alone
  // on both, after which the fused form's moment bounds must be read again. Returns the
  // refusal's message, if any.
  std::string step(const std::vector<T>& g, double max_norm, bool plain = false) {
    std::copy(g.begin(), g.end(), g1.data());
    std::copy(g.begin(), g.end(), g2.data());
    const auto p0 = bytes_of(p1), s0 = state_bytes(fused);
    const long t0 = fused.steps();
    std::string e1, e2;
    try {
      if (plain)
        fused.step(model, p1, g1);
      else
        fused.step(model, p1, g1, sg::train::decide_clipping(model, p1, g1, max_norm));
    } catch (const std::domain_error& e) {
      e1 = e.what();
    }
    try {
      if (!plain) sg::train::clip_grad_norm(model, p2, g2, max_norm);
      reference.step(model, p2, g2);
    } catch (const std::domain_error& e) {
      e2 = e.what();
    }
    CHECK(e1 == e2);
    if (!e1.empty()) {  // refused: nothing changed
      CHECK(bytes_of(p1) == p0);
      CHECK(state_bytes(fused) == s0);
      CHECK(fused.steps() == t0);
    } else {
      CHECK(bytes_of(g1) == bytes_of(g2));  // left clipped, as clipping's pass leaves them
    }
    CHECK(bytes_of(p1) == bytes_of(p2));
    CHECK(state_bytes(fused) == state_bytes(reference));
    CHECK(fused.steps() == reference.steps());
    return e1;
  }
};
}  // namespace

TEST_CASE("AdamW with clipping's decision: the bits of clipping then step, in fewer passes") {
  const std::size_t n = GENERATE(std::size_t(3001), std::size_t(70001));
  INFO("elements " << n);
  std::vector<float> p(n), g(n);
  for (std::size_t i = 0; i < n; ++i) p[i] = float(std::cos(0.011 * double(i)));
  adamw_pair<float> two(p, {.lr = 1e-2, .weight_decay = 0.1});
  for (int t = 0; t < 6; ++t) {
    INFO("step " << t);
    for (std::size_t i = 0; i < n; ++i) g[i] = float(std::sin(0.37 * double(i) + t)) * (i % 7 == 0 ? 1e-6f : 1.f);
    two.set_lr(1e-2 / (1 + t));  // as a schedule does, between steps
    // clipping at 1 acts (the norm is about sqrt(n / 2)); at 1e9 it does not; a plain step between
    CHECK(two.step(g, t % 2 == 0 ? 1.0 : 1e9, t == 3).empty());
  }
  // A restored state (the moments' bounds are then read from the moments), with a weight near
  // the top of float's range that the weight screen flags and the exact test clears, then a
  // gradient that overflows the second moment without clipping: refused by both, alike.
  std::vector<float> m(n), v(n);
  for (std::size_t i = 0; i < n; ++i) {
    m[i] = float(1e-3 * std::sin(double(i)));
    v[i] = float(1e-6 * std::cos(double(i)) * std::cos(double(i)));
  }
  two.restore(7, m, v);
  two.p1[n / 2] = two.p2[n / 2] = 3e38f;
  CHECK(two.step(g, 1.0).empty());
  CHECK(std::isfinite(two.p1[n / 2]));
  g[n - 2] = 1e30f;
  CHECK_THAT(two.step(g, 0.0), Catch::Contains("at element " + std::to_string(n - 2) +
                                               " (1e+30) makes the AdamW second moment overflow"));
  // Clipped, the same gradient is harmless.
  CHECK(two.step(g, 1.0).empty());
  // Restored moments that make the update overflow by themselves: a first moment near the top
  // of the range over a small second one, whatever the (clipped) gradient.
  m[5] = 3e38f;
  v[5] = 0;
  two.restore(8, m, v);
  CHECK_THAT(two.step(g, 1e-3),
             Catch::Contains("at element 5 (") && Catch::Contains("makes the AdamW update overflow"));
}

// Numbers too small for relative rounding bounds: a subnormal first moment that 0.9 m rounds
// back to, and a double gradient whose square underflows in the norm (a norm of 0 below a
// nonzero element). With a subnormal eps and a huge learning rate their updates overflow, and
// the fused form must refuse them as the plain one does.
TEST_CASE("AdamW with clipping's decision: subnormal moments and squares that underflow are refused alike") {
  {
    const float d = std::numeric_limits<float>::denorm_min();
    adamw_pair<float> two({1.0f}, {.lr = 1e-30, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-45});
    CHECK(two.step({40 * d}, 0.0).empty());  // m = 4 d, v = 0
    for (int t = 0; t < 60; ++t) CHECK(two.step({0.0f}, 0.0).empty());
    two.set_lr(1e38);
    CHECK_THAT(two.step({0.0f}, 0.0), Catch::Contains("makes the AdamW update overflow"));
  }
  {
    adamw_pair<double> two({1.0}, {.lr = 1e160, .beta1 = 0.9, .beta2 = 0.999, .eps = 5e-324});
    CHECK_THAT(two.step({1e-170}, 1.0), Catch::Contains("makes the AdamW update overflow"));
  }
}

// A plain step between clipped ones moves the moments without a norm to bound them: the next
// clipped step reads them again. Here it leaves a large first moment that the second moment
// (beta2 = 0) forgets at once, so the next update divides it by eps alone.
TEST_CASE("AdamW with clipping's decision: after a plain step the moments are read again") {
  adamw_pair<float> two({1.0f}, {.lr = 1e-3, .beta1 = 0.999999, .beta2 = 0.0});
  CHECK(two.step({1.0f}, 1.0).empty());
  CHECK(two.step({1e18f}, 0.0, true).empty());  // plain: m about 1e12, v = 1e36
  two.set_lr(1e14);
  CHECK_THAT(two.step({0.0f}, 1.0), Catch::Contains("makes the AdamW update overflow"));
}

// Random states that reach both ends of the range (subnormal to the largest finite), options at
// and beyond AdamW's edges, learning rates changed between steps, plain steps and restores of
// arbitrary moments between fused ones: the same verdicts, messages and bits.
TEMPLATE_TEST_CASE("AdamW with clipping's decision: random states at the range's edges", "", float, double) {
  using T = TestType;
  std::mt19937_64 rng(20261207);
  std::uniform_real_distribution<double> u(-1, 1);
  const double top = std::log10(double(std::numeric_limits<T>::max())),
               bottom = std::log10(double(std::numeric_limits<T>::denorm_min()));
  const auto wide = [&] { return T(u(rng) * std::pow(10.0, bottom + (top - bottom) * (u(rng) + 1) / 2)); };
  const auto pick = [&](bool huge) { return huge && rng() % 8 == 0 ? wide() : T(u(rng)); };
  const auto one_of = [&](std::initializer_list<double> l) { return *(l.begin() + rng() % l.size()); };
  int refused = 0, updated = 0;
  for (int trial = 0; trial < 1500; ++trial) {
    INFO("trial " << trial);
    const std::size_t n = 1 + std::size_t(rng() % 40);
    const int kind = int(rng() % 5);  // which arrays reach the ends of the range
    std::vector<T> p(n), g(n), m(n), v(n);
    for (auto& x : p) x = pick(kind == 1 || kind == 4);
    const sg::train::adamw_options o{
        .lr = one_of({1e-3, -1e-3, 1e30, 1e300, std::pow(10.0, 40 * u(rng)), 0.0}),
        .beta1 = one_of({0.9, 0.0, 1.0, -0.5, 1.5, 0.999999}),
        .beta2 = one_of({0.999, 0.0, 1.0, 1 - 1e-7, 1.01}),
        .eps = one_of({1e-8, 1e-30, 1.0, 1e30, 0.0, -1e-8, 1e-45, 5e-324, 1e-300}),
        .weight_decay = one_of({0.0, 0.1, -0.1, 1e30, 1e300})};
    adamw_pair<T> two(p, o);
    for (int s = 0; s < 6; ++s) {
      const int what = int(rng() % 10);
      if (what == 0) {  // moments restored from a file, possibly at the ends of the range or negative
        for (std::size_t i = 0; i < n; ++i) {
          m[i] = kind == 3 ? pick(true) : T(1e-3 * u(rng));
          v[i] = kind == 3 ? pick(true) : T(1e-6 * u(rng));
          if (rng() % 3) v[i] = std::abs(v[i]);
        }
        two.restore(rng() % 2 ? long(rng() % 1000) : long(rng() % 100000000), m, v);
        continue;
      }
      if (what == 1) two.set_lr(one_of({1e-3, 1e38, -1e20, 1e300, 1e-30}));
      for (auto& x : g)
        x = pick(kind == 2 || kind == 4) * T(std::pow(10.0, 6 * u(rng))) * (rng() % 5 == 0 ? T(1e-38) : T(1));
      const double max_norm = rng() % 3 == 0 ? 0.0 : std::pow(10.0, 6 * u(rng));
      (two.step(g, max_norm, what == 2).empty() ? updated : refused) += 1;
    }
  }
  // Both verdicts were reached often enough for the comparison to mean something.
  INFO("refused " << refused << ", updated " << updated);
  CHECK(refused > 2000);
  CHECK(updated > 500);
}

TEST_CASE("SGD with clipping's decision: the bits of clipping then step, without the check pass") {
  const double momentum = GENERATE(0.0, 0.9);
  const std::size_t n = GENERATE(std::size_t(3001), std::size_t(70001));
  INFO("momentum " << momentum << ", elements " << n);
  sg::cpu::tensor<float> p1({n}, sg::memory_use::weights), g1({n}, sg::memory_use::gradients);
  sg::cpu::tensor<float> p2({n}, sg::memory_use::weights), g2({n}, sg::memory_use::gradients);
  for (std::size_t i = 0; i < n; ++i) p1[i] = p2[i] = float(std::cos(0.011 * double(i)));
  one_tensor_model model;
  const sg::train::sgd_options o{.lr = 0.05, .momentum = momentum, .weight_decay = 0.01};
  sg::train::sgd<float> fused(model, p1, g1, o), reference(model, p2, g2, o);
  for (int t = 0; t < 5; ++t) {
    INFO("step " << t);
    for (std::size_t i = 0; i < n; ++i) g1[i] = g2[i] = float(std::sin(0.37 * double(i) + t));
    const double max_norm = t % 2 == 0 ? 1.0 : 1e9;  // clipping acts, then not
    const auto clip = sg::train::decide_clipping(model, p1, g1, max_norm);
    CHECK(clip.scale() == sg::train::clip_scale(clip.norm(), max_norm));
    fused.step(model, p1, g1, clip);
    CHECK(sg::train::clip_grad_norm(model, p2, g2, max_norm) == clip.norm());
    reference.step(model, p2, g2);
    CHECK(std::memcmp(p1.data(), p2.data(), p1.bytes()) == 0);
    CHECK(std::memcmp(g1.data(), g2.data(), g1.bytes()) == 0);
  }
  CHECK(fused.steps() == 5);
  // A decision is made from the gradients only, and refuses a non-finite one.
  const std::vector<float> before(p1.data(), p1.data() + n);
  g1[n - 1] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(fused.step(model, p1, g1, sg::train::decide_clipping(model, p1, g1, 1.0)),
                    "skillgraft: gradient norm is not finite; no weight was changed");
  CHECK(std::vector<float>(p1.data(), p1.data() + n) == before);
  CHECK(fused.steps() == 5);
}

// ---- 7. names in messages, F64 range -----------------------------------------------------------

TEST_CASE("messages: names from files are escaped") {
  CHECK(io::printable("model.norm.weight") == "model.norm.weight");
  CHECK(io::printable("h\xC3\xA9llo") == "h\xC3\xA9llo");                   // UTF-8 stays
  CHECK(io::printable(std::string("a\x1b[31mb\0c", 9)) == "a\\x1b[31mb\\x00c");  // ESC and NUL do not
  CHECK(io::printable("\xC2\x9B" "2J") == "\\xc2\\x9b2J");                   // a C1 control (CSI)
  CHECK(io::printable("bad\xFF\\") == "bad\\xff\\\\");

  temp_dir tmp;
  fs::copy_file(llama_dir / "config.json", tmp / "config.json");
  auto tensors = io::safetensors_file(llama_dir / "model.safetensors");
  io::safetensors_writer out;
  std::vector<sg::cpu::tensor<float>> keep;
  keep.reserve(tensors.header().tensors.size() + 1);
  for (const auto& t : tensors.header().tensors) {
    keep.push_back(tensors.load<float>(t.name));
    out.add(t.name, keep.back());
  }
  keep.push_back(sg::cpu::tensor<float>({2}, sg::memory_use::workspace));
  keep.back().fill(1.0f);
  const std::string evil("x\x1b]0;owned\x07\0tail", 16);
  out.add(evil, keep.back());
  out.write(tmp / "model.safetensors");
  const std::string message = error_of([&] { sg::model::load_hf_checkpoint<float>(tmp.path); });
  CHECK_THAT(message, Contains("has 1 tensor the model does not have: x\\x1b]0;owned\\x07\\x00tail [2]"));
  CHECK(message.find('\x1b') == std::string::npos);
  CHECK_THAT(error_of([&] { io::safetensors_file(tmp / "model.safetensors").info("no\x1b[2J"); }),
             Contains("no tensor named no\\x1b[2J in"));
}

TEST_CASE("messages: JSON values in the wrong field are escaped and cut short") {
  // JSON escapes only U+0000..U+001F in strings: DEL (and the C1 controls) reach a
  // dumped value raw, in a string value as in an object key.
  const auto config = [](const std::string& hidden) {
    return io::parse_json("{\"model_type\": \"llama\", \"hidden_size\": " + hidden +
                              ", \"num_attention_heads\": 4, \"num_hidden_layers\": 1, \"intermediate_size\": 8, "
                              "\"vocab_size\": 16, \"max_position_embeddings\": 8}",
                          "config.json");
  };
  std::string message = error_of([&] { sg::model::decoder_config_from_hf(config("\"a\x7f\xc2\x9b\""), "config.json"); });
  CHECK_THAT(message, Contains("hidden_size \"a\\x7f\\xc2\\x9b\" (string)"));
  message = error_of([&] { sg::model::decoder_config_from_hf(config("{\"k\x7f\": 1}"), "config.json"); });
  CHECK_THAT(message, Contains("hidden_size {\"k\\x7f\":1} (object)"));
  // A long value is cut at 80 bytes, not copied whole into the message.
  message = error_of([&] { sg::model::decoder_config_from_hf(config("\"" + std::string(5000, 'x') + "\""), "config.json"); });
  CHECK_THAT(message, Contains("hidden_size \"" + std::string(76, 'x') + "... (string)"));
  CHECK(message.size() < 300);
  for (char c : message) CHECK(static_cast<unsigned char>(c) >= 0x20);
  CHECK(message.find('\x7f') == std::string::npos);
}

TEST_CASE("load: F64 values beyond float's range are refused, naming the element, and change nothing") {
  temp_dir tmp;
  auto w = sg::model::load_hf_checkpoint<float>(llama_dir);
  // F64 weights within range load exactly as float.
  sg::model::save_hf_checkpoint(tmp / "f64", w, {.dtype = io::dtype::f64});
  CHECK(same(sg::model::load_hf_checkpoint<float>(tmp / "f64"), w));

  io::safetensors_writer out;
  sg::cpu::tensor<double> norm({32}, sg::memory_use::workspace), head({64, 32}, sg::memory_use::workspace);
  norm.fill(2.0);
  head.fill(0.5);
  head[7] = 1e300;
  out.add("model.norm.weight", norm, io::dtype::f64);
  out.add("lm_head.weight", head, io::dtype::f64);
  out.write(tmp / "task.safetensors");
  auto base = copy_of(w);
  CHECK(error_of([&] { sg::model::apply_task_checkpoint(tmp / "task.safetensors", base); }) ==
        "skillgraft: element 7 of lm_head.weight in " + (tmp / "task.safetensors").string() +
            " (F64) is 1.0000000000000001e+300, outside the range of float (largest 3.40282347e+38); it would load "
            "as infinity");
  CHECK(same(base, w));  // model.norm.weight, which is in range, was not written either
  // As double, the same file loads.
  CHECK(io::safetensors_file(tmp / "task.safetensors").load<double>("lm_head.weight")[7] == 1e300);
}
