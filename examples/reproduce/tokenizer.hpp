#pragma once
// The reproduction's word-level tokenizer: a fixed vocabulary, one token per word,
// with the number tokens "0".."59" in one contiguous block (the counting-bias probe
// measures the probability mass on exactly these).
//
// Text is split on spaces; every word must be in the vocabulary (the generators only
// produce vocabulary words, so an unknown word is a bug and throws, naming it).
#include <algorithm>
#include <cstdint>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace skillgraft::reproduce {

// Word lists shared by the generators and the vocabulary.
inline const std::vector<std::string>& colour_words() {
  static const std::vector<std::string> v{"red", "green", "blue", "yellow", "purple", "orange"};
  return v;
}
inline const std::vector<std::string>& shape_words() {
  static const std::vector<std::string> v{"circle", "square", "triangle", "cross", "diamond"};
  return v;
}
// Fine-grained classes (the bird task): 16 names.
inline const std::vector<std::string>& bird_words() {
  static const std::vector<std::string> v{"finch",  "wren",  "robin", "sparrow", "thrush", "warbler", "pipit", "lark",
                                          "tern",   "gull",  "heron", "egret",   "swift",  "martin",  "oriole", "tanager"};
  return v;
}
// Words rendered on signs (the reading task).
inline const std::vector<std::string>& sign_words() {
  static const std::vector<std::string> v{"cat", "dog", "sun", "map", "hat", "box", "cup", "pen",
                                          "key", "bus", "car", "bed", "egg", "fox", "jar", "owl",
                                          "ant", "bat", "cow", "elk", "fig", "gem", "ink", "jam"};
  return v;
}
// The specialised domain (the tissue task): tissue types and stains.
inline const std::vector<std::string>& tissue_words() {
  static const std::vector<std::string> v{"gland", "muscle", "fat", "nerve"};
  return v;
}
inline const std::vector<std::string>& stain_words() {
  static const std::vector<std::string> v{"eosin", "silver", "trichrome"};
  return v;
}
inline const std::vector<std::string>& option_words() {
  static const std::vector<std::string> v{"A", "B", "C", "D"};
  return v;
}

class tokenizer {
 public:
  static constexpr int number_count = 60;  // "0".."59"

  tokenizer() {
    for (const char* s : {"<pad>", "<eos>", "<sep>"}) add(s);
    for (int n = 0; n < number_count; ++n) add(std::to_string(n));
    for (const auto* list : {&colour_words(), &shape_words(), &bird_words(), &sign_words(), &tissue_words(),
                             &stain_words(), &option_words()})
      for (const auto& w : *list) add(w);
    for (const char* s : {"a", "the", "and", "of", "is", "are", "there", "what", "which", "where", "how", "many",
                          "colour", "shape", "object", "objects", "image", "describe", "in", "this", "?", ",", ":",
                          "yes", "no", "small", "large", "bigger", "or", "above", "below", "left", "right", "top",
                          "bottom", "placed", "relative", "to", "repeat", "words", "bird", "does", "sign", "say",
                          "time", "it", "tissue", "stain", "used", "abnormal", "circles", "squares", "triangles",
                          "crosses", "diamonds", "shapes", "comes", "after", "before"})
      add(s);
  }

  int size() const { return int(words_.size()); }
  std::int64_t pad() const { return 0; }
  std::int64_t eos() const { return 1; }
  std::int64_t sep() const { return 2; }
  std::int64_t number(int n) const {
    if (n < 0 || n >= number_count) throw std::out_of_range("reproduce: no number token for " + std::to_string(n));
    return 3 + n;
  }
  bool is_number(std::int64_t id) const { return id >= 3 && id < 3 + number_count; }
  std::vector<std::int64_t> number_ids() const {
    std::vector<std::int64_t> v;
    for (int n = 0; n < number_count; ++n) v.push_back(number(n));
    return v;
  }

  std::int64_t id(std::string_view word) const {
    auto it = index_.find(std::string(word));
    if (it == index_.end()) throw std::invalid_argument("reproduce: word '" + std::string(word) + "' is not in the vocabulary");
    return it->second;
  }
  bool contains(std::string_view word) const { return index_.count(std::string(word)) != 0; }
  const std::string& word(std::int64_t id) const {
    if (id < 0 || id >= size()) throw std::out_of_range("reproduce: token id " + std::to_string(id) + " outside the vocabulary");
    return words_[std::size_t(id)];
  }
  const std::vector<std::string>& words() const { return words_; }

  std::vector<std::int64_t> encode(std::string_view text) const {
    std::vector<std::int64_t> out;
    std::istringstream in{std::string(text)};
    std::string w;
    while (in >> w) out.push_back(id(w));
    return out;
  }
  // Words joined by spaces, stopping at <eos>.
  std::string decode(const std::vector<std::int64_t>& ids) const {
    std::string s;
    for (auto t : ids) {
      if (t == eos()) break;
      if (!s.empty()) s += ' ';
      s += word(t);
    }
    return s;
  }

 private:
  void add(const std::string& w) {
    if (index_.count(w)) throw std::logic_error("reproduce: vocabulary lists '" + w + "' twice");
    index_[w] = std::int64_t(words_.size());
    words_.push_back(w);
  }
  std::vector<std::string> words_;
  std::map<std::string, std::int64_t> index_;
};

}  // namespace skillgraft::reproduce
