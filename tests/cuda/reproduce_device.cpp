// The reproduction's --device cuda path (examples/reproduce/device_cuda.hpp), compiled with
// Thrust's host device system, against the same work on the CPU: pretraining gives the CPU's
// loss at every step and downloads its weights; a reduced run of all ten methods trains every
// one on the device with the CPU's losses, and says so in its outputs.
#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "device_cuda.hpp"
#include "pipeline.hpp"
#include "support/reduced_reproduction.hpp"

namespace sg = skillgraft;
namespace rp = skillgraft::reproduce;

namespace {

// Sum over every tensor of the model of (a - b)^2.
double squared_distance(rp::weights_t& a, rp::weights_t& b) {
  std::vector<const sg::cpu::tensor<float>*> bt;
  sg::model::for_each_multimodal_parameter(b, [&](const std::string&, sg::cpu::tensor<float>& t) { bt.push_back(&t); });
  double ss = 0;
  std::size_t i = 0;
  sg::model::for_each_multimodal_parameter(a, [&](const std::string&, sg::cpu::tensor<float>& t) {
    for (std::size_t k = 0; k < t.size(); ++k) ss += std::pow(double(t[k]) - double((*bt[i])[k]), 2);
    ++i;
  });
  return ss;
}

}  // namespace

TEST_CASE("reproduction on the device: pretraining has the CPU's loss at every step and hands its weights back") {
  auto s = sg::test::reduced_settings("device_pretrain");
  s.pretrain_steps = 4;
  const rp::run_data d(s);
  rp::weights_t init(s.model), on_cpu(s.model), on_device(s.model);
  sg::model::init_weights(init, s.seed);
  std::vector<double> cpu_losses, device_losses;
  rp::progress pc(true), pd(true);
  pc.keep_losses(&cpu_losses);
  pd.keep_losses(&device_losses);
  rp::pretrain(on_cpu, s, d, pc);
  rp::pretrain_on_device(on_device, s, d, pd);
  // The vision pretext's steps (on the CPU for both), then the four joint steps.
  const std::size_t steps = std::size_t(s.vision_pretext.steps) + 4;
  REQUIRE(cpu_losses.size() == steps);
  REQUIRE(device_losses.size() == steps);
  for (std::size_t i = 0; i < steps; ++i) {
    INFO("step " << i + 1);
    CHECK(std::abs(device_losses[i] - cpu_losses[i]) <= 1e-5 * std::abs(cpu_losses[i]));
  }
  CHECK(cpu_losses[steps - 1] != cpu_losses[steps - 4]);  // the joint steps did change the model
  // The weights came back and equal the CPU's up to rounding. Over the whole model: a
  // near-zero gradient element whose sign rounding flips takes the opposite AdamW step
  // (2 lr), which is negligible beside the whole update but not beside one element.
  const double update = squared_distance(on_cpu, init);
  REQUIRE(update > 0);
  CHECK(squared_distance(on_device, init) > 0.25 * update);
  CHECK(squared_distance(on_device, on_cpu) <= 1e-4 * update);
}

TEST_CASE("reproduction on the device: a reduced run trains all ten methods on the device with the CPU's losses") {
  auto s = sg::test::reduced_settings("device_run");
  s.order = {"count", "clock"};
  s.methods = rp::all_methods();
  const std::size_t n = s.methods.size();
  REQUIRE(n == 10);
  s.jobs = 2;  // forked workers, as in a real run
  s.pretrain_threads = 1;
  auto on_cpu = s;
  on_cpu.out = s.out.string() + "_cpu";
  std::filesystem::remove_all(on_cpu.out);
  s.device = "cuda";
  rp::progress prog(true);
  const auto ref = rp::run_pipeline(on_cpu, prog);
  const auto res = rp::run_pipeline(s, prog);
  REQUIRE(res.methods.size() == n);
  REQUIRE(ref.methods.size() == n);
  std::string on_devices;
  for (std::size_t i = 0; i < n; ++i) {
    const auto& r = res.methods[i];
    const auto& c = ref.methods[i];
    INFO(r.name);
    CHECK(r.name == c.name);
    CHECK(r.device == "cuda");
    on_devices += (i ? ", " : "") + r.name + " " + r.device;
    CHECK(c.device == "cpu");
    CHECK(r.trainable == c.trainable);
    CHECK(r.peak_bytes > 0);
    REQUIRE(r.final_loss.size() == 2);
    // Base models pretrained apart (rounding apart), then 2 x 12 AdamW steps on each side.
    for (std::size_t k = 0; k < 2; ++k) CHECK(std::abs(r.final_loss[k] - c.final_loss[k]) <= 1e-3 * std::abs(c.final_loss[k]));
    REQUIRE(r.R.size() == 3);
    for (const auto& row : r.R)
      for (double v : row) CHECK((v >= 0 && v <= 1));
    CHECK(r.probes.size() == c.probes.size());
  }
  const auto report = sg::test::read_text(s.out / "report.md");
  CHECK_THAT(report, Catch::Contains("Device: pretraining on cuda; training of each method on: " + on_devices + "."));
  CHECK_THAT(on_devices, Catch::Contains("lwf cuda") && Catch::Contains("lora cuda") && Catch::Contains("moe cuda"));
  CHECK(sg::test::read_text(on_cpu.out / "report.md").find("Device:") == std::string::npos);
  std::filesystem::remove_all(s.out);
  std::filesystem::remove_all(on_cpu.out);
}
