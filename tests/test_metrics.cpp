// Learning/forgetting metrics against matrices worked out by hand (the arithmetic is in
// the comments), the variants that disagree on the same matrix, the one-stage edge case,
// CSV text and round trips, text tables, atomic files and the bad-input messages.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <string>
#include <unistd.h>

#include "skillgraft/cl/accuracy_matrix.hpp"
#include "skillgraft/cl/metrics.hpp"
#include "skillgraft/cl/metrics_csv.hpp"
#include "skillgraft/cl/metrics_table.hpp"

namespace cl = skillgraft::cl;
using Catch::Contains;

namespace {

constexpr double eps = 1e-12;
const double not_a_number = std::numeric_limits<double>::quiet_NaN();

// Three stages train path (stage 1), cub (stage 2), count (stage 3); seed and mmstar are
// held out. Columns are deliberately not in stage order, so that a metric mixing up
// "column j" with "stage k" gets a different number.
//
//              cub   seed  count  path  mmstar
//   0 base     0.20  0.60  0.30   0.40  0.50
//   1 path     0.75  0.50  0.30   0.80  0.45     t_1 = path  (column 3)
//   2 cub      0.70  0.55  0.20   0.85  0.30     t_2 = cub   (column 0)
//   3 count    0.60  0.58  0.90   0.75  0.50     t_3 = count (column 2)
//
// path rises after its own stage (0.80 -> 0.85), so "max" and "first" forgetting differ;
// cub is higher before its own stage (0.75 at stage 1) than at it (0.70), so a max that
// wrongly looked at stages before k would differ too.
cl::accuracy_matrix three_stages() {
  return cl::accuracy_matrix({"cub", "seed", "count", "path", "mmstar"}, {"path", "cub", "count"},
                             {{0.20, 0.60, 0.30, 0.40, 0.50},
                              {0.75, 0.50, 0.30, 0.80, 0.45},
                              {0.70, 0.55, 0.20, 0.85, 0.30},
                              {0.60, 0.58, 0.90, 0.75, 0.50}});
}

// One stage trains count; seed is held out.
//            count  seed
//   0 base   0.30   0.60
//   1 count  0.90   0.50
cl::accuracy_matrix one_stage() {
  return cl::accuracy_matrix({"count", "seed"}, {"count"}, {{0.30, 0.60}, {0.90, 0.50}});
}

// Binary fractions: every metric below is exact in double, so CSV text is predictable.
//          a     h
//   0    0.25  0.5
//   1 a  0.75  0.25
cl::accuracy_matrix dyadic_one_stage() {
  return cl::accuracy_matrix({"a", "h"}, {"a"}, {{0.25, 0.5}, {0.75, 0.25}});
}

std::string read_all(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// A fresh directory per test under the system temporary directory.
std::filesystem::path scratch_dir(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() / ("skillgraft_test_metrics_" + std::to_string(::getpid()) + "_" + name);
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

}  // namespace

TEST_CASE("accuracy_matrix: roles come from the stage list") {
  const auto R = three_stages();
  CHECK(R.stages() == 3);
  CHECK(R.task_count() == 5);
  CHECK(R.target(1) == 3);  // path
  CHECK(R.target(2) == 0);  // cub
  CHECK(R.target(3) == 2);  // count
  CHECK(R.target_columns() == std::vector<std::size_t>{3, 0, 2});
  CHECK(R.heldout_columns() == std::vector<std::size_t>{1, 4});
  CHECK(R.stage_of(0) == 2);
  CHECK(!R.stage_of(1).has_value());
  CHECK(R.column("mmstar") == 4);
  CHECK(R(2, 3) == 0.85);
  CHECK_THROWS_AS(R.target(0), std::out_of_range);
  CHECK_THROWS_AS(R.target(4), std::out_of_range);
  CHECK_THROWS_WITH(R.column("ocr"), Contains("no task named 'ocr'"));
}

TEST_CASE("Paper metrics: learning at two read-out times, held-out forgetting and its curve") {
  const auto R = three_stages();
  // learning_after_own_stage: path R(1,path)-R(0,path) = 0.80-0.40 = 0.40
  //                           cub  R(2,cub) -R(0,cub)  = 0.70-0.20 = 0.50
  //                           count R(3,count)-R(0,count) = 0.90-0.30 = 0.60   mean = 1.50/3 = 0.50
  CHECK(cl::learning_after_own_stage(R) == Approx(0.50).margin(eps));
  // learning_final: path 0.75-0.40 = 0.35, cub 0.60-0.20 = 0.40, count 0.90-0.30 = 0.60
  //                 mean = 1.35/3 = 0.45
  CHECK(cl::learning_final(R) == Approx(0.45).margin(eps));
  // held-out drop R(0,h)-R(i,h):      seed          mmstar        mean
  //   stage 0                         0             0             0
  //   stage 1                         0.60-0.50=.10 0.50-0.45=.05 0.075
  //   stage 2                         0.60-0.55=.05 0.50-0.30=.20 0.125
  //   stage 3                         0.60-0.58=.02 0.50-0.50=0   0.010  (partial recovery)
  const auto drop = cl::heldout_drop(R);
  REQUIRE(drop.shape()[0] == 4);
  REQUIRE(drop.shape()[1] == 2);
  CHECK(drop(0, 0) == 0.0);
  CHECK(drop(2, 1) == Approx(0.20).margin(eps));
  CHECK(drop(3, 0) == Approx(0.02).margin(eps));
  const auto curve = cl::heldout_forgetting_curve(R);
  REQUIRE(curve.size() == 4);
  CHECK(curve(0) == 0.0);
  CHECK(curve(1) == Approx(0.075).margin(eps));
  CHECK(curve(2) == Approx(0.125).margin(eps));
  CHECK(curve(3) == Approx(0.010).margin(eps));
  CHECK(cl::heldout_forgetting(R) == Approx(0.010).margin(eps));
}

TEST_CASE("GEM metrics: ACC, BWT over T-1 and over T, FWT against the base model") {
  const auto R = three_stages();
  // ACC = mean of the last row over targets: (path 0.75 + cub 0.60 + count 0.90)/3 = 0.75
  CHECK(cl::average_accuracy(R) == Approx(0.75).margin(eps));
  // BWT terms R(T,t_k)-R(k,t_k): path 0.75-0.80 = -0.05, cub 0.60-0.70 = -0.10, count 0
  //   bwt_gem        = (-0.05-0.10)/(T-1=2) = -0.075
  //   bwt_mean_over_T = (-0.05-0.10+0)/3   = -0.05
  CHECK(cl::bwt_gem(R) == Approx(-0.075).margin(eps));
  CHECK(cl::bwt_mean_over_T(R) == Approx(-0.05).margin(eps));
  // FWT terms R(k-1,t_k)-R(0,t_k): cub (k=2) 0.75-0.20 = 0.55, count (k=3) 0.20-0.30 = -0.10
  //   fwt_gem = 0.45/2 = 0.225
  CHECK(cl::fwt_gem(R) == Approx(0.225).margin(eps));
}

TEST_CASE("Target forgetting: max-minus-last and first-minus-last differ on the same matrix") {
  const auto R = three_stages();
  // max over l in [k, T-1] minus last:
  //   path (k=1): max(R(1,path)=0.80, R(2,path)=0.85) - R(3,path) = 0.85-0.75 = 0.10
  //   cub  (k=2): max(R(2,cub)=0.70)                   - R(3,cub)  = 0.70-0.60 = 0.10
  //   (counting stage 1 for cub, 0.75, would give 0.15; counting row 0 changes nothing here)
  //   mean over T-1 = 2: 0.10
  CHECK(cl::forgetting_max_minus_last(R) == Approx(0.10).margin(eps));
  // first after training minus last: path 0.80-0.75 = 0.05, cub 0.70-0.60 = 0.10 -> 0.075
  CHECK(cl::forgetting_first_minus_last(R) == Approx(0.075).margin(eps));
  CHECK(cl::forgetting_first_minus_last(R) == Approx(-cl::bwt_gem(R)).margin(eps));
}

TEST_CASE("Target forgetting is negative when a later stage helps an earlier target") {
  //            a     b
  //   0 base   0.25  0.25
  //   1 a      0.5   0.25
  //   2 b      0.75  0.75
  const cl::accuracy_matrix R({"a", "b"}, {"a", "b"}, {{0.25, 0.25}, {0.5, 0.25}, {0.75, 0.75}});
  // a: max over l in [1, T-1 = 1] of R(l,a) = 0.5, minus R(2,a) = 0.75 -> -0.25 (the last row
  // is not part of the max, else this would be 0); over T-1 = 1.
  CHECK(cl::forgetting_max_minus_last(R) == -0.25);
  CHECK(cl::forgetting_first_minus_last(R) == -0.25);
  CHECK(cl::bwt_gem(R) == 0.25);          // R(2,a)-R(1,a) = 0.25, over 1
  CHECK(cl::bwt_mean_over_T(R) == 0.125); // (0.25 + 0)/2
  CHECK(cl::fwt_gem(R) == 0.0);           // R(1,b)-R(0,b) = 0.25-0.25
}

TEST_CASE("One stage: T-1 = 0 means are NaN, means over T and over held-out tasks are defined") {
  const auto R = one_stage();
  // learning: 0.90-0.30 = 0.60 both ways (the own stage is the last stage)
  CHECK(cl::learning_after_own_stage(R) == Approx(0.60).margin(eps));
  CHECK(cl::learning_final(R) == Approx(0.60).margin(eps));
  // held-out: seed 0.60-0.50 = 0.10; curve [0, 0.10]
  CHECK(cl::heldout_forgetting(R) == Approx(0.10).margin(eps));
  const auto curve = cl::heldout_forgetting_curve(R);
  REQUIRE(curve.size() == 2);
  CHECK(curve(0) == 0.0);
  // ACC = R(1,count) = 0.90
  CHECK(cl::average_accuracy(R) == Approx(0.90).margin(eps));
  // No earlier targets: the T-1 denominators are 0.
  CHECK(std::isnan(cl::bwt_gem(R)));
  CHECK(std::isnan(cl::fwt_gem(R)));
  CHECK(std::isnan(cl::forgetting_max_minus_last(R)));
  CHECK(std::isnan(cl::forgetting_first_minus_last(R)));
  // Over T: the single term R(1,count)-R(1,count) = 0, divided by 1.
  CHECK(cl::bwt_mean_over_T(R) == 0.0);
}

TEST_CASE("No held-out tasks: held-out forgetting is NaN, target metrics unaffected") {
  const cl::accuracy_matrix R({"a", "b"}, {"b", "a"}, {{0.5, 0.5}, {0.5, 1.0}, {1.0, 0.75}});
  CHECK(R.heldout_columns().empty());
  CHECK(std::isnan(cl::heldout_forgetting(R)));
  CHECK(std::isnan(cl::heldout_forgetting_curve(R)(0)));
  // learning_after_own_stage: b R(1,b)-R(0,b) = 0.5, a R(2,a)-R(0,a) = 0.5 -> 0.5
  CHECK(cl::learning_after_own_stage(R) == 0.5);
  // bwt_gem: b R(2,b)-R(1,b) = 0.75-1.0 = -0.25, over T-1 = 1
  CHECK(cl::bwt_gem(R) == -0.25);
}

TEST_CASE("summarize gathers every metric under the function's name") {
  const auto R = three_stages();
  const auto s = cl::summarize(R);
  CHECK(s.stages == 3);
  CHECK(s.targets == 3);
  CHECK(s.heldout == 2);
  CHECK(s.learning_after_own_stage == cl::learning_after_own_stage(R));
  CHECK(s.learning_final == cl::learning_final(R));
  CHECK(s.heldout_forgetting == cl::heldout_forgetting(R));
  CHECK(s.average_accuracy == cl::average_accuracy(R));
  CHECK(s.bwt_gem == cl::bwt_gem(R));
  CHECK(s.bwt_mean_over_T == cl::bwt_mean_over_T(R));
  CHECK(s.fwt_gem == cl::fwt_gem(R));
  CHECK(s.forgetting_max_minus_last == cl::forgetting_max_minus_last(R));
  CHECK(s.forgetting_first_minus_last == cl::forgetting_first_minus_last(R));
  CHECK(s.heldout_forgetting_curve == cl::heldout_forgetting_curve(R));
}

TEST_CASE("Accuracy CSV: exact text and an exact round trip") {
  const auto R = three_stages();
  const std::string expected =
      "stage,trained,cub,seed,count,path,mmstar\n"
      "0,,0.2,0.6,0.3,0.4,0.5\n"
      "1,path,0.75,0.5,0.3,0.8,0.45\n"
      "2,cub,0.7,0.55,0.2,0.85,0.3\n"
      "3,count,0.6,0.58,0.9,0.75,0.5\n";
  CHECK(cl::accuracy_csv(R) == expected);

  const auto back = cl::parse_accuracy_csv(expected);
  CHECK(back.tasks() == R.tasks());
  CHECK(back.trained_at_stage() == R.trained_at_stage());
  CHECK(back.values() == R.values());

  // Values with no short decimal form and names that need quoting survive bit for bit.
  const cl::accuracy_matrix odd({"a,b", "say \"hi\""}, {"say \"hi\""},
                                {{1.0 / 3.0, 0.1 + 0.2}, {std::nextafter(1.0, 0.0), 5e-324}});
  const std::string text = cl::accuracy_csv(odd);
  CHECK(text.substr(0, text.find('\n')) == "stage,trained,\"a,b\",\"say \"\"hi\"\"\"");
  const auto odd_back = cl::parse_accuracy_csv(text);
  CHECK(odd_back.tasks() == odd.tasks());
  CHECK(odd_back.trained_at_stage() == odd.trained_at_stage());
  CHECK(odd_back.values() == odd.values());

  // Windows line ends, spaces around fields and no final newline are accepted.
  const auto crlf = cl::parse_accuracy_csv("stage,trained,a,h\r\n0,,0.25, 0.5\r\n1,a,0.75,0.25");
  CHECK(crlf.values() == dyadic_one_stage().values());
}

TEST_CASE("Summary CSV: exact text, NaN for undefined metrics") {
  const auto s = cl::summarize(dyadic_one_stage());
  // learning 0.75-0.25 = 0.5; held-out 0.5-0.25 = 0.25; ACC 0.75; T-1 means NaN; over T: 0
  CHECK(cl::summary_csv(s) ==
        "metric,value\n"
        "stages,1\n"
        "targets,1\n"
        "heldout,1\n"
        "learning_after_own_stage,0.5\n"
        "learning_final,0.5\n"
        "heldout_forgetting,0.25\n"
        "average_accuracy,0.75\n"
        "bwt_gem,NaN\n"
        "bwt_mean_over_T,0\n"
        "fwt_gem,NaN\n"
        "forgetting_max_minus_last,NaN\n"
        "forgetting_first_minus_last,NaN\n"
        "heldout_forgetting_after_stage_0,0\n"
        "heldout_forgetting_after_stage_1,0.25\n");
}

TEST_CASE("Text tables: fixed width, percent, own-stage marks") {
  CHECK(cl::accuracy_table(dyadic_one_stage()) ==
        "stage  trained        a          h\n"
        "                stage 1   held-out\n"
        "    0  (base)      25.0       50.0\n"
        "    1  a           75.0*      25.0\n"
        "accuracy in %; * = right after the stage that trained the task\n");

  const auto table = cl::summary_table(cl::summarize(three_stages()));
  CHECK_THAT(table, Contains("learning_after_own_stage"));
  CHECK_THAT(table, Contains("+50.0"));  // learning_after_own_stage
  CHECK_THAT(table, Contains("+45.0"));  // learning_final
  CHECK_THAT(table, Contains("   75.0"));  // ACC, an accuracy: no sign
  CHECK_THAT(table, Contains("-7.5"));   // bwt_gem
  CHECK_THAT(table, Contains("+12.5"));  // held-out forgetting after stage 2
  // Every line of the 3-stage matrix table ends in the same column: the last task is
  // held out, so no '*' sticks out, and every value is right-aligned under its name.
  std::istringstream lines(cl::accuracy_table(three_stages()));
  std::vector<std::string> l;
  for (std::string line; std::getline(lines, line);) l.push_back(line);
  REQUIRE(l.size() == 2 + 4 + 1);  // header, roles, rows 0..3, legend
  CHECK(l[0].substr(l[0].size() - 6) == "mmstar");
  for (std::size_t i = 1; i <= 5; ++i) CHECK(l[i].size() == l[0].size());
  CHECK(l[1].find("stage 2") != std::string::npos);  // cub's role
  CHECK(l[5].find("90.0*") != std::string::npos);    // R(3, count), right after its stage
}

TEST_CASE("Report files are replaced atomically and read back") {
  const auto dir = scratch_dir("files");
  const auto file = dir / "accuracy.csv";
  cl::write_accuracy_csv(file, three_stages());
  CHECK(read_all(file) == cl::accuracy_csv(three_stages()));
  const auto back = cl::read_accuracy_csv(file);
  CHECK(back.values() == three_stages().values());

  // Overwriting leaves exactly one file: no temporary is left behind.
  cl::write_accuracy_csv(file, one_stage());
  CHECK(read_all(file) == cl::accuracy_csv(one_stage()));
  CHECK(std::distance(std::filesystem::directory_iterator(dir), std::filesystem::directory_iterator()) == 1);

  cl::write_summary_csv(dir / "summary.csv", cl::summarize(one_stage()));
  CHECK(read_all(dir / "summary.csv") == cl::summary_csv(cl::summarize(one_stage())));

  // A directory that does not exist: an error naming the file, nothing written.
  CHECK_THROWS_AS(cl::write_accuracy_csv(dir / "missing" / "a.csv", one_stage()), std::system_error);
  CHECK_THROWS_WITH(cl::read_accuracy_csv(dir / "nope.csv"), Contains("nope.csv"));

  // A parse error names the file too.
  std::ofstream(dir / "bad.csv") << "stage,trained,a\n0,,zero\n";
  CHECK_THROWS_WITH(cl::read_accuracy_csv(dir / "bad.csv"), Contains("line 2") && Contains("bad.csv"));
  std::filesystem::remove_all(dir);
}

TEST_CASE("Bad matrices: the message names the problem, the row and the column") {
  using M = cl::accuracy_matrix;
  const std::vector<std::string> tasks = {"cub", "seed"};
  const std::vector<std::vector<double>> ok = {{0.1, 0.2}, {0.3, 0.4}};

  CHECK_NOTHROW(M(tasks, {"cub"}, ok));
  // T < 1
  CHECK_THROWS_WITH(M(tasks, {}, {{0.1, 0.2}}), Contains("at least one training stage"));
  // Ragged row
  CHECK_THROWS_WITH(M(tasks, {"cub"}, {{0.1, 0.2}, {0.3}}),
                    Contains("row 1 has 1 values, expected 2"));
  // Wrong number of rows
  CHECK_THROWS_WITH(M(tasks, {"cub"}, {{0.1, 0.2}}), Contains("expected T+1 = 2 rows") && Contains("found 1"));
  // NaN
  CHECK_THROWS_WITH(M(tasks, {"cub"}, {{0.1, 0.2}, {0.3, not_a_number}}),
                    Contains("R(1, 1)") && Contains("task 'seed'") && Contains("is NaN"));
  // Out of range: a percentage, a negative number, infinity
  CHECK_THROWS_WITH(M(tasks, {"cub"}, {{54.3, 0.2}, {0.3, 0.4}}),
                    Contains("R(0, 0)") && Contains("base model") && Contains("task 'cub'") &&
                        Contains("54.3 is outside [0, 1]") && Contains("divide percentages by 100"));
  CHECK_THROWS_WITH(M(tasks, {"cub"}, {{0.1, 0.2}, {-0.01, 0.4}}), Contains("R(1, 0)") && Contains("outside [0, 1]"));
  CHECK_THROWS_WITH(M(tasks, {"cub"}, {{0.1, std::numeric_limits<double>::infinity()}, {0.3, 0.4}}),
                    Contains("R(0, 1)") && Contains("outside [0, 1]"));
  // A target trained at two stages
  CHECK_THROWS_WITH(M(tasks, {"cub", "cub"}, {{0.1, 0.2}, {0.3, 0.4}, {0.5, 0.6}}),
                    Contains("target 'cub' (column 0) is trained at stage 1 and again at stage 2"));
  // A stage that trains an unknown task
  CHECK_THROWS_WITH(M(tasks, {"ocr"}, ok), Contains("stage 1 trains 'ocr', which is not one of the tasks"));
  // Task names: duplicated, empty, none
  CHECK_THROWS_WITH(M({"cub", "cub"}, {"cub"}, ok), Contains("task 'cub' names both column 0 and column 1"));
  CHECK_THROWS_WITH(M({"cub", ""}, {"cub"}, ok), Contains("column 1 is empty"));
  CHECK_THROWS_WITH(M({}, {"cub"}, {{}, {}}), Contains("no tasks"));
  // The xtensor constructor checks the shape it is given.
  xt::xtensor<double, 2> three_cols = xt::xtensor<double, 2>::from_shape({2, 3});
  three_cols.fill(0.5);
  CHECK_THROWS_WITH(M(tasks, {"cub"}, three_cols), Contains("3 columns, expected 2"));
  xt::xtensor<double, 2> three_rows = xt::xtensor<double, 2>::from_shape({3, 2});
  three_rows.fill(0.5);
  CHECK_THROWS_WITH(M(tasks, {"cub"}, three_rows), Contains("expected T+1 = 2 rows") && Contains("found 3"));
  xt::xtensor<double, 2> good = xt::xtensor<double, 2>::from_shape({2, 2});
  good.fill(0.5);
  good(1, 0) = 1.5;
  CHECK_THROWS_WITH(M(tasks, {"cub"}, good), Contains("R(1, 0)") && Contains("after stage 1"));
}

TEST_CASE("Bad CSV: the message names the line and field") {
  auto parse = [](const char* text) { return cl::parse_accuracy_csv(text); };
  CHECK_THROWS_WITH(parse(""), Contains("empty file"));
  CHECK_THROWS_WITH(parse("task,a,b\n0,0.1,0.2\n"), Contains("line 1") && Contains("header"));
  CHECK_THROWS_WITH(parse("stage,trained,a,b\n0,,0.1\n"), Contains("line 2") && Contains("has 3 fields, expected 4"));
  CHECK_THROWS_WITH(parse("stage,trained,a,b\n0,,0.1,0.2\n2,a,0.3,0.4\n"),
                    Contains("line 3") && Contains("stage is '2', expected 1"));
  CHECK_THROWS_WITH(parse("stage,trained,a,b\n0,a,0.1,0.2\n"), Contains("line 2") && Contains("base model"));
  CHECK_THROWS_WITH(parse("stage,trained,a,b\n0,,0.1,0.2\n1,,0.3,0.4\n"),
                    Contains("line 3") && Contains("does not name the task"));
  CHECK_THROWS_WITH(parse("stage,trained,a,b\n0,,0.1,0.2\n1,a,0.3,x4\n"),
                    Contains("line 3") && Contains("field 4 (task 'b')") && Contains("'x4' is not a number"));
  CHECK_THROWS_WITH(parse("stage,trained,a,b\n0,,0.1,0.2\n1,a,0.3,0.4oops\n"), Contains("not a number"));
  CHECK_THROWS_WITH(parse("stage,trained,a,b\n0,,0.1,\n"), Contains("field 4") && Contains("not a number"));
  CHECK_THROWS_WITH(parse("stage,trained,\"a,b\n0,,0.1\n"), Contains("not closed"));
  // Header only: no stages, so the matrix itself refuses.
  CHECK_THROWS_WITH(parse("stage,trained,a\n"), Contains("at least one training stage"));
  // Values are checked by the matrix, which names R(i, j).
  CHECK_THROWS_WITH(parse("stage,trained,a,b\n0,,0.1,0.2\n1,a,0.3,45\n"),
                    Contains("R(1, 1)") && Contains("outside [0, 1]"));
  CHECK_THROWS_WITH(parse("stage,trained,a,b\n0,,0.1,0.2\n1,a,nan,0.4\n"), Contains("R(1, 0)") && Contains("NaN"));
}
