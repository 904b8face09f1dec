#pragma once
// Names from files (tensor names, JSON keys) are data, not text for the terminal: an
// escape sequence in a tensor name must not reach it, and a NUL must not cut a message
// short. `printable` keeps printable ASCII and well-formed UTF-8 as they are and writes
// everything else -- control characters, DEL, C1 controls, invalid bytes -- as \xNN
// (a backslash itself as \\), so the message shows exactly which bytes the file holds.
#include <cstddef>
#include <string>
#include <string_view>

namespace skillgraft::io {

inline std::string printable(std::string_view s) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string out;
  out.reserve(s.size());
  auto escape = [&](unsigned char c) {
    out += "\\x";
    out += hex[c >> 4];
    out += hex[c & 0xF];
  };
  for (std::size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '\\') {
      out += "\\\\";
      ++i;
      continue;
    }
    if (c >= 0x20 && c < 0x7F) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    // A well-formed UTF-8 sequence of 2-4 bytes (no overlong forms, no surrogates,
    // nothing above U+10FFFF), except the C1 controls U+0080..U+009F.
    std::size_t n = 0;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) n = 2;
    else if (c >= 0xE0 && c <= 0xEF) n = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) n = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    bool ok = n != 0 && i + n <= s.size();
    for (std::size_t k = 1; ok && k < n; ++k) {
      const auto b = static_cast<unsigned char>(s[i + k]);
      ok = b >= (k == 1 ? lo : 0x80) && b <= (k == 1 ? hi : 0xBF);
    }
    if (ok && c == 0xC2 && static_cast<unsigned char>(s[i + 1]) <= 0x9F) ok = false;  // C1 control
    if (ok) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      escape(c);
      ++i;
    }
  }
  return out;
}

}  // namespace skillgraft::io
