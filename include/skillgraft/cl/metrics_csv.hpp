#pragma once
// CSV for accuracy matrices and metric summaries, and atomic report files.
//
// Accuracy matrix: a header row, then one row per stage i = 0..T.
//
//   stage,trained,<task 0>,<task 1>,...
//   0,,0.2,0.6,...          row 0: the base model, trains nothing
//   1,path,0.75,0.5,...     row k: after stage k, which trained the task named
//
// The "trained" column makes the file self-contained: reading it back recovers which
// task each stage trained, and hence which tasks are held out. Numbers are fractions
// written in the shortest form that reads back to the same double (std::to_chars),
// so a write/read round trip is exact. Fields holding a comma, quote or line break are
// quoted as in RFC 4180.
//
// Summary: "metric,value" rows -- stages, targets, heldout, then each scalar metric under
// the name of its function, then heldout_forgetting_after_stage_<i> for i = 0..T.
// An undefined metric (see metrics.hpp) is written as NaN.
#include <charconv>
#include <cmath>
#include <cstddef>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "skillgraft/cl/accuracy_matrix.hpp"
#include "skillgraft/cl/metrics.hpp"
#include "skillgraft/io/atomic_file.hpp"

namespace skillgraft::cl {

namespace detail {

inline std::string csv_number(double x) {
  if (std::isnan(x)) return "NaN";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, x);
  return std::string(buf, r.ptr);
}

inline std::string csv_field(std::string_view s) {
  if (s.find_first_of(",\"\r\n") == std::string_view::npos) return std::string(s);
  std::string q = "\"";
  for (char c : s) {
    if (c == '"') q += '"';
    q += c;
  }
  return q + '"';
}

struct csv_record {
  std::size_t line;  // 1-based line on which the record starts
  std::vector<std::string> fields;
};

[[noreturn]] inline void csv_fail(std::size_t line, const std::string& what) {
  throw std::invalid_argument("skillgraft: accuracy CSV line " + std::to_string(line) + ": " + what);
}

// RFC 4180 records; accepts \n or \r\n line ends and skips empty lines.
inline std::vector<csv_record> parse_csv(std::string_view text) {
  std::vector<csv_record> records;
  csv_record rec{1, {}};
  std::string field;
  std::size_t line = 1;
  bool quoted = false, field_started = false;
  auto end_field = [&] {
    rec.fields.push_back(std::move(field));
    field.clear();
    field_started = false;
  };
  auto end_record = [&] {
    if (!(rec.fields.empty() && field.empty() && !field_started)) {
      end_field();
      records.push_back(std::move(rec));
    }
    rec = csv_record{line + 1, {}};
  };
  for (std::size_t p = 0; p < text.size(); ++p) {
    const char c = text[p];
    if (quoted) {
      if (c == '"') {
        if (p + 1 < text.size() && text[p + 1] == '"') {
          field += '"';
          ++p;
        } else {
          quoted = false;
        }
      } else {
        if (c == '\n') ++line;
        field += c;
      }
    } else if (c == '"') {
      if (!field.empty()) csv_fail(line, "a quote inside an unquoted field");
      quoted = field_started = true;
    } else if (c == ',') {
      end_field();
      field_started = true;  // a field follows the comma, even if empty
    } else if (c == '\n' || c == '\r') {
      if (c == '\r' && p + 1 < text.size() && text[p + 1] == '\n') ++p;
      end_record();
      ++line;
    } else {
      field += c;
    }
  }
  if (quoted) csv_fail(rec.line, "a quoted field is not closed");
  end_record();
  return records;
}

inline std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

}  // namespace detail

// --- accuracy matrix ------------------------------------------------------------------

inline std::string accuracy_csv(const accuracy_matrix& R) {
  std::string out = "stage,trained";
  for (const auto& t : R.tasks()) out += ',' + detail::csv_field(t);
  out += '\n';
  for (std::size_t i = 0; i <= R.stages(); ++i) {
    out += std::to_string(i) + ',';
    if (i > 0) out += detail::csv_field(R.trained_at_stage()[i - 1]);
    for (std::size_t j = 0; j < R.task_count(); ++j) out += ',' + detail::csv_number(R(i, j));
    out += '\n';
  }
  return out;
}

// Inverse of accuracy_csv. Throws std::invalid_argument naming the CSV line (1-based) and
// field for a malformed file, or -- through accuracy_matrix -- the row and column of a
// bad value.
inline accuracy_matrix parse_accuracy_csv(std::string_view text) {
  using detail::csv_fail;
  const auto records = detail::parse_csv(text);
  if (records.empty()) csv_fail(1, "empty file; expected a header 'stage,trained,<task>,...'");
  const auto& header = records[0].fields;
  if (header.size() < 3 || detail::trim(header[0]) != "stage" || detail::trim(header[1]) != "trained")
    csv_fail(records[0].line, "the header must be 'stage,trained,<task>,...'");
  std::vector<std::string> tasks(header.begin() + 2, header.end());
  std::vector<std::string> trained;
  std::vector<std::vector<double>> rows;
  for (std::size_t r = 1; r < records.size(); ++r) {
    const auto& [line, f] = records[r];
    const std::size_t i = r - 1;  // stage of this row
    if (f.size() != header.size())
      csv_fail(line, "has " + std::to_string(f.size()) + " fields, expected " + std::to_string(header.size()) +
                         " (stage, trained, one per task)");
    if (detail::trim(f[0]) != std::to_string(i))
      csv_fail(line, "stage is '" + f[0] + "', expected " + std::to_string(i) + " (rows go 0, 1, ..., T in order)");
    const std::string_view name = detail::trim(f[1]);
    if (i == 0 && !name.empty()) csv_fail(line, "row 0 is the base model and trains nothing, found '" + f[1] + "'");
    if (i > 0 && name.empty()) csv_fail(line, "stage " + std::to_string(i) + " does not name the task it trained");
    if (i > 0) trained.emplace_back(name);
    std::vector<double> row(tasks.size());
    for (std::size_t j = 0; j < tasks.size(); ++j) {
      const std::string_view s = detail::trim(f[j + 2]);
      const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), row[j]);
      if (s.empty() || ec != std::errc() || end != s.data() + s.size())
        csv_fail(line, "field " + std::to_string(j + 3) + " (task '" + tasks[j] + "'): '" + f[j + 2] +
                           "' is not a number");
    }
    rows.push_back(std::move(row));
  }
  return accuracy_matrix(std::move(tasks), std::move(trained), rows);
}

// --- summary --------------------------------------------------------------------------

inline std::string summary_csv(const metric_summary& s) {
  std::string out = "metric,value\n";
  out += "stages," + std::to_string(s.stages) + '\n';
  out += "targets," + std::to_string(s.targets) + '\n';
  out += "heldout," + std::to_string(s.heldout) + '\n';
  for (const auto& f : summary_fields) out += std::string(f.name) + ',' + detail::csv_number(s.*f.value) + '\n';
  for (std::size_t i = 0; i < s.heldout_forgetting_curve.size(); ++i)
    out += "heldout_forgetting_after_stage_" + std::to_string(i) + ',' +
           detail::csv_number(s.heldout_forgetting_curve(i)) + '\n';
  return out;
}

// --- files ----------------------------------------------------------------------------

// Writes `text` to a temporary next to `path` and renames it over `path`: an interrupted
// write leaves the previous report intact. Throws std::system_error naming the file.
inline void write_report_file(const std::filesystem::path& path, std::string_view text) {
  io::atomic_file f(path);
  f.write(text.data(), text.size());
  f.commit();
}

inline void write_accuracy_csv(const std::filesystem::path& path, const accuracy_matrix& R) {
  write_report_file(path, accuracy_csv(R));
}

inline void write_summary_csv(const std::filesystem::path& path, const metric_summary& s) {
  write_report_file(path, summary_csv(s));
}

inline accuracy_matrix read_accuracy_csv(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::invalid_argument("skillgraft: cannot open accuracy CSV " + path.string());
  std::ostringstream text;
  text << in.rdbuf();
  try {
    return parse_accuracy_csv(text.str());
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string(e.what()) + " (in " + path.string() + ")");
  }
}

}  // namespace skillgraft::cl
