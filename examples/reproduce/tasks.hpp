#pragma once
// The reproduction's tasks, generated procedurally from a seed: eight general abilities
// the base model is pretrained on and that are then measured as held-out benchmarks, and
// five target skills it never saw, taught one after another.
//
// General (held-out): caption, colour, shape, position, size, exist, relation (multiple
// choice), repeat (text only). No caption or answer of these contains a number.
// Targets, in the paper's order: birds (fine-grained multiple choice, like CUB-200),
// count (number answers, like PixMo-Count), tissue (a specialised domain with yes/no and
// short answers, like PathVQA), sign (reading rendered characters, like TextVQA), clock
// (analog clock reading, like TimeClock).
//
// Each example records the facts its label was made from (objects, time, class), so the
// tests can check labels against the rendered pixels.
#include <algorithm>
#include <array>
#include <cmath>
#include <functional>
#include <numbers>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "render.hpp"
#include "tokenizer.hpp"

namespace skillgraft::reproduce {

// Restricted decoding at evaluation: which tokens the answer may use (always with <eos>).
enum class restriction { none, numbers, yes_no, options, clock };

struct example {
  bool has_image = true;
  canvas image;
  std::string prompt;  // words, without the separator
  std::string answer;  // words, without <eos>
  restriction restrict = restriction::none;
  // What the label was made from.
  std::vector<object> objects;
  int hour = -1, minute = -1;  // clock
  int label = -1;              // class index (birds, sign word, tissue type, ...)
};

struct task {
  std::string name;
  bool target = false;
  std::function<example(std::mt19937_64&)> make;
};

namespace gen {

inline int uniform(std::mt19937_64& rng, int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }
inline bool coin(std::mt19937_64& rng) { return uniform(rng, 0, 1) == 1; }
template <class V>
const auto& pick(std::mt19937_64& rng, const V& v) {
  return v[std::size_t(uniform(rng, 0, int(v.size()) - 1))];
}
inline constexpr float noise = 0.03f;
inline constexpr int margin = 1;  // objects stay this far from the border
inline constexpr int gap = 2;     // background pixels between objects that must not touch

inline const std::string& shape_name(shape_kind k) { return shape_words()[std::size_t(k)]; }
inline const std::string& colour_name(int c) { return colour_words()[std::size_t(c)]; }
inline const std::string& size_name(int r) {
  static const std::string small = "small", large = "large";
  return r >= 5 ? large : small;
}
inline shape_kind random_shape(std::mt19937_64& rng) { return shape_kind(uniform(rng, 0, 4)); }

// A position for an object of radius r, separated from all `others`; false if none found.
inline bool place(std::mt19937_64& rng, object& o, const std::vector<object>& others, int tries = 400) {
  const int lo = margin + o.r, hi = canvas::size - 1 - margin - o.r;
  for (int t = 0; t < tries; ++t) {
    o.cx = uniform(rng, lo, hi);
    o.cy = uniform(rng, lo, hi);
    bool ok = true;
    for (const auto& p : others) ok = ok && separated(o, p, gap);
    if (ok) return true;
  }
  return false;
}

// Two objects with a clear spatial relation: rel 0 = a above b, 1 = below, 2 = left of, 3 = right of.
inline void place_related(std::mt19937_64& rng, object& a, object& b, int rel) {
  object* first = (rel == 0 || rel == 2) ? &a : &b;  // the one above / to the left
  object* second = first == &a ? &b : &a;
  const bool vertical = rel <= 1;
  auto main_lo = [&](const object& o) { return margin + o.r; };
  auto main_hi = [&](const object& o) { return canvas::size - 1 - margin - o.r; };
  // Along the main axis: second starts after first ends plus the gap.
  const int s_lo = main_lo(*first) + first->r + gap + 1 + second->r, s_hi = main_hi(*second);
  if (s_lo > s_hi) throw std::logic_error("reproduce: objects too large for a spatial relation");
  const int s = uniform(rng, s_lo, s_hi);
  const int f = uniform(rng, main_lo(*first), s - second->r - gap - 1 - first->r);
  // Across: nearly aligned (centres at most 2 pixels apart).
  const int rmax = std::max(first->r, second->r);
  const int across = uniform(rng, margin + rmax + 2, canvas::size - 1 - margin - rmax - 2);
  const int fa = across + uniform(rng, -2, 2), sa = across + uniform(rng, -2, 2);
  if (vertical) {
    first->cy = f, second->cy = s, first->cx = fa, second->cx = sa;
  } else {
    first->cx = f, second->cx = s, first->cy = fa, second->cy = sa;
  }
}
inline const char* relation_words(int rel) {
  static const char* w[] = {"above", "below", "left of", "right of"};
  return w[rel];
}

inline canvas scene(std::mt19937_64& rng, const std::vector<object>& objects) {
  canvas c;
  for (const auto& o : objects) draw(c, o);
  c.add_noise(rng, noise);
  return c;
}

// Two objects differing in shape and in colour.
inline std::pair<object, object> distinct_pair(std::mt19937_64& rng) {
  object a, b;
  a.shape = random_shape(rng);
  do b.shape = random_shape(rng);
  while (b.shape == a.shape);
  a.colour = uniform(rng, 0, 5);
  do b.colour = uniform(rng, 0, 5);
  while (b.colour == a.colour);
  return {a, b};
}

inline std::string describe(const object& o) {
  return "a " + size_name(o.r) + " " + colour_name(o.colour) + " " + shape_name(o.shape);
}

// --- general abilities ----------------------------------------------------------------

inline example caption(std::mt19937_64& rng) {
  example e;
  if (coin(rng)) {
    object o;
    o.shape = random_shape(rng);
    o.colour = uniform(rng, 0, 5);
    o.r = coin(rng) ? 3 : 6;
    place(rng, o, {});
    e.objects = {o};
    e.answer = describe(o);
  } else {
    auto [a, b] = distinct_pair(rng);
    a.r = coin(rng) ? 3 : 6;
    b.r = coin(rng) ? 3 : 6;
    const int rel = uniform(rng, 0, 3);
    place_related(rng, a, b, rel);
    e.objects = {a, b};
    e.answer = describe(a) + " " + relation_words(rel) + " " + describe(b);
  }
  e.image = scene(rng, e.objects);
  e.prompt = "describe the image";
  return e;
}

inline std::vector<object> placed_pair(std::mt19937_64& rng, int rmin, int rmax) {
  for (;;) {
    auto [a, b] = distinct_pair(rng);
    a.r = uniform(rng, rmin, rmax);
    b.r = uniform(rng, rmin, rmax);
    if (place(rng, a, {}) && place(rng, b, {a})) return {a, b};
  }
}

// Two objects; the question names one by its shape (asking its colour) or by its colour
// (asking its shape).
inline example attribute(std::mt19937_64& rng, bool ask_colour) {
  example e;
  e.objects = placed_pair(rng, 3, 6);
  const auto& q = e.objects[std::size_t(uniform(rng, 0, 1))];
  e.prompt = ask_colour ? "what colour is the " + shape_name(q.shape) + " ?"
                        : "what shape is the " + colour_name(q.colour) + " object ?";
  e.answer = ask_colour ? colour_name(q.colour) : shape_name(q.shape);
  e.image = scene(rng, e.objects);
  return e;
}
inline example colour(std::mt19937_64& rng) { return attribute(rng, true); }
inline example shape(std::mt19937_64& rng) { return attribute(rng, false); }

inline example position(std::mt19937_64& rng) {
  example e;
  object o;
  o.shape = random_shape(rng);
  o.colour = uniform(rng, 0, 5);
  o.r = uniform(rng, 3, 5);
  const bool top = coin(rng), left = coin(rng);
  const int lo = margin + o.r, hi = canvas::size - 1 - margin - o.r;
  o.cx = left ? uniform(rng, lo, 12) : uniform(rng, 19, hi);
  o.cy = top ? uniform(rng, lo, 12) : uniform(rng, 19, hi);
  e.objects = {o};
  e.prompt = "where is the " + shape_name(o.shape) + " ?";
  e.answer = std::string(top ? "top" : "bottom") + " " + (left ? "left" : "right");
  e.image = scene(rng, e.objects);
  return e;
}

inline example size(std::mt19937_64& rng) {
  example e;
  for (;;) {
    auto [a, b] = distinct_pair(rng);
    a.r = uniform(rng, 2, 3);
    b.r = uniform(rng, 6, 7);
    if (coin(rng)) std::swap(a.r, b.r);
    if (place(rng, a, {}) && place(rng, b, {a})) {
      e.objects = {a, b};
      break;
    }
  }
  const auto& big = e.objects[0].r > e.objects[1].r ? e.objects[0] : e.objects[1];
  const bool swap = coin(rng);
  const auto& first = e.objects[swap ? 1 : 0];
  const auto& second = e.objects[swap ? 0 : 1];
  e.prompt = "which is bigger , the " + shape_name(first.shape) + " or the " + shape_name(second.shape) + " ?";
  e.answer = shape_name(big.shape);
  e.image = scene(rng, e.objects);
  return e;
}

inline example exist(std::mt19937_64& rng) {
  example e;
  const int n = uniform(rng, 1, 3);
  for (int tries = 0; int(e.objects.size()) < n && tries < 100; ++tries) {
    object o;
    o.shape = random_shape(rng);
    o.colour = uniform(rng, 0, 5);
    o.r = uniform(rng, 3, 5);
    bool dup = false;
    for (const auto& p : e.objects) dup = dup || (p.shape == o.shape && p.colour == o.colour);
    if (!dup && place(rng, o, e.objects)) e.objects.push_back(o);
  }
  auto present = [&](shape_kind s, int c) {
    for (const auto& p : e.objects)
      if (p.shape == s && p.colour == c) return true;
    return false;
  };
  shape_kind qs;
  int qc;
  const bool yes = coin(rng);
  if (yes) {
    const auto& o = e.objects[std::size_t(uniform(rng, 0, int(e.objects.size()) - 1))];
    qs = o.shape, qc = o.colour;
  } else {
    // A near miss: the colour or the shape of an object that is there, not both.
    const auto& o = e.objects[std::size_t(uniform(rng, 0, int(e.objects.size()) - 1))];
    do {
      qs = coin(rng) ? o.shape : random_shape(rng);
      qc = uniform(rng, 0, 5);
    } while (present(qs, qc));
  }
  e.prompt = "is there a " + colour_name(qc) + " " + shape_name(qs) + " ?";
  e.answer = present(qs, qc) ? "yes" : "no";
  e.restrict = restriction::yes_no;
  e.image = scene(rng, e.objects);
  return e;
}

inline example relation(std::mt19937_64& rng) {
  example e;
  auto [a, b] = distinct_pair(rng);
  a.r = uniform(rng, 3, 5);
  b.r = uniform(rng, 3, 5);
  const int rel = uniform(rng, 0, 3);
  place_related(rng, a, b, rel);
  e.objects = {a, b};
  std::array<int, 4> order{0, 1, 2, 3};
  std::shuffle(order.begin(), order.end(), rng);
  static const char* option_text[] = {"above", "below", "left", "right"};
  e.prompt = "how is the " + shape_name(a.shape) + " placed relative to the " + shape_name(b.shape) + " ?";
  for (int i = 0; i < 4; ++i) {
    e.prompt += " " + option_words()[std::size_t(i)] + " " + option_text[order[std::size_t(i)]];
    if (order[std::size_t(i)] == rel) e.answer = option_words()[std::size_t(i)];
  }
  e.restrict = restriction::options;
  e.image = scene(rng, e.objects);
  return e;
}

inline example repeat(std::mt19937_64& rng) {
  static const std::vector<std::string> pool = [] {
    std::vector<std::string> p = colour_words();
    for (const auto& s : shape_words()) p.push_back(s);
    for (const char* s : {"small", "large", "left", "right", "top", "bottom", "above", "below", "yes", "no"}) p.push_back(s);
    return p;
  }();
  example e;
  e.has_image = false;
  const int n = uniform(rng, 2, 4);
  e.prompt = "repeat the words :";
  for (int i = 0; i < n; ++i) {
    const auto& w = pick(rng, pool);
    e.prompt += " " + w;
    e.answer += (i ? " " : "") + w;
  }
  return e;
}

// Text-only number sequences: what the language model of a real LMM knows from its text
// pretraining (numbers as words, their order). Part of pretraining only, never evaluated:
// it is not one of the eight held-out abilities, whose answers have no numbers.
inline example numbers(std::mt19937_64& rng) {
  example e;
  e.has_image = false;
  const bool after = coin(rng);
  const int n = after ? uniform(rng, 0, tokenizer::number_count - 2) : uniform(rng, 1, tokenizer::number_count - 1);
  e.prompt = std::string("what comes ") + (after ? "after " : "before ") + std::to_string(n) + " ?";
  e.answer = std::to_string(after ? n + 1 : n - 1);
  return e;
}

// --- target skills -------------------------------------------------------------------

// Birds: 16 classes = 4 body colours x 4 wing patterns; similar classes share one of the two.
inline const std::array<rgb, 4>& bird_colours() {
  static const std::array<rgb, 4> c{{{0.55f, 0.36f, 0.20f}, {0.58f, 0.58f, 0.60f}, {0.50f, 0.55f, 0.22f}, {0.75f, 0.32f, 0.16f}}};
  return c;
}
// Pattern p darkens body pixel (x, y) relative to the body's top-left corner.
inline bool bird_pattern(int p, int x, int y) {
  switch (p) {
    case 1: return y % 3 == 0;                // stripes
    case 2: return x % 3 == 0;                // bars
    case 3: return x % 3 == 1 && y % 3 == 1;  // spots
    default: return false;                    // plain
  }
}

inline void draw_bird(canvas& c, std::mt19937_64& rng, int cls) {
  const rgb body = bird_colours()[std::size_t(cls / 4)];
  const int pattern = cls % 4;
  const int dir = coin(rng) ? 1 : -1;  // facing right or left
  const int rx = uniform(rng, 6, 8), ry = uniform(rng, 4, 5);
  const int cx = uniform(rng, 12, 19), cy = uniform(rng, 14, 19);
  // Tail: a triangle behind the body.
  c.paint(scaled(body, 0.7f), [&](int x, int y) {
    const int back = cx - dir * rx;  // where the body ends
    const int d = (back - x) * dir;  // distance behind it
    return d >= -1 && d <= 4 && std::abs(y - cy + 1) <= d / 2 + 1;
  });
  c.paint(body, [&](int x, int y) {
    const double u = double(x - cx) / rx, v = double(y - cy) / ry;
    return u * u + v * v <= 1.0;
  });
  // The wing pattern on the body.
  const rgb dark = scaled(body, 0.45f);
  c.paint(dark, [&](int x, int y) {
    const double u = double(x - cx) / rx, v = double(y - cy) / ry;
    return u * u + v * v <= 0.8 && bird_pattern(pattern, x - (cx - rx), y - (cy - ry));
  });
  // Head and beak.
  const int hx = cx + dir * (rx + 1), hy = cy - ry + 1;
  draw(c, shape_kind::circle, scaled(body, 0.85f), hx, hy, 3);
  c.set(hx + dir * 1, hy - 1, {0.05f, 0.05f, 0.05f});  // eye
  for (int i = 4; i <= 5; ++i) c.set(hx + dir * i, hy, {1.0f, 0.6f, 0.1f});
}

inline example birds(std::mt19937_64& rng) {
  example e;
  const int cls = uniform(rng, 0, 15);
  e.label = cls;
  // Distractors: two sharing the colour or the pattern with the true class, one random.
  std::vector<int> opts{cls};
  auto add = [&](int o) {
    if (std::find(opts.begin(), opts.end(), o) == opts.end()) opts.push_back(o);
  };
  while (opts.size() < 3) add(coin(rng) ? (cls / 4) * 4 + uniform(rng, 0, 3) : uniform(rng, 0, 3) * 4 + cls % 4);
  while (opts.size() < 4) add(uniform(rng, 0, 15));
  std::shuffle(opts.begin(), opts.end(), rng);
  e.prompt = "which bird is this ?";
  for (int i = 0; i < 4; ++i) {
    e.prompt += " " + option_words()[std::size_t(i)] + " " + bird_words()[std::size_t(opts[std::size_t(i)])];
    if (opts[std::size_t(i)] == cls) e.answer = option_words()[std::size_t(i)];
  }
  const float sky = 0.15f + 0.25f * float(uniform(rng, 0, 4)) / 4.f;
  e.image = canvas({sky * 0.6f, sky * 0.8f, sky});
  draw_bird(e.image, rng, cls);
  e.image.add_noise(rng, noise);
  e.restrict = restriction::options;
  return e;
}

inline const std::string& plural(shape_kind k) {
  static const std::vector<std::string> p{"circles", "squares", "triangles", "crosses", "diamonds"};
  return p[std::size_t(k)];
}

inline example count(std::mt19937_64& rng) {
  example e;
  const shape_kind k = random_shape(rng);
  const int n = uniform(rng, 1, 8);
  for (;;) {
    e.objects.clear();
    for (int i = 0; i < n; ++i) {
      object o;
      o.shape = k;
      o.colour = uniform(rng, 0, 5);
      o.r = uniform(rng, 2, 3);
      if (!place(rng, o, e.objects, 200)) break;
      e.objects.push_back(o);
    }
    if (int(e.objects.size()) == n) break;
  }
  e.prompt = "how many " + plural(k) + " are there ?";
  e.answer = std::to_string(n);
  e.label = n;
  e.restrict = restriction::numbers;
  e.image = scene(rng, e.objects);
  return e;
}

// Tissue: stain (palette) x tissue type (texture) x abnormal (enlarged dark nuclei).
struct stain_palette {
  rgb background, structure, nucleus;
};
inline const std::array<stain_palette, 3>& stains() {
  static const std::array<stain_palette, 3> s{{
      {{0.95f, 0.72f, 0.82f}, {0.80f, 0.40f, 0.62f}, {0.35f, 0.10f, 0.45f}},  // eosin
      {{0.86f, 0.82f, 0.70f}, {0.32f, 0.26f, 0.20f}, {0.08f, 0.08f, 0.08f}},  // silver
      {{0.72f, 0.85f, 0.95f}, {0.30f, 0.45f, 0.80f}, {0.50f, 0.10f, 0.12f}},  // trichrome
  }};
  return s;
}

inline void draw_tissue(canvas& c, std::mt19937_64& rng, int type, const stain_palette& p) {
  switch (type) {
    case 0: {  // gland: rings
      for (int i = 0, n = uniform(rng, 2, 3); i < n; ++i) {
        const int cx = uniform(rng, 6, 25), cy = uniform(rng, 6, 25), r = uniform(rng, 4, 6);
        c.paint(p.structure, [&](int x, int y) {
          const double d = std::hypot(x - cx, y - cy);
          return d >= r - 1.2 && d <= r + 0.5;
        });
      }
      break;
    }
    case 1: {  // muscle: parallel diagonal bands
      const int slope = coin(rng) ? 1 : -1, phase = uniform(rng, 0, 5);
      c.paint(p.structure, [&](int x, int y) { return ((x + slope * y + phase + 64) % 6) < 2; });
      break;
    }
    case 2: {  // fat: large empty cells with thin membranes
      std::vector<std::pair<int, int>> seeds;
      for (int i = 0; i < 6; ++i) seeds.emplace_back(uniform(rng, 0, 31), uniform(rng, 0, 31));
      c.paint(p.structure, [&](int x, int y) {
        double d1 = 1e9, d2 = 1e9;
        for (auto [sx, sy] : seeds) {
          const double d = std::hypot(x - sx, y - sy);
          if (d < d1) d2 = d1, d1 = d;
          else if (d < d2) d2 = d;
        }
        return d2 - d1 < 1.0;
      });
      break;
    }
    default: {  // nerve: wavy fibres
      const double phase = uniform(rng, 0, 6);
      c.paint(p.structure, [&](int x, int y) {
        const double w = y - 2.0 * std::sin(x / 3.0 + phase);
        return std::fmod(w + 64.0, 6.0) < 1.2;
      });
      break;
    }
  }
}

inline example tissue(std::mt19937_64& rng) {
  example e;
  const int stain = uniform(rng, 0, 2), type = uniform(rng, 0, 3);
  const bool abnormal = coin(rng);
  const auto& p = stains()[std::size_t(stain)];
  e.image = canvas(p.background);
  draw_tissue(e.image, rng, type, p);
  for (int i = 0, n = uniform(rng, 6, 10); i < n; ++i)
    draw(e.image, shape_kind::circle, p.nucleus, uniform(rng, 1, 30), uniform(rng, 1, 30), 1);
  if (abnormal)
    for (int i = 0; i < 3; ++i) {
      const int cx = uniform(rng, 4, 27), cy = uniform(rng, 4, 27);
      e.image.paint(scaled(p.nucleus, 0.5f), [&](int x, int y) {
        return std::hypot(x - cx, y - cy) <= 3.2 && ((x * 7 + y * 13) % 5 != 0);  // irregular edge
      });
    }
  e.image.add_noise(rng, noise);
  switch (uniform(rng, 0, 2)) {
    case 0:
      e.prompt = "what tissue is this ?";
      e.answer = tissue_words()[std::size_t(type)];
      e.label = type;
      break;
    case 1:
      e.prompt = "what stain is used ?";
      e.answer = stain_words()[std::size_t(stain)];
      e.label = stain;
      break;
    default:
      e.prompt = "is the tissue abnormal ?";
      e.answer = abnormal ? "yes" : "no";
      e.label = abnormal;
      e.restrict = restriction::yes_no;
      break;
  }
  return e;
}

inline example sign(std::mt19937_64& rng) {
  example e;
  const int w = uniform(rng, 0, int(sign_words().size()) - 1);
  e.label = w;
  const std::string& word = sign_words()[std::size_t(w)];
  const float bg = 0.1f + 0.3f * float(uniform(rng, 0, 3)) / 3.f;
  e.image = canvas({bg, bg * 0.9f, bg * 0.8f});
  const int scale = 2, spacing = 2, tw = text_width(word, scale, spacing), th = 5 * scale;
  const int x0 = uniform(rng, 2, canvas::size - 2 - tw - 2), y0 = uniform(rng, 2, canvas::size - 2 - th - 2);
  static const std::array<rgb, 3> boards{{{0.95f, 0.95f, 0.92f}, {0.98f, 0.88f, 0.30f}, {0.70f, 0.90f, 0.98f}}};
  const rgb board = pick(rng, boards);
  e.image.paint(board, [&](int x, int y) { return x >= x0 - 2 && x < x0 + tw + 2 && y >= y0 - 2 && y < y0 + th + 2; });
  draw_text(e.image, word, x0, y0, scale, spacing, {0.05f, 0.05f, 0.1f});
  e.image.add_noise(rng, noise);
  e.prompt = "what does the sign say ?";
  e.answer = word;
  return e;
}

// Clock geometry, shared with the tests: angles clockwise from 12 o'clock, in radians.
struct clock_face {
  double cx = 15.5, cy = 15.5, radius = 13.5;
  static constexpr double hour_length = 7.0, hour_width = 2.2, minute_length = 11.5, minute_width = 1.3;
  static double hour_angle(int h, int m) { return ((h % 12) + m / 60.0) * std::numbers::pi / 6.0; }
  static double minute_angle(int m) { return m * std::numbers::pi / 30.0; }
  std::pair<double, double> point(double angle, double length) const {
    return {cx + length * std::sin(angle), cy - length * std::cos(angle)};
  }
};
inline const rgb clock_hand_colour{0.05f, 0.05f, 0.08f};

inline example clock(std::mt19937_64& rng) {
  example e;
  e.hour = uniform(rng, 1, 12);
  e.minute = 15 * uniform(rng, 0, 3);
  clock_face f;
  f.cx += uniform(rng, -1, 1);
  f.cy += uniform(rng, -1, 1);
  const float bg = 0.1f + 0.2f * float(uniform(rng, 0, 3)) / 3.f;
  e.image = canvas({bg * 0.8f, bg, bg * 0.9f});
  static const std::array<rgb, 3> faces{{{0.96f, 0.96f, 0.94f}, {0.98f, 0.92f, 0.75f}, {0.85f, 0.92f, 0.98f}}};
  const rgb face = pick(rng, faces);
  e.image.paint(face, [&](int x, int y) { return std::hypot(x - f.cx, y - f.cy) <= f.radius; });
  for (int t = 0; t < 12; ++t) {  // hour ticks
    auto [tx, ty] = f.point(t * std::numbers::pi / 6.0, f.radius - 1.5);
    e.image.set(int(std::lround(tx)), int(std::lround(ty)), {0.4f, 0.4f, 0.45f});
  }
  auto [hx, hy] = f.point(clock_face::hour_angle(e.hour, e.minute), clock_face::hour_length);
  auto [mx, my] = f.point(clock_face::minute_angle(e.minute), clock_face::minute_length);
  draw_line(e.image, clock_hand_colour, f.cx, f.cy, mx, my, clock_face::minute_width);
  draw_line(e.image, clock_hand_colour, f.cx, f.cy, hx, hy, clock_face::hour_width);
  e.image.add_noise(rng, noise);
  e.prompt = "what time is it ?";
  e.answer = std::to_string(e.hour) + " : " + std::to_string(e.minute);
  e.restrict = restriction::clock;
  return e;
}

}  // namespace gen

inline std::vector<task> general_tasks() {
  return {{"caption", false, gen::caption}, {"colour", false, gen::colour},   {"shape", false, gen::shape},
          {"position", false, gen::position}, {"size", false, gen::size},    {"exist", false, gen::exist},
          {"relation", false, gen::relation}, {"repeat", false, gen::repeat}};
}
// Extra pretraining data that is not a held-out benchmark (see gen::numbers).
inline std::vector<task> pretraining_only_tasks() { return {{"numbers", false, gen::numbers}}; }

// In the paper's order: CUB-200, PixMo-Count, PathVQA, TextVQA, TimeClock.
inline std::vector<task> target_tasks() {
  return {{"birds", true, gen::birds},
          {"count", true, gen::count},
          {"tissue", true, gen::tissue},
          {"sign", true, gen::sign},
          {"clock", true, gen::clock}};
}

// Tokens an answer may use under its restriction (empty: any token), <eos> included.
inline std::vector<std::int64_t> allowed_tokens(const tokenizer& tok, restriction r) {
  std::vector<std::int64_t> a;
  switch (r) {
    case restriction::none: return a;
    case restriction::numbers: a = tok.number_ids(); break;
    case restriction::yes_no: a = {tok.id("yes"), tok.id("no")}; break;
    case restriction::options:
      for (const auto& o : option_words()) a.push_back(tok.id(o));
      break;
    case restriction::clock:
      a = tok.number_ids();
      a.push_back(tok.id(":"));
      break;
  }
  a.push_back(tok.eos());
  return a;
}

}  // namespace skillgraft::reproduce
