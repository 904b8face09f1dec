// The reproduction's cached base model (examples/reproduce, base.safetensors): a file that
// is not the program's own cache is never overwritten, and a cache whose values were
// damaged is refused with the file named instead of being used.
#include <catch2/catch.hpp>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "../examples/reproduce/experiment.hpp"
#include "support/temp_dir.hpp"

namespace sg = skillgraft;
namespace rp = skillgraft::reproduce;
namespace io = skillgraft::io;
namespace fs = std::filesystem;
using Catch::Contains;

namespace {

// A base model with seeded random values (pretraining is not needed to test the cache).
rp::weights_t random_base(const rp::settings& s, unsigned seed) {
  rp::weights_t w(s.model);
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.0f, 0.5f);
  sg::model::for_each_multimodal_parameter(w, [&](const std::string&, sg::cpu::tensor<float>& t) {
    for (std::size_t i = 0; i < t.size(); ++i) t[i] = n(rng);
  });
  return w;
}

// Rewrites `file` with the same metadata after `edit` changed its tensors.
void rewrite(const fs::path& file, const std::function<void(std::map<std::string, sg::cpu::tensor<float>>&)>& edit) {
  std::map<std::string, sg::cpu::tensor<float>> tensors;
  std::map<std::string, std::string> metadata;
  {
    io::safetensors_file f(file);
    metadata = f.metadata();
    for (const auto& t : f.header().tensors) tensors.emplace(t.name, f.load<float>(t.name));
  }
  edit(tensors);
  io::safetensors_writer out;
  for (const auto& [k, v] : metadata) out.set_metadata(k, v);
  for (const auto& [name, t] : tensors) out.add(name, t);
  out.write(file);
}

std::string load_error(const rp::settings& s, const fs::path& file) {
  rp::weights_t w(s.model);
  try {
    rp::load_checkpoint(w, file, rp::fingerprint(s));
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("reproduce cache: a saved base model loads back, and other settings mean pretraining again") {
  sg::test::temp_dir tmp;
  const auto s = rp::default_settings();
  const auto w = random_base(s, 1);
  const fs::path file = tmp / "base.safetensors";
  rp::save_checkpoint(w, file, rp::fingerprint(s));
  rp::weights_t back(s.model);
  CHECK(rp::load_checkpoint(back, file, rp::fingerprint(s)));
  CHECK(rp::content_checksum(back) == rp::content_checksum(w));
  auto other = s;
  other.seed = 2;
  CHECK_FALSE(rp::load_checkpoint(back, file, rp::fingerprint(other)));
  CHECK_FALSE(rp::load_checkpoint(back, tmp / "none.safetensors", rp::fingerprint(s)));
  // Each setting of the vision pretext and of the joint pretraining's draw is part of what the
  // cache was made with.
  for (auto change : std::vector<std::function<void(rp::settings&)>>{
           [](rp::settings& o) { o.vision_pretext.steps += 1; }, [](rp::settings& o) { o.vision_pretext.steps = 0; },
           [](rp::settings& o) { o.vision_pretext.batch *= 2; }, [](rp::settings& o) { o.vision_pretext.lr *= 0.5; },
           [](rp::settings& o) { o.pretrain_mix.emplace_back("relation", 2); },
           [](rp::settings& o) { o.pretrain_focus_steps += 100; }}) {
    auto changed = s;
    change(changed);
    CHECK_FALSE(rp::load_checkpoint(back, file, rp::fingerprint(changed)));
  }
  // So is the language model's size (--text-hidden, --text-heads, --text-kv-heads,
  // --text-intermediate, --text-layers): a base model of another size is never reused.
  const rp::text_size z = rp::text_size_of(s.model);
  for (const rp::text_size other_size :
       {rp::text_size{z.hidden * 2, z.heads, z.kv_heads, z.intermediate, z.layers},
        rp::text_size{z.hidden, z.heads * 2, z.kv_heads, z.intermediate, z.layers},
        rp::text_size{z.hidden, z.heads, z.kv_heads * 2, z.intermediate, z.layers},
        rp::text_size{z.hidden, z.heads, z.kv_heads, z.intermediate / 2, z.layers},
        rp::text_size{z.hidden, z.heads, z.kv_heads, z.intermediate, z.layers + 1}}) {
    auto resized = s;
    rp::resize_text(resized.model, other_size);
    INFO(rp::fingerprint(resized));
    CHECK(rp::fingerprint(resized) != rp::fingerprint(s));
    rp::weights_t w2(resized.model);
    CHECK_FALSE(rp::load_checkpoint(w2, file, rp::fingerprint(resized)));
  }
  auto same_size = s;
  rp::resize_text(same_size.model, z);
  CHECK(rp::fingerprint(same_size) == rp::fingerprint(s));
  // Settings that only matter after pretraining do not invalidate it (the layers the methods
  // train among them).
  auto later = s;
  later.train_layers = {2, 3};
  later.seeds = 5, later.test_examples = 16, later.stage_steps = 7;
  CHECK(rp::load_checkpoint(back, file, rp::fingerprint(later)));
}

TEST_CASE("reproduce cache: damaged values are refused, naming the file") {
  sg::test::temp_dir tmp;
  const auto s = rp::default_settings();
  const fs::path file = tmp / "base.safetensors";
  rp::save_checkpoint(random_base(s, 1), file, rp::fingerprint(s));
  const std::string damaged = "reproduce: the cached base model " + file.string() + " is damaged";
  SECTION("a tensor zeroed") {
    rewrite(file, [](auto& t) { t.begin()->second.fill(0.0f); });
  }
  SECTION("two tensors of one shape swapped") {
    rewrite(file, [](auto& t) {
      auto& a = t.at("language_model.model.layers.0.self_attn.q_proj.weight");
      auto& b = t.at("language_model.model.layers.1.self_attn.q_proj.weight");
      REQUIRE(a.shape() == b.shape());
      std::swap_ranges(a.data(), a.data() + a.size(), b.data());
    });
  }
  SECTION("a tensor scaled by 1000") {
    rewrite(file, [](auto& t) {
      auto& x = t.at("language_model.model.norm.weight");
      for (std::size_t i = 0; i < x.size(); ++i) x[i] *= 1000.0f;
    });
  }
  SECTION("a NaN") {
    rewrite(file, [](auto& t) { t.rbegin()->second[3] = std::numeric_limits<float>::quiet_NaN(); });
  }
  CHECK_THAT(load_error(s, file), Contains(damaged) && Contains("delete it to pretrain again"));
}

TEST_CASE("reproduce cache: a file that is not the program's cache is refused, never overwritten") {
  sg::test::temp_dir tmp;
  const auto s = rp::default_settings();
  const std::string refused = " is not a base-model cache of this program, so it is not overwritten";
  SECTION("a text file") {
    std::ofstream(tmp / "notes.txt") << "my notes\n";
    CHECK_THAT(load_error(s, tmp / "notes.txt"), Contains("--checkpoint " + (tmp / "notes.txt").string() + refused));
  }
  SECTION("another program's safetensors file") {
    io::safetensors_writer out;
    sg::cpu::tensor<float> x({2}, sg::memory_use::workspace);
    x.fill(1.0f);
    out.add("x", x);
    out.write(tmp / "model.safetensors");
    CHECK_THAT(load_error(s, tmp / "model.safetensors"),
               Contains(refused + " (choose another path, or delete it): it is a safetensors file without the "
                                  "skillgraft.reproduce metadata"));
  }
  SECTION("a directory or a FIFO") {
    fs::create_directory(tmp / "dir");
    CHECK_THAT(load_error(s, tmp / "dir"), Contains("(it is a directory)"));
    REQUIRE(::mkfifo((tmp / "fifo").c_str(), 0600) == 0);
    CHECK_THAT(load_error(s, tmp / "fifo"), Contains("(it is a named pipe (FIFO))"));
  }
}

TEST_CASE("reproduce cache: a base model named by --checkpoint and made with other settings is refused, never overwritten") {
  sg::test::temp_dir tmp;
  rp::settings made = rp::default_settings();
  made.pretrain_steps = 3000, made.pretrain_lr = 2e-3;
  const fs::path file = tmp / "other-run.safetensors";
  rp::save_checkpoint(random_base(made, 1), file, rp::fingerprint(made));
  const auto bytes = [&] {
    std::ifstream in(file, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  };
  const std::string before = bytes();

  rp::settings s = rp::default_settings();
  s.out = tmp / "out";
  s.checkpoint = file;
  CHECK_THROWS_WITH(rp::check_cache(s),
                    Contains("--checkpoint " + file.string() +
                             " holds a base model made with other settings, so it is not overwritten") &&
                        Contains("it has '3000x32 lr 0.002', this run '6000x32 lr 0.001'"));
  CHECK(bytes() == before);

  // The settings it was made with: loaded, nothing refused.
  s.pretrain_steps = 3000, s.pretrain_lr = 2e-3;
  CHECK_NOTHROW(rp::check_cache(s));
  // The run's own cache (no --checkpoint) is pretrained again when a setting changed.
  rp::settings own = rp::default_settings();
  own.out = tmp.path;
  fs::copy_file(file, tmp / "base.safetensors");
  CHECK_NOTHROW(rp::check_cache(own));
  // A file that is not there is made by the run.
  s.checkpoint = tmp / "new.safetensors";
  CHECK_NOTHROW(rp::check_cache(s));
}

TEST_CASE("reproduce cache: where two fingerprints differ, in words") {
  using P = std::pair<std::string, std::string>;
  CHECK(rp::fingerprint_difference("a pretrain 3000x32 lr 0.002 seed 1", "a pretrain 6000x32 lr 0.001 seed 1") ==
        P{"3000x32 lr 0.002", "6000x32 lr 0.001"});
  CHECK(rp::fingerprint_difference("a b c", "a x b c") == P{"(nothing)", "x"});
  CHECK(rp::fingerprint_difference("a b mix colour=4", "a b") == P{"mix colour=4", "(nothing)"});
  CHECK(rp::fingerprint_difference("x y", "z") == P{"x y", "z"});
}
