#pragma once
// The accuracy matrix of a sequential fine-tuning run: R(i, j) is the accuracy on
// task j after stage i.
//
//   row 0        the model before any stage (the base model)
//   row k, k≥1   the model after stage k, which trained target task t_k
//
// Stages 1..T each train exactly one target task, in order. Every task that no
// stage trains is a held-out task (the paper's "general ability" benchmarks).
//
// Accuracies are fractions in [0, 1], not percentages: one unit everywhere keeps
// metric arithmetic free of factors of 100. The text tables show percentage points.
//
// Construction validates everything once -- shape, ragged rows, NaN, range, task
// names, each target trained at exactly one stage, T ≥ 1 -- and throws
// std::invalid_argument naming the row, column and task, so that the metric
// functions never see a malformed matrix. Rows and columns are 0-based as in R(i, j).
#include <xtensor/xtensor.hpp>

#include <cmath>
#include <cstddef>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace skillgraft::cl {

class accuracy_matrix {
 public:
  // tasks: one name per column. trained_at_stage[k-1]: the task stage k trains.
  // R: shape [T+1, tasks.size()] with T = trained_at_stage.size().
  accuracy_matrix(std::vector<std::string> tasks, std::vector<std::string> trained_at_stage, xt::xtensor<double, 2> R)
      : tasks_(std::move(tasks)), trained_at_stage_(std::move(trained_at_stage)) {
    check_roles();
    const std::size_t rows = R.shape()[0], cols = R.shape()[1];
    if (rows != stages() + 1) fail(row_count_message(rows));
    if (cols != tasks_.size())
      fail("the matrix has " + std::to_string(cols) + " columns, expected " + std::to_string(tasks_.size()) +
           " (one per task)");
    R_ = std::move(R);
    check_values();
  }

  // Row by row, for callers that assemble rows themselves; catches ragged rows.
  accuracy_matrix(std::vector<std::string> tasks, std::vector<std::string> trained_at_stage,
                  const std::vector<std::vector<double>>& rows)
      : tasks_(std::move(tasks)), trained_at_stage_(std::move(trained_at_stage)) {
    check_roles();
    if (rows.size() != stages() + 1) fail(row_count_message(rows.size()));
    R_ = xt::xtensor<double, 2>::from_shape({rows.size(), tasks_.size()});
    for (std::size_t i = 0; i < rows.size(); ++i) {
      if (rows[i].size() != tasks_.size())
        fail("row " + std::to_string(i) + " has " + std::to_string(rows[i].size()) + " values, expected " +
             std::to_string(tasks_.size()) + " (one per task)");
      for (std::size_t j = 0; j < tasks_.size(); ++j) R_(i, j) = rows[i][j];
    }
    check_values();
  }

  // Braced rows, {{...}, {...}}: picks the row-by-row form (xtensor also takes nested lists).
  accuracy_matrix(std::vector<std::string> tasks, std::vector<std::string> trained_at_stage,
                  std::initializer_list<std::initializer_list<double>> rows)
      : accuracy_matrix(std::move(tasks), std::move(trained_at_stage), to_rows(rows)) {}

  std::size_t stages() const { return trained_at_stage_.size(); }  // T
  std::size_t task_count() const { return tasks_.size(); }
  const std::vector<std::string>& tasks() const { return tasks_; }
  const std::vector<std::string>& trained_at_stage() const { return trained_at_stage_; }

  // R(i, j): accuracy on task j after stage i (i = 0: base model).
  double operator()(std::size_t i, std::size_t j) const { return R_(i, j); }
  const xt::xtensor<double, 2>& values() const { return R_; }

  // Column of t_k, the task trained at stage k, for k in 1..T.
  std::size_t target(std::size_t k) const {
    if (k < 1 || k > stages())
      throw std::out_of_range("skillgraft: accuracy_matrix: stage " + std::to_string(k) + " is not in 1.." +
                              std::to_string(stages()));
    return target_columns_[k - 1];
  }
  const std::vector<std::size_t>& target_columns() const { return target_columns_; }    // t_1..t_T
  const std::vector<std::size_t>& heldout_columns() const { return heldout_columns_; }  // in column order

  // Stage that trains column j, or nothing for a held-out task.
  std::optional<std::size_t> stage_of(std::size_t j) const {
    for (std::size_t k = 0; k < target_columns_.size(); ++k)
      if (target_columns_[k] == j) return k + 1;
    return std::nullopt;
  }
  // Column of a task by name; throws std::invalid_argument for an unknown name.
  std::size_t column(std::string_view name) const {
    if (auto j = find(name)) return *j;
    fail("no task named '" + std::string(name) + "'");
  }

 private:
  static std::vector<std::vector<double>> to_rows(std::initializer_list<std::initializer_list<double>> rows) {
    std::vector<std::vector<double>> v;
    for (const auto& r : rows) v.emplace_back(r);
    return v;
  }

  std::optional<std::size_t> find(std::string_view name) const {
    for (std::size_t j = 0; j < tasks_.size(); ++j)
      if (tasks_[j] == name) return j;
    return std::nullopt;
  }

  [[noreturn]] static void fail(const std::string& what) {
    throw std::invalid_argument("skillgraft: accuracy_matrix: " + what);
  }

  std::string row_count_message(std::size_t rows) const {
    return "expected T+1 = " + std::to_string(stages() + 1) + " rows (row 0 = base model, then one per stage), found " +
           std::to_string(rows);
  }

  // Names and roles, before any value is looked at.
  void check_roles() {
    if (stages() < 1) fail("at least one training stage is needed (T = 0: trained_at_stage is empty)");
    if (tasks_.empty()) fail("no tasks (no columns)");
    for (std::size_t j = 0; j < tasks_.size(); ++j) {
      if (tasks_[j].empty()) fail("the name of the task in column " + std::to_string(j) + " is empty");
      for (std::size_t l = 0; l < j; ++l)
        if (tasks_[l] == tasks_[j])
          fail("task '" + tasks_[j] + "' names both column " + std::to_string(l) + " and column " + std::to_string(j));
    }
    std::vector<std::size_t> stage_of_column(tasks_.size(), 0);  // 0 = not trained
    for (std::size_t k = 1; k <= stages(); ++k) {
      const std::string& name = trained_at_stage_[k - 1];
      const auto j = find(name);
      if (!j) fail("stage " + std::to_string(k) + " trains '" + name + "', which is not one of the tasks");
      if (stage_of_column[*j] != 0)
        fail("target '" + name + "' (column " + std::to_string(*j) + ") is trained at stage " +
             std::to_string(stage_of_column[*j]) + " and again at stage " + std::to_string(k) +
             "; each target is trained at exactly one stage");
      stage_of_column[*j] = k;
      target_columns_.push_back(*j);
    }
    for (std::size_t j = 0; j < tasks_.size(); ++j)
      if (stage_of_column[j] == 0) heldout_columns_.push_back(j);
  }

  void check_values() const {
    for (std::size_t i = 0; i < R_.shape()[0]; ++i)
      for (std::size_t j = 0; j < R_.shape()[1]; ++j) {
        const double r = R_(i, j);
        if (std::isnan(r)) fail(where(i, j) + " is NaN");
        if (!(r >= 0.0 && r <= 1.0)) {
          std::ostringstream s;
          s << where(i, j) << " = " << r << " is outside [0, 1]; accuracies are fractions (divide percentages by 100)";
          fail(s.str());
        }
      }
  }

  std::string where(std::size_t i, std::size_t j) const {
    return "R(" + std::to_string(i) + ", " + std::to_string(j) + ") (row " + std::to_string(i) +
           (i == 0 ? " = base model" : " = after stage " + std::to_string(i)) + ", column " + std::to_string(j) +
           " = task '" + tasks_[j] + "')";
  }

  std::vector<std::string> tasks_;
  std::vector<std::string> trained_at_stage_;
  std::vector<std::size_t> target_columns_;
  std::vector<std::size_t> heldout_columns_;
  xt::xtensor<double, 2> R_;
};

}  // namespace skillgraft::cl
