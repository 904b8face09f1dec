#pragma once
// Procedural 32x32 RGB images: a canvas, filled shapes, thick lines and a 3x5 pixel font.
// Everything is drawn with hard edges (a pixel is inside or not), so a test can check
// labels against the pixels themselves: objects that must not overlap are separated by
// background, clock hands lie on the rays their time says.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace skillgraft::reproduce {

struct rgb {
  float r = 0, g = 0, b = 0;
  bool operator==(const rgb&) const = default;
};

inline rgb scaled(rgb c, float s) { return {c.r * s, c.g * s, c.b * s}; }

// The named colours of the general tasks (same order as colour_words()).
inline const std::array<rgb, 6>& named_colours() {
  static const std::array<rgb, 6> c{{{0.90f, 0.15f, 0.15f},
                                     {0.15f, 0.80f, 0.20f},
                                     {0.20f, 0.35f, 0.95f},
                                     {0.95f, 0.90f, 0.15f},
                                     {0.65f, 0.20f, 0.85f},
                                     {1.00f, 0.55f, 0.10f}}};
  return c;
}

class canvas {
 public:
  static constexpr int size = 32;

  explicit canvas(rgb background = {0.08f, 0.08f, 0.08f}) { fill(background); }

  void fill(rgb c) {
    for (int y = 0; y < size; ++y)
      for (int x = 0; x < size; ++x) set(x, y, c);
  }
  void set(int x, int y, rgb c) {
    if (x < 0 || y < 0 || x >= size || y >= size) return;
    const std::size_t i = std::size_t(y * size + x) * 3;
    px_[i] = c.r;
    px_[i + 1] = c.g;
    px_[i + 2] = c.b;
  }
  rgb at(int x, int y) const {
    const std::size_t i = std::size_t(y * size + x) * 3;
    return {px_[i], px_[i + 1], px_[i + 2]};
  }
  // Pixels in [0, 1], row-major, channels last: [32, 32, 3].
  const std::array<float, size * size * 3>& pixels() const { return px_; }

  // Every pixel for which inside(x, y) holds gets colour c.
  template <class Inside>
  void paint(rgb c, Inside&& inside) {
    for (int y = 0; y < size; ++y)
      for (int x = 0; x < size; ++x)
        if (inside(x, y)) set(x, y, c);
  }

  // Independent Gaussian noise on every channel, clamped to [0, 1].
  void add_noise(std::mt19937_64& rng, float stddev) {
    std::normal_distribution<float> nd(0.f, stddev);
    for (auto& v : px_) v = std::clamp(v + nd(rng), 0.f, 1.f);
  }

 private:
  std::array<float, size * size * 3> px_{};
};

// A filled shape inside the square [cx - r, cx + r] x [cy - r, cy + r] (its bounding box).
enum class shape_kind { circle, square, triangle, cross, diamond };

inline bool inside_shape(shape_kind k, int cx, int cy, int r, int x, int y) {
  const int dx = x - cx, dy = y - cy;
  if (std::abs(dx) > r || std::abs(dy) > r) return false;
  switch (k) {
    case shape_kind::circle: return dx * dx + dy * dy <= r * r + r / 2;
    case shape_kind::square: return true;
    case shape_kind::triangle: {
      // Apex at the top (cy - r), base on the bottom row: width grows with the row.
      const double t = double(dy + r) / double(2 * r);  // 0 at the apex, 1 at the base
      return std::abs(dx) <= t * r + 0.5;
    }
    case shape_kind::cross: {
      const int arm = std::max(1, r / 3);
      return std::abs(dx) <= arm || std::abs(dy) <= arm;
    }
    case shape_kind::diamond: return std::abs(dx) + std::abs(dy) <= r;
  }
  return false;
}

struct object {
  shape_kind shape = shape_kind::circle;
  int colour = 0;  // index into named_colours()
  int cx = 16, cy = 16, r = 4;
  int left() const { return cx - r; }
  int right() const { return cx + r; }
  int top() const { return cy - r; }
  int bottom() const { return cy + r; }
};

inline void draw(canvas& c, const object& o) {
  c.paint(named_colours()[std::size_t(o.colour)], [&](int x, int y) { return inside_shape(o.shape, o.cx, o.cy, o.r, x, y); });
}
inline void draw(canvas& c, shape_kind k, rgb colour, int cx, int cy, int r) {
  c.paint(colour, [&](int x, int y) { return inside_shape(k, cx, cy, r, x, y); });
}

// Bounding boxes at least `gap` background pixels apart (horizontally or vertically).
inline bool separated(const object& a, const object& b, int gap) {
  return a.right() + gap < b.left() || b.right() + gap < a.left() || a.bottom() + gap < b.top() ||
         b.bottom() + gap < a.top();
}

// A segment of thickness `width` from (x0, y0) to (x1, y1): pixels whose centre lies
// within width / 2 of the segment.
inline void draw_line(canvas& c, rgb colour, double x0, double y0, double x1, double y1, double width) {
  const double vx = x1 - x0, vy = y1 - y0, len2 = vx * vx + vy * vy;
  c.paint(colour, [&](int x, int y) {
    double t = len2 > 0 ? ((x - x0) * vx + (y - y0) * vy) / len2 : 0.0;
    t = std::clamp(t, 0.0, 1.0);
    const double ex = x0 + t * vx - x, ey = y0 + t * vy - y;
    return ex * ex + ey * ey <= width * width / 4;
  });
}

// 3x5 capital letters, rows top to bottom, bit 2 = left column.
inline const std::array<std::array<std::uint8_t, 5>, 26>& font3x5() {
  static const std::array<std::array<std::uint8_t, 5>, 26> f{{
      {2, 5, 7, 5, 5},  // A
      {6, 5, 6, 5, 6},  // B
      {3, 4, 4, 4, 3},  // C
      {6, 5, 5, 5, 6},  // D
      {7, 4, 6, 4, 7},  // E
      {7, 4, 6, 4, 4},  // F
      {3, 4, 5, 5, 3},  // G
      {5, 5, 7, 5, 5},  // H
      {7, 2, 2, 2, 7},  // I
      {1, 1, 1, 5, 2},  // J
      {5, 5, 6, 5, 5},  // K
      {4, 4, 4, 4, 7},  // L
      {5, 7, 7, 5, 5},  // M
      {6, 5, 5, 5, 5},  // N
      {2, 5, 5, 5, 2},  // O
      {6, 5, 6, 4, 4},  // P
      {2, 5, 5, 6, 3},  // Q
      {6, 5, 6, 5, 5},  // R
      {3, 4, 2, 1, 6},  // S
      {7, 2, 2, 2, 2},  // T
      {5, 5, 5, 5, 7},  // U
      {5, 5, 5, 5, 2},  // V
      {5, 5, 7, 7, 5},  // W
      {5, 5, 2, 5, 5},  // X
      {5, 5, 2, 2, 2},  // Y
      {7, 1, 2, 4, 7},  // Z
  }};
  return f;
}

// Width in pixels of a word drawn at `scale` with `gap` pixels between letters.
inline int text_width(const std::string& word, int scale, int gap) {
  return word.empty() ? 0 : int(word.size()) * 3 * scale + (int(word.size()) - 1) * gap;
}

// Draws a lowercase or uppercase ASCII word with its top-left corner at (x, y).
inline void draw_text(canvas& c, const std::string& word, int x, int y, int scale, int gap, rgb colour) {
  for (std::size_t i = 0; i < word.size(); ++i) {
    const char ch = word[i];
    const int g = (ch >= 'a' && ch <= 'z') ? ch - 'a' : (ch >= 'A' && ch <= 'Z') ? ch - 'A' : -1;
    if (g < 0) throw std::invalid_argument("reproduce: the font has no glyph for '" + std::string(1, ch) + "'");
    const auto& rows = font3x5()[std::size_t(g)];
    const int x0 = x + int(i) * (3 * scale + gap);
    for (int ry = 0; ry < 5; ++ry)
      for (int rx = 0; rx < 3; ++rx)
        if (rows[std::size_t(ry)] & (4 >> rx))
          for (int sy = 0; sy < scale; ++sy)
            for (int sx = 0; sx < scale; ++sx) c.set(x0 + rx * scale + sx, y + ry * scale + sy, colour);
  }
}

}  // namespace skillgraft::reproduce
