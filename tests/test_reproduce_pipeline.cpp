// The reproduction example (examples/reproduce): its task generators, checked against the
// pixels they render, the tokenizer and batch encoding, and a reduced run of the whole
// pipeline (a few pretraining steps, one recipe, one target) that must produce every
// output file, well formed, and reuse its cached base model on a second run.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <limits>
#include <numbers>
#include <set>
#include <sstream>

#include "../examples/reproduce/pipeline.hpp"
#include "support/reduced_reproduction.hpp"

namespace rp = skillgraft::reproduce;
namespace sg = skillgraft;

namespace {

const rp::tokenizer tok;

std::vector<rp::example> sample(const rp::task& t, int n, std::uint64_t seed = 5) {
  std::mt19937_64 rng(seed);
  std::vector<rp::example> v;
  for (int i = 0; i < n; ++i) v.push_back(t.make(rng));
  return v;
}
rp::task find_task(const std::string& name) {
  for (const auto& t : rp::general_tasks())
    if (t.name == name) return t;
  for (const auto& t : rp::target_tasks())
    if (t.name == name) return t;
  FAIL("no task " << name);
  return {};
}

bool foreground(const rp::canvas& c, int x, int y) {
  const auto p = c.at(x, y);
  return std::max({p.r, p.g, p.b}) > 0.45f;
}
bool dark(const rp::canvas& c, int x, int y) {
  const auto p = c.at(x, y);
  return std::max({p.r, p.g, p.b}) < 0.25f;
}

// 4-connected components of foreground pixels.
int components(const rp::canvas& c) {
  std::vector<int> seen(rp::canvas::size * rp::canvas::size, 0);
  int n = 0;
  for (int y = 0; y < rp::canvas::size; ++y)
    for (int x = 0; x < rp::canvas::size; ++x) {
      if (!foreground(c, x, y) || seen[std::size_t(y * 32 + x)]) continue;
      ++n;
      std::vector<std::pair<int, int>> stack{{x, y}};
      seen[std::size_t(y * 32 + x)] = 1;
      while (!stack.empty()) {
        auto [px, py] = stack.back();
        stack.pop_back();
        for (auto [dx, dy] : {std::pair{1, 0}, std::pair{-1, 0}, std::pair{0, 1}, std::pair{0, -1}}) {
          const int qx = px + dx, qy = py + dy;
          if (qx < 0 || qy < 0 || qx >= 32 || qy >= 32 || seen[std::size_t(qy * 32 + qx)] || !foreground(c, qx, qy)) continue;
          seen[std::size_t(qy * 32 + qx)] = 1;
          stack.push_back({qx, qy});
        }
      }
    }
  return n;
}

}  // namespace

TEST_CASE("tokenizer: fixed vocabulary, contiguous number tokens, round trip") {
  CHECK(tok.size() > 150);
  CHECK(tok.number_ids().size() == 60);
  for (int n = 0; n < 60; ++n) {
    CHECK(tok.is_number(tok.number(n)));
    CHECK(tok.word(tok.number(n)) == std::to_string(n));
  }
  CHECK_FALSE(tok.is_number(tok.id("red")));
  CHECK(tok.decode(tok.encode("a small red circle above a large blue square")) ==
        "a small red circle above a large blue square");
  CHECK_THROWS_WITH(tok.encode("a purple elephant"), Catch::Contains("'elephant' is not in the vocabulary"));
}

TEST_CASE("every task: encodable prompts and answers, no numbers in the general abilities") {
  for (const auto& list : {rp::general_tasks(), rp::target_tasks()})
    for (const auto& t : list) {
      INFO("task " << t.name);
      for (const auto& e : sample(t, 150)) {
        INFO(e.prompt << " -> " << e.answer);
        const auto p = tok.encode(e.prompt), a = tok.encode(e.answer);
        CHECK_FALSE(a.empty());
        CHECK(e.has_image == (t.name != "repeat"));
        if (!t.target)
          for (auto id : a) CHECK_FALSE(tok.is_number(id));
        if (!t.target)
          for (auto id : p) CHECK_FALSE(tok.is_number(id));
        // Restricted decoding can say the right answer.
        const auto allowed = rp::allowed_tokens(tok, e.restrict);
        if (!allowed.empty())
          for (auto id : a) CHECK(std::find(allowed.begin(), allowed.end(), id) != allowed.end());
      }
    }
  // The split seeds are fixed: the same test set every time.
  auto a = rp::make_test_set(find_task("clock"), 5, rp::test_seed("clock"));
  auto b = rp::make_test_set(find_task("clock"), 5, rp::test_seed("clock"));
  for (int i = 0; i < 5; ++i) CHECK(a[std::size_t(i)].image.pixels() == b[std::size_t(i)].image.pixels());
}

TEST_CASE("count: the objects do not overlap and the pixels hold exactly the answer's number of them") {
  for (const auto& e : sample(find_task("count"), 200)) {
    INFO(e.prompt << " -> " << e.answer);
    CHECK(int(e.objects.size()) == std::stoi(e.answer));
    for (std::size_t i = 0; i < e.objects.size(); ++i)
      for (std::size_t j = i + 1; j < e.objects.size(); ++j) CHECK(rp::separated(e.objects[i], e.objects[j], 1));
    CHECK(components(e.image) == std::stoi(e.answer));
    for (const auto& o : e.objects) {
      CHECK(o.shape == e.objects[0].shape);  // the question names one kind of shape
      CHECK((o.left() >= 0 && o.top() >= 0 && o.right() < 32 && o.bottom() < 32));
    }
    CHECK(e.prompt.find(rp::gen::plural(e.objects[0].shape)) != std::string::npos);
  }
}

TEST_CASE("clock: the hands lie where the answer says") {
  for (const auto& e : sample(find_task("clock"), 120)) {
    INFO(e.answer);
    CHECK(e.answer == std::to_string(e.hour) + " : " + std::to_string(e.minute));
    CHECK((e.hour >= 1 && e.hour <= 12 && e.minute % 15 == 0 && e.minute < 60));
    // The face centre is one of 9 jittered positions; find the one whose rays match.
    bool found = false;
    for (int jx = -1; jx <= 1 && !found; ++jx)
      for (int jy = -1; jy <= 1 && !found; ++jy) {
        rp::gen::clock_face f;
        f.cx += jx, f.cy += jy;
        auto on = [&](double angle, double len) {
          auto [x, y] = f.point(angle, len);
          return dark(e.image, int(std::lround(x)), int(std::lround(y)));
        };
        const double ha = rp::gen::clock_face::hour_angle(e.hour, e.minute), ma = rp::gen::clock_face::minute_angle(e.minute);
        bool ok = true;
        for (double len : {4.0, 7.0, 10.0}) ok = ok && on(ma, len);  // the long hand
        for (double len : {2.5, 5.0}) ok = ok && on(ha, len);        // the short hand
        // Beyond the short hand's length, its direction is bare face (unless the long hand is there).
        double diff = std::fmod(std::abs(ha - ma), 2 * std::numbers::pi);
        diff = std::min(diff, 2 * std::numbers::pi - diff);
        if (diff > 0.5) ok = ok && !on(ha, 10.0);
        found = ok;
      }
    CHECK(found);
  }
}

TEST_CASE("caption, position, size, exist, relation: labels agree with the scene") {
  auto centre_colour = [](const rp::example& e, const rp::object& o) {
    const auto p = e.image.at(o.cx, o.cy);
    int best = -1;
    double dist = 1e9;
    for (int c = 0; c < 6; ++c) {
      const auto q = rp::named_colours()[std::size_t(c)];
      const double d = std::abs(p.r - q.r) + std::abs(p.g - q.g) + std::abs(p.b - q.b);
      if (d < dist) dist = d, best = c;
    }
    return best;
  };
  for (const auto& e : sample(find_task("caption"), 150)) {
    INFO(e.answer);
    for (const auto& o : e.objects) CHECK(centre_colour(e, o) == o.colour);
    if (e.objects.size() == 2) {
      const auto &a = e.objects[0], &b = e.objects[1];
      CHECK(rp::separated(a, b, 1));
      if (e.answer.find(" above ") != std::string::npos) CHECK(a.bottom() < b.top());
      if (e.answer.find(" below ") != std::string::npos) CHECK(a.top() > b.bottom());
      if (e.answer.find(" left of ") != std::string::npos) CHECK(a.right() < b.left());
      if (e.answer.find(" right of ") != std::string::npos) CHECK(a.left() > b.right());
    }
  }
  for (const auto& e : sample(find_task("position"), 100)) {
    const auto& o = e.objects[0];
    CHECK(e.answer == std::string(o.cy < 16 ? "top" : "bottom") + " " + (o.cx < 16 ? "left" : "right"));
  }
  for (const auto& e : sample(find_task("size"), 100)) {
    const auto& big = e.objects[0].r > e.objects[1].r ? e.objects[0] : e.objects[1];
    CHECK(e.answer == rp::gen::shape_name(big.shape));
    CHECK(e.objects[0].r != e.objects[1].r);
  }
  for (const auto& e : sample(find_task("exist"), 150)) {
    bool present = false;
    for (const auto& o : e.objects)
      present = present || e.prompt == "is there a " + rp::gen::colour_name(o.colour) + " " + rp::gen::shape_name(o.shape) + " ?";
    CHECK(e.answer == (present ? "yes" : "no"));
  }
  for (const auto& e : sample(find_task("relation"), 150)) {
    const auto &a = e.objects[0], &b = e.objects[1];
    const std::string rel = a.bottom() < b.top() ? "above" : a.top() > b.bottom() ? "below" : a.right() < b.left() ? "left" : "right";
    CHECK(e.prompt.find(e.answer + " " + rel) != std::string::npos);
  }
}

TEST_CASE("birds, tissue, sign: the answer names the class that was drawn") {
  for (const auto& e : sample(find_task("birds"), 150)) {
    const auto pos = e.prompt.find(e.answer + " ");
    REQUIRE(pos != std::string::npos);
    std::istringstream rest(e.prompt.substr(pos + e.answer.size() + 1));
    std::string name;
    rest >> name;
    CHECK(name == rp::bird_words()[std::size_t(e.label)]);
    std::set<std::string> options;
    for (const auto& b : rp::bird_words())
      if (e.prompt.find(" " + b + " ") != std::string::npos || e.prompt.ends_with(" " + b)) options.insert(b);
    CHECK(options.size() == 4);
  }
  for (const auto& e : sample(find_task("tissue"), 150)) {
    if (e.prompt == "what tissue is this ?") CHECK(e.answer == rp::tissue_words()[std::size_t(e.label)]);
    if (e.prompt == "what stain is used ?") CHECK(e.answer == rp::stain_words()[std::size_t(e.label)]);
    if (e.prompt == "is the tissue abnormal ?") CHECK(e.answer == (e.label ? "yes" : "no"));
  }
  for (const auto& e : sample(find_task("sign"), 100)) CHECK(e.answer == rp::sign_words()[std::size_t(e.label)]);
  // Every glyph differs from every other, so every word can be read.
  std::set<std::array<std::uint8_t, 5>> glyphs(rp::font3x5().begin(), rp::font3x5().end());
  CHECK(glyphs.size() == 26);
}

TEST_CASE("training batches: targets cover the answer and <eos> only") {
  auto ex = sample(find_task("caption"), 3);
  std::vector<const rp::example*> rows{&ex[0], &ex[1], &ex[2]};
  auto enc = rp::encode_for_training(tok, rows, 16);
  CHECK(enc.images.shape() == sg::cpu::shape_t{3, 32, 32, 3});
  for (std::size_t b = 0; b < 3; ++b) {
    const auto p = tok.encode(ex[b].prompt), a = tok.encode(ex[b].answer);
    CHECK(enc.ids(b, p.size()) == tok.sep());
    std::vector<std::int64_t> t;
    for (std::size_t s = 0; s < enc.targets.shape(1); ++s)
      if (enc.targets(b, s) != sg::ignore_index) t.push_back(enc.targets(b, s));
    auto expect = a;
    expect.push_back(tok.eos());
    CHECK(t == expect);
    CHECK(enc.targets(b, 16 + p.size()) == a[0]);  // the separator's position predicts the first answer word
  }
  auto text = sample(find_task("repeat"), 1);
  CHECK(rp::encode_for_training(tok, {&text[0]}, 16).images.empty());
  CHECK_THROWS_WITH(rp::encode_for_training(tok, {&text[0], &ex[0]}, 16), Catch::Contains("mixes image and text-only"));
}

namespace {
std::size_t lines(const std::string& s) { return std::size_t(std::count(s.begin(), s.end(), '\n')); }

}  // namespace

TEST_CASE("reduced pipeline: pretrain a few steps, one recipe, one target, outputs well formed, cache reused") {
  rp::settings s = sg::test::reduced_settings("test");
  s.order = {"count"};
  s.methods = {"sa_proj", "lora", "no_such_method"};
  s.jobs = 2;  // two worker processes
  rp::progress prog(true);
  auto first = rp::run_pipeline(s, prog);
  CHECK(first.pretrained);
  REQUIRE(first.methods.size() == 2);
  CHECK(first.methods[0].name == "sa_proj");
  CHECK(first.methods[1].name == "lora");
  CHECK(first.skipped == std::vector<std::string>{"no_such_method"});
  for (const char* f : {"base.safetensors", "report.md", "summary.csv", "probe.csv", "curves.csv", "accuracy_sa_proj.csv",
                        "learning_forgetting.svg", "heldout_over_stages.svg", "probe_counting_stage.svg",
                        "probe_over_stages.svg"}) {
    INFO(f);
    CHECK(std::filesystem::exists(s.out / f));
  }
  // Accuracy matrix: base row + one stage, the target first, then the eight held-out tasks.
  auto R = sg::cl::read_accuracy_csv(s.out / "accuracy_sa_proj.csv");
  CHECK(R.stages() == 1);
  CHECK(R.task_count() == 9);
  CHECK(R.tasks()[0] == "count");
  CHECK(R.heldout_columns().size() == 8);
  const auto summary = sg::test::read_text(s.out / "summary.csv");
  CHECK(lines(summary) == 3);
  CHECK(summary.rfind("method,trains,learning", 0) == 0);
  CHECK(summary.find("\nsa_proj,") != std::string::npos);
  // Probe: the base model, steps 1 and 10 and the stage's end (12) of the counting stage, after the stage.
  const auto probe = sg::test::read_text(s.out / "probe.csv");
  for (const char* row : {"sa_proj,0,0,", "sa_proj,1,1,", "sa_proj,1,10,", "sa_proj,1,12,"}) {
    INFO(row);
    CHECK(probe.find(row) != std::string::npos);
  }
  CHECK(lines(probe) == 1 + 2 * 5);
  CHECK(probe.rfind("method,stage,step,number_mass,with_number,kl_base_model\n", 0) == 0);
  for (const auto& p : first.methods[0].probes) {
    CHECK((p.number_mass >= 0 && p.number_mass <= 1));
    CHECK(p.kl >= -1e-9);
  }
  CHECK(first.methods[0].probes[0].kl == Approx(0).margin(1e-9));  // the base model against itself
  CHECK(first.summaries[0].train_seconds > 0);
  CHECK(first.summaries[0].peak_mib > 0);
  for (const char* f : {"learning_forgetting.svg", "heldout_over_stages.svg", "probe_counting_stage.svg", "probe_over_stages.svg"}) {
    const auto svg = sg::test::read_text(s.out / f);
    CHECK(svg.rfind("<svg ", 0) == 0);
    CHECK(svg.find("</svg>") != std::string::npos);
    CHECK(svg.find("nan") == std::string::npos);
  }
  CHECK(sg::test::read_text(s.out / "report.md").find("| sa_proj | q, k, v, o |") != std::string::npos);
  // A second run finds the checkpoint, skips pretraining, and evaluates the same base model.
  s.methods = {"vision_projector"};
  s.jobs = 1;  // in process
  auto second = rp::run_pipeline(s, prog);
  CHECK_FALSE(second.pretrained);
  CHECK(second.base_row == first.base_row);
  // Different pretraining settings do not reuse it.
  s.pretrain_steps = 2;
  s.methods = {};
  CHECK(rp::run_pipeline(s, prog).pretrained);
  std::filesystem::remove_all(s.out);
}

TEST_CASE("reduced pipeline: the MoE baseline grows one expert per target and trains only it and the router") {
  rp::settings s = sg::test::reduced_settings("moe");
  s.order = {"count", "birds"};
  s.methods = {"moe"};
  s.jobs = 1;
  rp::progress prog(true);
  auto res = rp::run_pipeline(s, prog);
  CHECK(res.skipped.empty());
  REQUIRE(res.methods.size() == 1);
  const auto& moe = res.methods[0];
  CHECK(moe.name == "moe");
  CHECK(moe.final_loss.size() == 2);
  // Per layer: the router [2, hidden] and the newest expert's Gate, Up and Down.
  const std::size_t d = 32, I = 48;
  CHECK(moe.trainable == 2 * (2 * d + 3 * d * I));
  auto R = sg::cl::read_accuracy_csv(s.out / "accuracy_moe.csv");
  CHECK(R.stages() == 2);
  CHECK(R.task_count() == 10);
  CHECK(R.tasks()[1] == "birds");
  const auto summary = sg::test::read_text(s.out / "summary.csv");
  CHECK(lines(summary) == 2);
  CHECK(summary.find("\nmoe,") != std::string::npos);
  CHECK(res.summaries[0].train_seconds > 0);
  CHECK(res.summaries[0].peak_mib > 0);
  CHECK(sg::test::read_text(s.out / "report.md").find("| moe | MoE on the MLP |") != std::string::npos);
  std::filesystem::remove_all(s.out);
}

TEST_CASE("seed statistics: t-interval, test-set standard error and rank correlation against hand-computed values") {
  // Values checked with Python: statistics.stdev and scipy.stats.t.ppf(0.975, n - 1).
  const auto a = rp::t_interval({1, 2, 4});
  CHECK(a.n == 3);
  CHECK(a.mean == Approx(2.3333333333333335));
  CHECK(a.sd == Approx(1.5275252316519468));
  CHECK(a.half == Approx(3.7945830337394653).epsilon(1e-4));
  const auto b = rp::t_interval({10.0, 12.5, 9.0, 11.0, 13.5});
  CHECK(b.mean == Approx(11.2));
  CHECK(b.half == Approx(2.2641224648299354).epsilon(1e-4));
  CHECK(b.lo() == Approx(11.2 - b.half));
  CHECK(rp::t_interval({5}).half == 0);  // one seed: no interval
  CHECK(rp::t_quantile_975(60) == Approx(2.0003).epsilon(1e-3));
  // sqrt(0.5 * 0.5 / 100 + 0.9 * 0.1 / 100) / 2, in points.
  CHECK(rp::mean_accuracy_standard_error({0.5, 0.9}, 100) == Approx(2.9154759474226504));
  // scipy.stats.spearmanr([0.1, 0.5, 0.3, 0.3], [1, 4, 2, 3]): ties share their mean rank.
  CHECK(rp::spearman({0.1, 0.5, 0.3, 0.3}, {1, 4, 2, 3}) == Approx(0.9486832980505138));
  CHECK(rp::spearman({1, 2, 3}, {30, 20, 10}) == Approx(-1));
  // The comparison with llm: ratios of the means, and whether the forgetting intervals overlap.
  auto run = [](const std::string& name, std::uint64_t seed, double learning, double heldout, double probe) {
    rp::method_summary m;
    m.name = name, m.seed = seed, m.learning = learning, m.heldout_mean = m.heldout_final = heldout;
    m.probe_max = probe;
    return m;
  };
  const auto agg = rp::aggregate({run("llm", 1, 20, -30, 0.4), run("mlp_gate_up", 1, 16, -5, 0.1), run("llm", 2, 22, -31, 0.5),
                                  run("mlp_gate_up", 2, 14, -6, 0.1), run("sa_proj", 1, 18, -20, 0.3),
                                  run("mlp", 1, 10, -60, 0.6), run("mlp", 2, 12, -61, 0.7),
                                  run("mlp_down", 1, 10, -35, 0.45), run("mlp_down", 2, 12, -37, 0.5)});
  REQUIRE(agg.size() == 5);
  CHECK(agg[0].seeds == std::vector<std::uint64_t>{1, 2});
  CHECK(agg[0].heldout_mean.mean == Approx(-30.5));
  CHECK(agg[0].heldout_mean.half == Approx(12.7062 * std::sqrt(0.5) / std::sqrt(2.0)));
  const auto text = rp::comparison_markdown(agg);
  CHECK_THAT(text, Catch::Contains("- mlp_gate_up: forgets 0.18 of what llm forgets (0.18 after the last stage), learns "
                                   "0.71 of its learning; its forgetting interval does not overlap llm's.") &&
                       // -60.5 ± 6.4 lies below llm's -30.5 ± 6.4: apart too, on the other side.
                       Catch::Contains("- mlp: forgets 1.98 of what llm forgets (1.98 after the last stage), learns 0.52 "
                                       "of its learning; its forgetting interval does not overlap llm's (it forgets more).") &&
                       // -36.0 ± 12.7 reaches into llm's interval.
                       Catch::Contains("- mlp_down: forgets 1.18 of what llm forgets (1.18 after the last stage), learns "
                                       "0.52 of its learning; its forgetting interval overlaps llm's.") &&
                       Catch::Contains("between the counting bias (max) and the mean held-out forgetting: 1.00."));
}

TEST_CASE("recovery after the counting stage: paired per-seed changes of the held-out mean") {
  auto run = [](const std::string& name, std::uint64_t seed, std::vector<double> curve) {
    rp::method_summary m;
    m.name = name, m.seed = seed, m.heldout_curve = curve, m.target_curve = std::vector<double>(curve.size(), 0.0);
    return m;
  };
  // Order birds, count, tissue, sign: curve rows base, after birds, after count, after tissue, after sign.
  const auto agg = rp::aggregate({run("llm", 1, {80, 78, 60, 64, 50}), run("llm", 2, {80, 79, 58, 61, 49}),
                                  run("llm", 3, {80, 77, 62, 66, 52}), run("mlp", 1, {80, 80, 70, 69, 60}),
                                  run("mlp", 2, {80, 81, 72, 74, 65})});
  REQUIRE(agg.size() == 2);
  // llm's tissue stage: +4, +3, +4 per seed, mean 3.667, sd 0.5774, t(0.975, 2) = 4.3027: ± 1.434.
  CHECK(agg[0].heldout_change(2, 3).mean == Approx(11.0 / 3));
  CHECK(agg[0].heldout_change(2, 3).half == Approx(4.302653 * std::sqrt(1.0 / 3) / std::sqrt(3.0)).epsilon(1e-4));
  // Unpaired, after count (60 ± 5.0) and after tissue (63.7 ± 6.2) overlap: only the pairing shows the recovery.
  CHECK(agg[0].heldout_curve[2].hi() > agg[0].heldout_curve[3].lo());
  const std::vector<std::string> order{"birds", "count", "tissue", "sign"};
  const auto text = rp::recovery_markdown(agg, order);
  // counting -18, -21, -15 (± 7.45); tissue +3.7 ± 1.4 above zero; after count -> after sign -10, -9, -10.
  CHECK_THAT(text, Catch::Contains("| method | counting | tissue | after counting → after the last stage |") &&
                       Catch::Contains("| llm | -18.0 ± 7.5 ↓ | +3.7 ± 1.4 ↑ | -9.7 ± 1.4 ↓ |") &&
                       // mlp, two seeds: counting -10, -9; tissue -1, +2 (no mark); after count -> after sign -10, -7.
                       Catch::Contains("| mlp | -9.5 ± 6.4 ↓ | +0.5 ± 19.1 | -8.5 ± 19.1 |"));
  // No counting stage, or counting last: nothing to say.
  CHECK(rp::recovery_markdown(agg, {"birds", "tissue", "sign", "clock"}).empty());
  CHECK(rp::recovery_markdown(agg, {"birds", "tissue", "sign", "count"}).empty());
}

TEST_CASE("vision pretext: every token is labelled with the object covering most of it") {
  rp::object sq;  // a large red square over the top-left token and parts of its neighbours
  sq.shape = rp::shape_kind::square, sq.colour = 0, sq.cx = 5, sq.cy = 5, sq.r = 5;
  rp::object dot;  // a small blue circle inside the bottom-right token
  dot.shape = rp::shape_kind::circle, dot.colour = 2, dot.cx = 28, dot.cy = 28, dot.r = 2;
  const auto labels = rp::token_labels({sq, dot}, 4);
  REQUIRE(labels.size() == 16);
  CHECK(labels[0] == std::array<int, 3>{1 + int(rp::shape_kind::square), 1 + 0, 2});  // large
  CHECK(labels[1] == std::array<int, 3>{1 + int(rp::shape_kind::square), 1 + 0, 2});  // x 8..10 covered: 3 x 8 pixels
  CHECK(labels[4] == labels[1]);  // y 8..10 covered
  CHECK(labels[5] == std::array<int, 3>{1 + int(rp::shape_kind::square), 1 + 0, 2});  // the 3 x 3 corner at (8..10, 8..10)
  CHECK(labels[15] == std::array<int, 3>{1 + int(rp::shape_kind::circle), 1 + 2, 1});  // small
  for (int t : {2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14}) CHECK(labels[std::size_t(t)] == std::array<int, 3>{0, 0, 0});
}

TEST_CASE("vision pretext loss: cross-entropy per label group, accuracy on all tokens and on the object tokens") {
  // Three tokens: background, an object whose every group is right, an object whose shape is wrong.
  const std::vector<std::array<int, 3>> labels{{0, 0, 0}, {2, 3, 1}, {4, 5, 2}};
  sg::cpu::tensor<float> logits({3, std::size_t(rp::pretext_outputs)}, sg::memory_use::workspace);
  logits.set_zero();
  auto set = [&](std::size_t row, std::size_t group, int cls, float v) {
    std::size_t at = 0;
    for (std::size_t g = 0; g < group; ++g) at += std::size_t(rp::pretext_classes[g]);
    logits.data()[row * std::size_t(rp::pretext_outputs) + at + std::size_t(cls)] = v;
  };
  for (std::size_t g = 0; g < 3; ++g) set(0, g, 0, 2.0f);
  for (std::size_t g = 0; g < 3; ++g) set(1, g, labels[1][g], 2.0f);
  set(2, 0, 1, 2.0f);  // shape: class 1 instead of 4
  for (std::size_t g = 1; g < 3; ++g) set(2, g, labels[2][g], 2.0f);
  sg::cpu::tensor<float> grad(logits.shape(), sg::memory_use::workspace);
  rp::pretext_counts counts;
  const double loss = rp::pretext_loss(logits, labels, &grad, 0.5, counts);
  CHECK(counts.correct == std::array<std::size_t, 3>{2, 3, 3});
  CHECK(counts.object_correct == std::array<std::size_t, 3>{1, 2, 2});
  CHECK(counts.object_tokens == 2);
  // Each group: one logit at 2, the rest at 0. Right: log(e^2 + n - 1) - 2; the wrong shape: log(e^2 + n - 1).
  double expected = 0;
  for (std::size_t r = 0; r < 3; ++r)
    for (std::size_t g = 0; g < 3; ++g) {
      const double n = rp::pretext_classes[g];
      expected += std::log(std::exp(2.0) + n - 1) - ((r == 2 && g == 0) ? 0.0 : 2.0);
    }
  CHECK(loss == Approx(expected).epsilon(1e-12));
  // The gradient: scale * (softmax - one-hot); row 2's shape group, class 4 (the label, at 0).
  const double p0 = 1.0 / (std::exp(2.0) + rp::pretext_classes[0] - 1);
  CHECK(grad.data()[2 * std::size_t(rp::pretext_outputs) + 4] == Approx(0.5 * (p0 - 1.0)).epsilon(1e-6));
  CHECK(grad.data()[2 * std::size_t(rp::pretext_outputs) + 1] == Approx(0.5 * std::exp(2.0) * p0).epsilon(1e-6));
}

TEST_CASE("joint pretraining draw: weights repeat a task, focus steps draw only the colour and shape questions") {
  rp::settings s = sg::test::reduced_settings("mix");
  const auto names = rp::pretrain_task_names();
  auto count = [](const std::vector<std::size_t>& slots, std::size_t i) { return std::count(slots.begin(), slots.end(), i); };
  auto at = [&](const std::string& n) { return std::size_t(std::find(names.begin(), names.end(), n) - names.begin()); };
  s.pretrain_mix = {{"colour", 3}, {"repeat", 0}};
  const auto slots = rp::pretrain_slots(s, names, false);
  CHECK(count(slots, at("colour")) == 3);
  CHECK(count(slots, at("repeat")) == 0);
  CHECK(count(slots, at("shape")) == 1);
  CHECK(count(slots, at("numbers")) == 1);
  CHECK(slots.size() == names.size() + 2 - 1);
  const auto focus = rp::pretrain_slots(s, names, true);
  CHECK(focus.size() == 4);  // colour three times, shape once
  CHECK(count(focus, at("shape")) == 1);
  s.pretrain_mix = {{"counting", 2}};
  CHECK_THROWS_WITH(rp::pretrain_slots(s, names, false), Catch::Contains("'counting'"));
  s.pretrain_mix = {{"colour", 0}, {"shape", 0}};
  CHECK_THROWS_WITH(rp::pretrain_slots(s, names, true), Catch::Contains("no task"));

  // What the loop trains on: the first focus steps only the two binding questions (one image
  // batch, prompts "what colour ..." / "what shape ..."), afterwards the whole mixture.
  s.pretrain_mix = {};
  s.pretrain_focus_steps = 3;
  s.pretrain_steps = 12;
  const rp::run_data d(s);
  rp::progress quiet(true);
  std::vector<std::set<std::string>> asked;  // per step: the prompts' second words, or "text" for a text-only batch
  rp::pretrain_loop(s, d, 4, quiet, [&](const std::vector<rp::encoded_batch>& enc) {
    std::set<std::string> words;
    for (const auto& e : enc) {
      if (e.images.empty()) words.insert("text");
      else
        for (std::size_t b = 0; b < e.ids.shape(0); ++b) words.insert(d.tok.word(e.ids(b, 1)));
    }
    asked.push_back(words);
    return sg::train::step_stats{};
  });
  REQUIRE(asked.size() == 12);
  for (int n = 0; n < 3; ++n) {
    CAPTURE(n);
    for (const auto& w : asked[std::size_t(n)]) CHECK((w == "colour" || w == "shape"));
  }
  std::set<std::string> later;
  for (std::size_t n = 3; n < asked.size(); ++n) later.insert(asked[n].begin(), asked[n].end());
  CHECK(later.size() > 3);  // the other tasks come back
  CHECK(later.count("text") == 1);
}

TEST_CASE("repeatability: the same seed and thread count give bit-identical runs, another seed does not") {
  rp::settings s = sg::test::reduced_settings("repeat");
  s.order = {"count"};
  const rp::run_data d(s);
  rp::progress quiet(true);
  // The base model, twice: vision pretext and joint pretraining are bit-identical.
  rp::weights_t base(s.model), again(s.model);
  rp::pretrain(base, s, d, quiet);
  rp::pretrain(again, s, d, quiet);
  CHECK(rp::content_checksum(base) == rp::content_checksum(again));
  rp::evaluator ev(d.tok, s.model);
  const auto row = rp::evaluate_all(ev, base, d, true);
  const auto probe = ev.counting_bias(base, d.probe, base);
  const auto one = rp::run_method("mlp_gate_up", s, base, row, probe, d, quiet);
  const auto two = rp::run_method("mlp_gate_up", s, base, row, probe, d, quiet);
  CHECK(one.final_loss == two.final_loss);  // exact
  CHECK(one.R == two.R);
  CHECK(one.probes.back().number_mass == two.probes.back().number_mass);
  auto other = s;
  other.seed = s.seed + 1;  // the next fine-tuning seed: other stage data
  CHECK(rp::run_method("mlp_gate_up", other, base, row, probe, d, quiet).final_loss != one.final_loss);
}

TEST_CASE("reduced pipeline: every method runs once per seed, the table gives means with intervals") {
  rp::settings s = sg::test::reduced_settings("seeds");
  s.order = {"count"};
  s.methods = {"sa_proj", "llm"};
  s.seeds = 2;
  s.seed = 7;
  s.jobs = 2;
  rp::progress prog(true);
  const auto res = rp::run_pipeline(s, prog);
  REQUIRE(res.summaries.size() == 4);
  REQUIRE(res.seeded.size() == 2);
  for (const auto& a : res.seeded) {
    CHECK(a.seeds == std::vector<std::uint64_t>{7, 8});
    std::vector<double> learning;
    for (const auto& m : res.summaries)
      if (m.name == a.mean.name) learning.push_back(m.learning);
    CHECK(a.learning.mean == Approx(rp::t_interval(learning).mean));
    CHECK(a.learning.half == Approx(rp::t_interval(learning).half));
    CHECK(a.heldout_curve.size() == 2);  // base, after the one stage
  }
  for (const char* f : {"accuracy_sa_proj.csv", "accuracy_sa_proj_seed8.csv", "accuracy_llm_seed8.csv"}) {
    INFO(f);
    CHECK(std::filesystem::exists(s.out / f));
  }
  const auto summary = sg::test::read_text(s.out / "summary.csv");
  CHECK(lines(summary) == 5);
  CHECK(summary.find(",8\n") != std::string::npos);
  const auto report = sg::test::read_text(s.out / "report.md");
  CHECK_THAT(report, Catch::Contains("| sa_proj | q, k, v, o | 2 | ") && Catch::Contains(" ± ") &&
                         Catch::Contains("fine-tuning seeds 7..8") && Catch::Contains("Test-set noise") &&
                         Catch::Contains("| method | base | after count |"));
  // The runs do not depend on how many run at once: in this process, one after another, the
  // numbers are those the two single-threaded workers gave, bit for bit.
  s.jobs = 1;
  const auto in_turn = rp::run_pipeline(s, prog);
  REQUIRE(in_turn.methods.size() == res.methods.size());
  for (std::size_t i = 0; i < res.methods.size(); ++i) {
    CHECK(in_turn.methods[i].final_loss == res.methods[i].final_loss);
    CHECK(in_turn.methods[i].R == res.methods[i].R);
  }
  std::filesystem::remove_all(s.out);
}

namespace {
bool same_content(const rp::example& a, const rp::example& b) {
  return a.has_image == b.has_image && a.prompt == b.prompt && a.answer == b.answer &&
         (!a.has_image || a.image.pixels() == b.image.pixels());
}
bool in(const rp::example& e, const std::vector<rp::example>& set) {
  return std::any_of(set.begin(), set.end(), [&](const rp::example& x) { return same_content(e, x); });
}
}  // namespace

TEST_CASE("learning-rate rule: the highest validation score wins, a tie goes to the smaller rate") {
  const std::vector<double> grid{2e-4, 5e-4, 1e-3, 2e-3};
  CHECK(rp::choose_rate(grid, {1.0, 4.0, 3.0, -2.0}) == 5e-4);
  CHECK(rp::choose_rate(grid, {1.0, 2.0, 3.0, 3.5}) == 2e-3);  // at the largest rate too
  CHECK(rp::choose_rate(grid, {1.0, 3.0, 3.0, 3.0}) == 5e-4);  // a tie: the smaller rate
  CHECK(rp::choose_rate(grid, {0.0, 0.0, 0.0, 0.0}) == 2e-4);
  CHECK(rp::choose_rate({2e-3, 5e-4, 1e-3}, {2.0, 2.0, 1.0}) == 5e-4);  // in any grid order
  // The same accuracies summed in another order are equal; one example more is not.
  CHECK(rp::choose_rate({5e-4, 1e-3}, {0.1 + 0.2, 0.3}) == 5e-4);
  CHECK(rp::choose_rate({5e-4, 1e-3}, {0.3, 0.3 + 100.0 / 192}) == 1e-3);
  CHECK_THROWS(rp::choose_rate(grid, {1.0, 2.0}));
  CHECK_THROWS(rp::choose_rate({}, {}));
  // The score: the mean over the searched stages of each target's gain right after its own stage.
  rp::method_result r;
  r.R = {{0.10, 0.20}, {0.50, 0.10}, {0.30, 0.60}};
  CHECK(rp::validation_gain(r) == Approx(100 * ((0.50 - 0.10) + (0.60 - 0.20)) / 2));
  r.R = {{0.25}, {0.75}};
  CHECK(rp::validation_gain(r) == Approx(50.0));
  const auto c = rp::choose("sa_proj", grid, std::vector<double>{1.0, 4.0, 3.0, -2.0});
  CHECK(rp::chosen_text(c) == "0.0005");
  CHECK(c.seeds == 1);
  CHECK(c.error == std::vector<double>(4, 0.0));
  CHECK(rp::chosen_text(rp::choose("llm", grid, std::vector<double>{1.0, 2.0, 3.0, 4.0})) == "0.002 (largest)");
}

TEST_CASE("learning-rate rule with seeds: the smallest rate within one standard error of the best") {
  const std::vector<double> grid{2e-4, 5e-4, 1e-3, 2e-3};
  // The best score's standard error sets the floor; other rates' errors do not matter.
  CHECK(rp::choose_rate(grid, {1.0, 3.5, 4.0, 3.0}, {0.0, 0.0, 1.0, 0.0}) == 5e-4);
  CHECK(rp::choose_rate(grid, {1.0, 3.5, 4.0, 3.0}, {5.0, 5.0, 0.2, 5.0}) == 1e-3);
  CHECK(rp::choose_rate(grid, {3.0, 3.5, 4.0, 3.0}, {0.0, 0.0, 1.0, 0.0}) == 2e-4);  // exactly at the floor
  CHECK(rp::choose_rate(grid, {1.0, 3.5, 4.0, 3.0}, {0.0, 0.0, 0.0, 0.0}) == 1e-3);  // no error: the highest
  CHECK(rp::choose_rate({2e-3, 5e-4, 1e-3}, {4.0, 3.5, 2.0}, {1.0, 0.0, 0.0}) == 5e-4);  // in any grid order
  CHECK_THROWS(rp::choose_rate(grid, {1.0, 2.0, 3.0, 4.0}, {1.0}));
  // Per-seed scores: the mean, and the standard error of the mean (sd / sqrt(seeds)).
  const auto c = rp::choose("mlp", grid, {{1.0, 3.0}, {4.0, 4.0}, {3.0, 7.0}, {0.0, 2.0}});
  CHECK(c.seeds == 2);
  CHECK(c.score == std::vector<double>{2.0, 4.0, 5.0, 1.0});
  CHECK(c.error[0] == Approx(1.0));  // sd sqrt(2), over sqrt(2)
  CHECK(c.error[1] == 0.0);
  CHECK(c.error[2] == Approx(2.0));
  CHECK(c.rate == 5e-4);  // best 5.0 ± 2.0 at 1e-3; 4.0 at 5e-4 reaches 3.0, 2.0 at 2e-4 does not
  CHECK_THROWS(rp::choose("mlp", {5e-4, 1e-3}, {{1.0, 2.0}, {1.0}}));
  const auto md = rp::lr_search_markdown({c}, rp::default_settings(), 2, 1.0);
  CHECK_THAT(md, Catch::Contains("fine-tuning seeds 1..2") && Catch::Contains("| mlp | +2.0 ± 1.0 | +4.0 ± 0.0 | +5.0 ± 2.0 |") &&
                     Catch::Contains("within one standard error of the highest"));
}

TEST_CASE("learning-rate rule with a tolerance: the smallest rate within a fraction of the best, or one standard error") {
  const std::vector<double> grid{5e-4, 1e-3, 2e-3, 5e-3};
  // The seed-3 base model's search for mlp_gate_up (docs/reproduction/default-seed3): 31.4 ± 0.8 at
  // 5e-3 and 30.5 at 2e-3. One standard error chose 5e-3; a tenth (floor 28.26) chooses 2e-3.
  const std::vector<double> score{19.5, 26.8, 30.5, 31.4}, error{0.3, 0.3, 0.8, 0.8};
  CHECK(rp::choose_rate(grid, score, error) == 5e-3);
  CHECK(rp::choose_rate(grid, score, error, 0.1) == 2e-3);
  CHECK(rp::choose_rate(grid, score, error, 0.2) == 1e-3);  // 26.8 >= 25.12
  CHECK(rp::choose_rate(grid, score, error, 0.5) == 5e-4);
  // The larger margin wins: a standard error wider than the tolerance still sets the floor.
  CHECK(rp::choose_rate(grid, score, {0.3, 0.3, 0.8, 5.0}, 0.1) == 1e-3);  // floor 26.4
  // Exactly at the floor counts; without seeds the tolerance alone sets it.
  CHECK(rp::choose_rate(grid, {1.0, 9.0, 10.0, 2.0}, {}, 0.1) == 1e-3);
  CHECK(rp::choose_rate(grid, {1.0, 8.9, 10.0, 2.0}, {}, 0.1) == 2e-3);
  // A negative best (nothing learns): the margin is a tenth of its size, below it.
  CHECK(rp::choose_rate(grid, {-11.5, -10.0, -12.0, -20.0}, {}, 0.2) == 5e-4);
  CHECK(rp::choose_rate(grid, {-12.5, -10.0, -12.0, -20.0}, {}, 0.1) == 1e-3);
  CHECK_THROWS_AS(rp::choose_rate(grid, score, error, 1.0), std::invalid_argument);
  CHECK_THROWS_AS(rp::choose_rate(grid, score, error, -0.1), std::invalid_argument);
  // choose() carries the tolerance to the choice and the report.
  const auto c = rp::choose("mlp_gate_up", grid, {{19.2, 19.8}, {26.5, 27.1}, {29.7, 31.3}, {30.6, 32.2}}, 0.1);
  CHECK(c.rate == 2e-3);
  CHECK(rp::choose("mlp_gate_up", grid, {{19.2, 19.8}, {26.5, 27.1}, {29.7, 31.3}, {30.6, 32.2}}).rate == 5e-3);
  CHECK(rp::default_settings().lr_search_tolerance == 0.1);
  const auto md = rp::lr_search_markdown({c}, rp::default_settings(), 2, 1.0);
  CHECK_THAT(md, Catch::Contains("within 10 % of the highest score or one standard error of it, whichever is more") &&
                     Catch::Contains("| mlp_gate_up | +19.5 ± 0.3 | +26.8 ± 0.3 | +30.5 ± 0.8 | +31.4 ± 0.8 | 0.002 |"));
  const auto one = rp::choose("sa_proj", grid, std::vector<double>{20.0, 28.0, 29.0, 30.0}, 0.1);
  CHECK(one.rate == 1e-3);
  CHECK_THAT(rp::lr_search_markdown({one}, rp::default_settings(), 2, 1.0),
             Catch::Contains("the chosen rate is the smallest whose score is within 10 % of the highest score."));
  // The grid's ends, named where the rule met them: mlp_gate_up's and sa_proj's highest scores
  // lie at 5e-3, mlp's inside the grid; only llm chose 5e-4.
  CHECK_THAT(md, Catch::Contains("The highest score lies at the grid's largest rate for mlp_gate_up:") &&
                     !Catch::Contains("smallest rate was chosen"));
  const auto inside = rp::choose("mlp", grid, std::vector<double>{20.0, 30.0, 29.0, 25.0}, 0.1);
  CHECK(inside.rate == 1e-3);
  CHECK_THAT(rp::lr_search_markdown({inside}, rp::default_settings(), 2, 1.0),
             !Catch::Contains("grid's largest rate") && !Catch::Contains("smallest rate was chosen"));
  const auto llm = rp::choose("llm", grid, std::vector<double>{30.0, 31.0, 29.0, 20.0}, 0.1);
  CHECK(llm.rate == 5e-4);
  CHECK_THAT(rp::lr_search_markdown({inside, one, llm}, rp::default_settings(), 2, 1.0),
             Catch::Contains("The grid's smallest rate was chosen for llm: a smaller rate might also be within the margin") &&
                 Catch::Contains("largest rate for sa_proj:"));
}

TEST_CASE("the lr grid option: rates in increasing order, '' for none, anything else refused naming the option") {
  CHECK(rp::parse_rate_grid("1e-3,2e-4,5e-4") == std::vector<double>{2e-4, 5e-4, 1e-3});
  CHECK(rp::parse_rate_grid("0.002") == std::vector<double>{2e-3});
  CHECK(rp::parse_rate_grid("").empty());
  for (const char* bad : {"1e-3,x", "1e-3,,2e-3", "1e-3,", ",1e-3", "-1e-3", "0", "1e-3,1e-3", "inf", "nan", "1e-3 "}) {
    INFO(bad);
    CHECK_THROWS_WITH(rp::parse_rate_grid(bad), Catch::Contains("option --lr-grid") && Catch::Contains(bad));
  }
}

TEST_CASE("the text model's size options: each bad value refused naming its option, the projector following") {
  auto c = rp::default_settings().model;
  rp::resize_text(c, {.hidden = 128, .heads = 8, .kv_heads = 4, .intermediate = 512, .layers = 6});
  CHECK(c.text.head_dim == 16);
  CHECK(c.text.n_heads == 8);
  CHECK(c.text.n_kv_heads == 4);
  CHECK(c.text.intermediate == 512);
  CHECK(c.text.n_layers == 6);
  CHECK(c.projector.out == 128);
  rp::resize_text(c, {.hidden = 64, .heads = 4, .kv_heads = 2, .intermediate = 96, .layers = 2});
  CHECK(c.projector.out == 64);
  CHECK(c.text.head_dim == 16);
  const rp::text_size ok{.hidden = 128, .heads = 4, .kv_heads = 2, .intermediate = 256, .layers = 4};
  auto refused = [&](rp::text_size z, const std::string& message) {
    auto m = rp::default_settings().model;
    INFO(message);
    CHECK_THROWS_WITH(rp::resize_text(m, z), Catch::Contains(message));
  };
  auto with = [&](auto change) {
    auto z = ok;
    change(z);
    return z;
  };
  refused(with([](auto& z) { z.hidden = 0; }), "option --text-hidden must be positive, got 0");
  refused(with([](auto& z) { z.heads = -1; }), "option --text-heads must be positive, got -1");
  refused(with([](auto& z) { z.kv_heads = 0; }), "option --text-kv-heads must be positive, got 0");
  refused(with([](auto& z) { z.intermediate = 0; }), "option --text-intermediate must be positive, got 0");
  refused(with([](auto& z) { z.layers = 0; }), "option --text-layers must be positive, got 0");
  refused(with([](auto& z) { z.heads = 5; }), "option --text-hidden (128) must be a multiple of --text-heads (5)");
  refused(with([](auto& z) { z.kv_heads = 3; }), "option --text-heads (4) must be a multiple of --text-kv-heads (3)");
  refused(with([](auto& z) { z.hidden = 120, z.heads = 8; }), "heads of 15 features");
}

TEST_CASE("the train-layers option: A:B within the language model, anything else refused naming the option") {
  CHECK(rp::parse_train_layers("2:4", 4) == sg::layer_range{2, 3});
  CHECK(rp::parse_train_layers("0:1", 4) == sg::layer_range{0, 0});
  CHECK(rp::parse_train_layers("0:4", 4) == sg::layer_range{0, 3});
  CHECK(rp::train_layers_text(rp::parse_train_layers("2:4", 4)) == "layers 2:4");
  CHECK(rp::train_layers_text({}) == "all layers");
  for (const char* bad : {"2", "2:2", "3:2", "0:5", "-1:2", "a:2", "1:", ":2", "1:2:3", ""}) {
    INFO(bad);
    CHECK_THROWS_WITH(rp::parse_train_layers(bad, 4),
                      Catch::Contains("option --train-layers") && Catch::Contains("'" + std::string(bad) + "'"));
  }
}

TEST_CASE("reduced pipeline: a layer range trains only those layers, for every method, in the report") {
  rp::settings s = sg::test::reduced_settings("layers");
  s.order = {"count"};
  s.methods = {"sa_proj", "llm", "lora"};
  s.jobs = 1;
  rp::progress quiet(true);
  const auto all = rp::run_pipeline(s, quiet);
  s.train_layers = rp::parse_train_layers("1:2", s.model.text.n_layers);
  const auto top = rp::run_pipeline(s, quiet);
  REQUIRE(all.methods.size() == 3);
  REQUIRE(top.methods.size() == 3);
  const auto& t = s.model.text;
  const std::size_t attention = std::size_t(t.hidden) * (2 * t.q_dim() + 2 * t.kv_dim());
  const std::size_t norms = 2 * std::size_t(t.hidden);
  // sa_proj: the top layer's projections only, half of what it trains on both layers.
  CHECK(all.methods[0].trainable == 2 * attention);
  CHECK(top.methods[0].trainable == attention);
  // llm: the lower layer's projections and norms stop training; embeddings, final norm and head do not.
  const std::size_t mlp = 3 * std::size_t(t.hidden) * std::size_t(t.intermediate);
  CHECK(all.methods[1].trainable - top.methods[1].trainable == attention + mlp + norms);
  // LoRA: adapters on the top layer alone.
  CHECK(top.methods[2].trainable * 2 == all.methods[2].trainable);
  CHECK(top.methods[0].final_loss != all.methods[0].final_loss);
  CHECK_THAT(sg::test::read_text(s.out / "report.md"), Catch::Contains("steps x 4 on the LM's layers 1:2, "));
  std::filesystem::remove_all(s.out);
}

TEST_CASE("validation split: a seed stream of its own, no example of a test set") {
  rp::settings s = rp::default_settings();
  s.test_examples = 48, s.validation_examples = 48, s.lr_search_stages = 5;
  const rp::run_data d(s);
  const auto v = rp::validation_data(s, d);
  REQUIRE(v.targets.size() == 5);
  REQUIRE(v.tests.size() == 5);  // the targets only: a search run evaluates nothing else
  CHECK(v.probe.empty());
  for (std::size_t k = 0; k < 5; ++k) {
    const auto& name = d.targets[k].name;
    INFO(name);
    CHECK(v.targets[k].name == name);
    CHECK(v.tests[k].task == name);
    REQUIRE(v.tests[k].examples.size() == 48);
    CHECK(d.tests[k].task == name);
    rp::example_stream first_stage(d.targets[k], rp::train_seed(s.seed, name, int(k)));
    std::vector<rp::example> trained;
    for (int i = 0; i < 48; ++i) trained.push_back(first_stage.next());
    for (const auto& e : v.tests[k].examples) {
      CHECK_FALSE(in(e, d.tests[k].examples));
      CHECK_FALSE(in(e, trained));
    }
  }
  // The exclusion itself: drawn from the test set's own seed, the first examples are the test
  // set's (which the check above would see) and are skipped.
  const auto& birds = d.targets[0];
  const auto test = rp::make_test_set(birds, 8, rp::test_seed(birds.name));
  const auto unguarded = rp::make_validation_set(birds, 8, rp::test_seed(birds.name), {});
  for (const auto& e : unguarded) CHECK(in(e, test));
  const auto guarded = rp::make_validation_set(birds, 8, rp::test_seed(birds.name), test);
  REQUIRE(guarded.size() == 8);
  for (const auto& e : guarded) CHECK_FALSE(in(e, test));
  s.lr_search_stages = 2;
  CHECK(rp::validation_data(s, d).targets.size() == 2);
}

TEST_CASE("learning-rate search: each method trains at its best validation rate, the same with any --jobs") {
  rp::settings s = sg::test::reduced_settings("lr_search");
  s.order = {"count", "birds"};
  s.methods = {"sa_proj", "lora"};
  s.lr_grid = {1e-4, 3e-2};
  s.lr_search_stages = 2;
  s.lr_search_seeds = 2;
  s.jobs = 2;
  rp::progress quiet(true);
  const auto res = rp::run_pipeline(s, quiet);
  REQUIRE(res.rates.size() == 2);
  CHECK(res.lr_search_seconds > 0);
  // Each score is what a run of the first stage at that rate gives on the validation split,
  // recomputed here in this process, bit for bit; the choice is the rule's.
  rp::weights_t base(s.model);
  REQUIRE(rp::load_checkpoint(base, s.checkpoint_path(), rp::fingerprint(s)));
  const rp::run_data d(s);
  const auto v = rp::validation_data(s, d);
  REQUIRE(v.targets.size() == 2);
  const rp::evaluator ev(d.tok, s.model);
  const auto base_row = rp::evaluate_all(ev, base, v, s.restricted);
  for (std::size_t m = 0; m < 2; ++m) {
    const auto& c = res.rates[m];
    CHECK(c.method == s.methods[m]);
    REQUIRE(c.score.size() == 2);
    CHECK(c.seeds == 2);
    for (std::size_t i = 0; i < 2; ++i) {
      double gain[2];
      for (int k = 0; k < 2; ++k) {
        auto at = s;
        at.lr = at.lora_lr = s.lr_grid[i];
        at.seed = s.seed + std::uint64_t(k);
        const auto r = rp::run_method(c.method, at, base, base_row, {}, v, quiet);
        CHECK(r.R.size() == 3);  // base, after each searched stage
        gain[k] = rp::validation_gain(r);
      }
      CHECK(c.score[i] == (gain[0] + gain[1]) / 2);
      CHECK(c.error[i] == Approx(std::abs(gain[0] - gain[1]) / 2));
    }
    CHECK(c.tolerance == s.lr_search_tolerance);
    CHECK(c.rate == rp::choose_rate(s.lr_grid, c.score, c.error, s.lr_search_tolerance));
  }
  // The reported runs train at the chosen rates (LoRA's too: one rule).
  REQUIRE(res.methods.size() == 2);
  for (const auto& r : res.methods) CHECK(r.lr == rp::rate_of(r.name, res.rates, s));
  const auto report = sg::test::read_text(s.out / "report.md");
  CHECK_THAT(report, Catch::Contains("chosen from {0.0001, 0.03}") && Catch::Contains("| method | 0.0001 | 0.03 | chosen |") &&
                         Catch::Contains("| sa_proj | ") && Catch::Contains("| lora | ") &&
                         Catch::Contains("validation examples, held apart from the test sets"));
  const auto csv = sg::test::read_text(s.out / "lr_search.csv");
  CHECK(csv.rfind("method,lr,validation_gain,standard_error,seeds,chosen\n", 0) == 0);
  CHECK(lines(csv) == 1 + 4);
  std::size_t chosen_rows = 0;
  for (auto at = csv.find(",1\n"); at != std::string::npos; at = csv.find(",1\n", at + 1)) ++chosen_rows;
  CHECK(chosen_rows == 2);  // one chosen rate per method
  const auto summary = sg::test::read_text(s.out / "summary.csv");
  CHECK(summary.find(",trainable,lr,seed\n") != std::string::npos);
  for (const auto& r : res.methods) CHECK(summary.find("," + sg::cl::detail::csv_number(r.lr) + ",1\n") != std::string::npos);
  // The same search in this process, one run after another: the same scores bit for bit.
  s.jobs = 1;
  const auto in_turn = rp::run_pipeline(s, quiet);
  REQUIRE(in_turn.rates.size() == 2);
  for (std::size_t m = 0; m < 2; ++m) {
    CHECK(in_turn.rates[m].score == res.rates[m].score);
    CHECK(in_turn.rates[m].error == res.rates[m].error);
    CHECK(in_turn.rates[m].rate == res.rates[m].rate);
  }
  std::filesystem::remove_all(s.out);
}

TEST_CASE("fixed learning rates: no search, every seed of a method at --lr, LoRA at --lora-lr") {
  rp::settings s = sg::test::reduced_settings("lr_fixed");
  s.order = {"count"};
  s.methods = {"sa_proj", "lora"};
  s.lr = 7e-4;
  s.jobs = 1;
  rp::progress quiet(true);
  const auto res = rp::run_pipeline(s, quiet);
  CHECK(res.rates.empty());
  REQUIRE(res.methods.size() == 2);
  CHECK(res.methods[0].lr == 7e-4);
  CHECK(res.methods[1].lr == s.lora_lr);
  CHECK_FALSE(std::filesystem::exists(s.out / "lr_search.csv"));
  const auto report = sg::test::read_text(s.out / "report.md");
  CHECK(report.find("lr 0.0007 (LoRA 0.002)") != std::string::npos);
  CHECK(report.find("| chosen |") == std::string::npos);
  std::filesystem::remove_all(s.out);
}

TEST_CASE("device check: an unknown device and a watch on the GPU are refused, the CPU passes") {
  rp::settings s = rp::default_settings();
  CHECK_NOTHROW(rp::check_device(s));
  s.pretrain_watch = 5;
  CHECK_NOTHROW(rp::check_device(s));  // the CPU pretraining has the watcher
  s.device = "tpu";
  CHECK_THROWS_WITH(rp::check_device(s), Catch::Contains("unknown device 'tpu'"));
  // Refused before the build's CUDA check, so the CPU-only build checks it too: pretrain_cuda has
  // no watcher, and a library caller's settings never pass main.cpp's option checks.
  s.device = "cuda";
  CHECK_THROWS_WITH(rp::check_device(s), Catch::Contains("--pretrain-watch watches the CPU pretraining only (not --device cuda)"));
  s.pretrain_watch = 0;
  if constexpr (!rp::built_with_cuda) CHECK_THROWS_WITH(rp::check_device(s), Catch::Contains("not built with CUDA"));
}

TEST_CASE("rate rule check: a tolerance below 0 or from 1 up is refused before anything is written") {
  rp::settings s = sg::test::reduced_settings("rate-rule-check");
  std::filesystem::remove_all(s.out);
  rp::progress prog(true);
  for (double bad : {-0.1, 1.0, std::numeric_limits<double>::quiet_NaN()}) {
    s.lr_search_tolerance = bad;
    CHECK_THROWS_WITH(rp::check_rate_rule(s), Catch::Contains("settings::lr_search_tolerance) must be in [0, 1)"));
    CHECK_THROWS_WITH(rp::run_pipeline(s, prog), Catch::Contains("lr_search_tolerance"));
    CHECK_FALSE(std::filesystem::exists(s.out));  // no pretraining, no cache
  }
  s.lr_search_tolerance = 0;
  CHECK_NOTHROW(rp::check_rate_rule(s));
  s.lr_search_tolerance = 0.5;
  CHECK_NOTHROW(rp::check_rate_rule(s));
}

TEST_CASE("stage states: only the trained tensors are saved, read back exactly, another run's or a damaged file refused") {
  rp::settings s = sg::test::reduced_settings("states_file");
  rp::weights_t base(s.model), w(s.model), back(s.model);
  float x = 0.25f;
  sg::model::for_each_multimodal_parameter(base, [&](const std::string&, sg::cpu::tensor<float>& t) {
    for (std::size_t i = 0; i < t.size(); ++i) t.data()[i] = (x += 0.001f);
  });
  rp::copy_weights(base, w);
  std::string changed;
  sg::model::for_each_multimodal_parameter(w, [&](const std::string& name, sg::cpu::tensor<float>& t) {
    if (changed.empty() && name.find("mlp") != std::string::npos) changed = name, t.data()[t.size() - 1] += 1.0f;
  });
  REQUIRE_FALSE(changed.empty());
  const rp::stage_states st{rp::stage_states::mode::record, s.out / "run", "mlp lr 0.001 seed 1 base x", 0};
  rp::save_stage_state(w, base, st, 2, 10, {1.5, 0.1 + 0.2, 123, 45});
  const auto file = rp::stage_state_file(st, 2, 10);
  {
    const sg::io::safetensors_file f(file);
    REQUIRE(f.header().tensors.size() == 1);  // the one tensor that moved
    CHECK(f.header().tensors[0].name == changed);
  }
  rp::stage_states in = st;
  in.use = rp::stage_states::mode::resume;
  const auto r = rp::load_stage_state(back, base, in, 2, 10);
  CHECK(rp::content_checksum(back) == rp::content_checksum(w));
  CHECK(r.train_seconds == 1.5);
  CHECK(r.final_loss == 0.1 + 0.2);  // exact: the shortest text that reads back to the same double
  CHECK(r.peak_bytes == 123);
  CHECK(r.trainable == 45);
  // Another run's states, another stage's or step's: refused, naming the file and both runs.
  in.run = "mlp lr 0.002 seed 1 base x";
  CHECK_THROWS_WITH(rp::load_stage_state(back, base, in, 2, 10),
                    Catch::Contains(file.string()) && Catch::Contains("is of 'mlp lr 0.001 seed 1 base x stage 2 step 10'") &&
                        Catch::Contains("not of 'mlp lr 0.002"));
  in.run = st.run;
  CHECK_THROWS_WITH(rp::load_stage_state(back, base, in, 2, 0), Catch::Contains(rp::stage_state_file(st, 2).string()));
  // A value changed inside the file: the checksum names it damaged.
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-1, std::ios::end);
    f.put('\x7f');
  }
  CHECK_THROWS_WITH(rp::load_stage_state(back, base, in, 2, 10),
                    Catch::Contains("is damaged") && Catch::Contains(file.string()));
  std::filesystem::remove_all(s.out);
}

TEST_CASE("learning-rate search: the reported runs start where the search's runs ended, the same numbers as training again") {
  rp::settings s = sg::test::reduced_settings("resume");
  s.order = {"birds", "count", "tissue"};
  s.methods = {"sa_proj", "lwf", "lora"};  // lora's state is more than its weights: it trains every stage
  s.lr_grid = {1e-4, 3e-2};
  s.lr_search_stages = 2;
  s.lr_search_seeds = 2;
  s.seeds = 3;  // the third seed is not a search seed: it trains every stage
  s.jobs = 2;
  rp::progress quiet(true);
  const auto resumed = rp::run_pipeline(s, quiet);
  CHECK(resumed.resumed == std::vector<std::string>{"sa_proj", "lwf"});
  CHECK_FALSE(std::filesystem::exists(rp::stage_states_root(s)));  // removed once read
  CHECK_THAT(sg::test::read_text(s.out / "report.md"),
             Catch::Contains("The reported runs of sa_proj, lwf with seeds 1..2 took their first 2 stages from the "
                             "search's runs at the chosen rate and seed"));
  s.resume_searched_stages = false;
  s.jobs = 1;  // in this process, one run after another: the same numbers either way
  const auto again = rp::run_pipeline(s, quiet);
  CHECK(again.resumed.empty());
  CHECK(sg::test::read_text(s.out / "report.md").find("took their first") == std::string::npos);
  REQUIRE(again.rates.size() == resumed.rates.size());
  for (std::size_t m = 0; m < again.rates.size(); ++m) CHECK(again.rates[m].rate == resumed.rates[m].rate);
  REQUIRE(again.methods.size() == 9);
  REQUIRE(resumed.methods.size() == 9);
  for (std::size_t i = 0; i < again.methods.size(); ++i) {
    const auto &a = again.methods[i], &b = resumed.methods[i];
    INFO(a.name << " seed " << a.seed);
    CHECK(a.name == b.name);
    CHECK(a.seed == b.seed);
    CHECK(a.lr == b.lr);
    CHECK(a.R == b.R);  // exact
    CHECK(a.final_loss == b.final_loss);
    CHECK(a.trainable == b.trainable);
    CHECK(a.peak_bytes == b.peak_bytes);
    CHECK(b.train_seconds > 0);
    CHECK(a.resumed_stages == 0);
    CHECK(b.resumed_stages == (a.name != "lora" && a.seed < 3 ? 2u : 0u));
    REQUIRE(a.probes.size() == b.probes.size());
    for (std::size_t p = 0; p < a.probes.size(); ++p) {
      CHECK(a.probes[p].stage == b.probes[p].stage);
      CHECK(a.probes[p].step == b.probes[p].step);
      CHECK(a.probes[p].number_mass == b.probes[p].number_mass);
      CHECK(a.probes[p].with_number == b.probes[p].with_number);
      CHECK(a.probes[p].kl == b.probes[p].kl);
    }
  }
  std::filesystem::remove_all(s.out);
}
