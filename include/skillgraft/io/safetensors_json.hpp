#pragma once
// The JSON a safetensors header is written in: a strict reader and a writer.
//
// Hand-written rather than a general JSON library because the header is a hostile
// input with a narrow schema: the reader must report the byte where a problem is,
// notice duplicate keys (a general parser silently keeps one of them), bound its
// nesting depth, and reject invalid UTF-8 -- and none of that may depend on an
// extra dependency being installed. The grammar is full RFC 8259 JSON; only the
// values the schema needs are decoded, anything else is validated and skipped.
// The writer reproduces serde_json's compact output, which is what Hugging Face's
// safetensors writes, so that our files match theirs byte for byte.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace skillgraft::io::detail {

// Thrown by the reader; `position` is the byte offset in the JSON text. The
// safetensors parser turns it into a safetensors_error with the file offset.
struct json_syntax_error {
  std::size_t position;
  std::string message;
};

// Length of the well-formed UTF-8 sequence starting at text[pos], or 0 when it is
// not one (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF).
inline std::size_t utf8_sequence_length(std::string_view text, std::size_t pos) {
  auto byte = [&](std::size_t i) -> unsigned {
    return pos + i < text.size() ? static_cast<unsigned char>(text[pos + i]) : 0u;
  };
  const unsigned b0 = byte(0);
  if (b0 < 0x80) return 1;
  std::size_t n = 0;
  unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) n = 2;
  else if (b0 == 0xE0) n = 3, lo = 0xA0;
  else if (b0 >= 0xE1 && b0 <= 0xEC) n = 3;
  else if (b0 == 0xED) n = 3, hi = 0x9F;
  else if (b0 >= 0xEE && b0 <= 0xEF) n = 3;
  else if (b0 == 0xF0) n = 4, lo = 0x90;
  else if (b0 >= 0xF1 && b0 <= 0xF3) n = 4;
  else if (b0 == 0xF4) n = 4, hi = 0x8F;
  else return 0;
  if (byte(1) < lo || byte(1) > hi) return 0;
  for (std::size_t i = 2; i < n; ++i)
    if (byte(i) < 0x80 || byte(i) > 0xBF) return 0;
  return n;
}

// True when s is well-formed UTF-8 (what a JSON string must hold).
inline bool is_valid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_sequence_length(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

class json_reader {
 public:
  // Nesting deeper than this is rejected rather than recursed into (serde_json's limit).
  static constexpr int max_depth = 128;

  explicit json_reader(std::string_view text) : text_(text) {}

  std::size_t position() const { return pos_; }
  void skip_whitespace() {
    while (pos_ < text_.size() && is_whitespace(text_[pos_])) ++pos_;
  }
  bool at_end() {
    skip_whitespace();
    return pos_ == text_.size();
  }
  // The next significant character, or '\0' at the end of the text.
  char peek() {
    skip_whitespace();
    return pos_ < text_.size() ? text_[pos_] : '\0';
  }
  // What the next value is, in words, for messages such as "expected an object, found an array".
  std::string_view peek_kind() {
    switch (peek()) {
      case '{': return "an object";
      case '[': return "an array";
      case '"': return "a string";
      case 't':
      case 'f': return "a boolean";
      case 'n': return "null";
      case '\0': return pos_ >= text_.size() ? "the end of the header" : "an invalid character";
      default: return (peek() == '-' || (peek() >= '0' && peek() <= '9')) ? "a number" : "an invalid character";
    }
  }
  [[noreturn]] void fail(std::string message) const { throw json_syntax_error{pos_, std::move(message)}; }
  [[noreturn]] void fail_at(std::size_t position, std::string message) const {
    throw json_syntax_error{position, std::move(message)};
  }

  // Calls on_member(key, key_position) with the reader placed on each member's value;
  // on_member must consume that value.
  template <class F>
  void read_object(F&& on_member, int depth = 0) {
    enter(depth);
    expect('{');
    if (peek() == '}') {
      ++pos_;
      return;
    }
    for (;;) {
      if (peek() != '"') fail("expected a string key in the object");
      const std::size_t key_position = pos_;
      std::string key = read_string();
      expect(':');
      on_member(key, key_position);
      const char c = peek();
      ++pos_;
      if (c == '}') return;
      if (c != ',') fail_at(pos_ - 1, "expected ',' or '}' after an object member");
    }
  }
  // Calls on_element(index) with the reader placed on each element; it must consume it.
  template <class F>
  void read_array(F&& on_element, int depth = 0) {
    enter(depth);
    expect('[');
    if (peek() == ']') {
      ++pos_;
      return;
    }
    for (std::size_t i = 0;; ++i) {
      on_element(i);
      const char c = peek();
      ++pos_;
      if (c == ']') return;
      if (c != ',') fail_at(pos_ - 1, "expected ',' or ']' after an array element");
    }
  }

  // A string, escapes decoded, as UTF-8. Rejects raw control characters, invalid
  // UTF-8 and unpaired surrogate escapes.
  std::string read_string() {
    expect('"');
    std::string out;
    for (;;) {
      if (pos_ >= text_.size()) fail("unterminated string");
      const auto c = static_cast<unsigned char>(text_[pos_]);
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail("control character in a string (must be escaped)");
      if (c == '\\') {
        read_escape(out);
      } else if (c < 0x80) {
        out += static_cast<char>(c);
        ++pos_;
      } else {
        const std::size_t n = utf8_sequence_length(text_, pos_);
        if (n == 0) fail("invalid UTF-8 in a string");
        out.append(text_.substr(pos_, n));
        pos_ += n;
      }
    }
  }

  // A JSON integer literal with no sign, fraction or exponent, as an unsigned value
  // (shapes and offsets). `what` names the value in the message.
  std::uint64_t read_unsigned(std::string_view what) {
    const char c = peek();
    const std::size_t start = pos_;
    if (c == '-' || !(c >= '0' && c <= '9'))
      fail(std::string(what) + " must be a non-negative integer, found " + std::string(peek_kind()));
    std::uint64_t v = 0;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      const auto digit = static_cast<std::uint64_t>(text_[pos_] - '0');
      if (v > (UINT64_MAX - digit) / 10) fail_at(start, std::string(what) + " does not fit in 64 bits");
      v = v * 10 + digit;
      ++pos_;
    }
    if (text_[start] == '0' && pos_ - start > 1) fail_at(start, "number with a leading zero");
    if (pos_ < text_.size() && (text_[pos_] == '.' || text_[pos_] == 'e' || text_[pos_] == 'E'))
      fail_at(start, std::string(what) + " must be a non-negative integer, found a fraction or exponent");
    return v;
  }

  bool read_null_if_present() {
    if (peek() != 'n') return false;
    expect_literal("null");
    return true;
  }

  // Validates and steps over any value (members of an entry we do not use).
  void skip_value(int depth = 0) {
    switch (peek()) {
      case '{': read_object([&](const std::string&, std::size_t) { skip_value(depth + 1); }, depth); return;
      case '[': read_array([&](std::size_t) { skip_value(depth + 1); }, depth); return;
      case '"': read_string(); return;
      case 't': expect_literal("true"); return;
      case 'f': expect_literal("false"); return;
      case 'n': expect_literal("null"); return;
      case '\0': fail("expected a value, found " + std::string(peek_kind()));
      default: skip_number(); return;
    }
  }

 private:
  static bool is_whitespace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

  void enter(int depth) const {
    if (depth >= max_depth) fail("JSON nested more than " + std::to_string(max_depth) + " levels deep");
  }
  void expect(char c) {
    if (peek() != c) fail(std::string("expected '") + c + "', found " + std::string(peek_kind()));
    ++pos_;
  }
  void expect_literal(std::string_view word) {
    if (text_.substr(pos_, word.size()) != word) fail("invalid literal (expected " + std::string(word) + ")");
    pos_ += word.size();
  }
  void skip_number() {
    const std::size_t start = pos_;
    auto digits = [&] {
      const std::size_t from = pos_;
      while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
      return pos_ - from;
    };
    if (pos_ < text_.size() && text_[pos_] == '-') ++pos_;
    const std::size_t int_start = pos_;
    const std::size_t n = digits();
    if (n == 0) fail_at(start, "invalid value");
    if (text_[int_start] == '0' && n > 1) fail_at(start, "number with a leading zero");
    if (pos_ < text_.size() && text_[pos_] == '.') {
      ++pos_;
      if (digits() == 0) fail_at(start, "number with no digits after '.'");
    }
    if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
      if (digits() == 0) fail_at(start, "number with no digits in its exponent");
    }
  }

  unsigned hex4() {
    if (text_.size() - pos_ < 4) fail("truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = text_[pos_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') v |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= static_cast<unsigned>(c - 'A' + 10);
      else fail_at(pos_ - 1, "invalid hex digit in a \\u escape");
    }
    return v;
  }
  void read_escape(std::string& out) {
    const std::size_t start = pos_;
    ++pos_;  // the backslash
    if (pos_ >= text_.size()) fail("unterminated string");
    const char c = text_[pos_++];
    switch (c) {
      case '"': out += '"'; return;
      case '\\': out += '\\'; return;
      case '/': out += '/'; return;
      case 'b': out += '\b'; return;
      case 'f': out += '\f'; return;
      case 'n': out += '\n'; return;
      case 'r': out += '\r'; return;
      case 't': out += '\t'; return;
      case 'u': break;
      default: fail_at(start, "invalid escape in a string");
    }
    unsigned cp = hex4();
    if (cp >= 0xDC00 && cp <= 0xDFFF) fail_at(start, "unpaired low surrogate in a \\u escape");
    if (cp >= 0xD800 && cp <= 0xDBFF) {
      if (text_.substr(pos_, 2) != "\\u") fail_at(start, "unpaired high surrogate in a \\u escape");
      pos_ += 2;
      const unsigned low = hex4();
      if (low < 0xDC00 || low > 0xDFFF) fail_at(start, "unpaired high surrogate in a \\u escape");
      cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
    }
    append_utf8(out, cp);
  }
  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
  std::string_view text_;
  std::size_t pos_ = 0;
};

// serde_json's string escaping: quote, backslash and control characters; the
// short forms where JSON has them, \u00XX (lower-case hex) otherwise. Everything
// else, non-ASCII included, is written as is.
inline void append_json_string(std::string& out, std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  out += '"';
  for (char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 0xF];
        } else {
          out += ch;
        }
    }
  }
  out += '"';
}

}  // namespace skillgraft::io::detail
