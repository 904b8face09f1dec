#pragma once
// Runtime name -> compile-time recipe.
//
// Command lines and config files name recipes as strings; the kernels need them
// as types. `with_recipe` instantiates `f` once per named recipe and calls the one
// whose name matches, so the choice costs one string comparison per name, once.
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "skillgraft/policy/recipes.hpp"

namespace skillgraft {

template <class Recipe>
struct named_recipe {
  std::string_view name;
  Recipe value;
};

// The language-model recipes reachable by name, in the order they are listed in messages.
// Each applies to a decoder stack, a decoder LM, or the language model of a multimodal model.
inline constexpr auto named_recipes = hana::make_tuple(
    named_recipe{"sa_proj", recipe::sa_proj}, named_recipe{"mlp", recipe::mlp},
    named_recipe{"mlp_gate_up", recipe::mlp_gate_up}, named_recipe{"mlp_down", recipe::mlp_down},
    named_recipe{"llm", recipe::llm}, named_recipe{"frozen", recipe::frozen});

// The recipes that only a multimodal model (vision encoder + projector + LM) can take.
inline constexpr auto named_vision_recipes = hana::make_tuple(named_recipe{"vision_projector", recipe::vision_projector},
                                                              named_recipe{"full", recipe::full});

// Every recipe a multimodal model can take: the language-model ones, then the vision ones.
inline constexpr auto named_multimodal_recipes = hana::concat(named_recipes, named_vision_recipes);

namespace detail {
template <class Tuple>
std::string names_of(const Tuple& t, std::string_view separator) {
  std::string out;
  hana::for_each(t, [&](const auto& r) {
    if (!out.empty()) out += separator;
    out += r.name;
  });
  return out;
}
template <class Tuple>
bool has_name(const Tuple& t, std::string_view name) {
  bool found = false;
  hana::for_each(t, [&](const auto& r) { found = found || r.name == name; });
  return found;
}

template <class Tuple, class F, class Message>
decltype(auto) dispatch_recipe(const Tuple& recipes, std::string_view name, F& f, Message&& unknown) {
  using result = std::invoke_result_t<F&, decltype(recipe::frozen)>;
  return hana::unpack(recipes, [&](const auto&... r) -> result {
    static_assert((std::is_same_v<result, std::invoke_result_t<F&, decltype(r.value)>> && ...),
                  "skillgraft: with_recipe needs f to return the same type for every recipe");
    if constexpr (std::is_void_v<result>) {
      if (!((r.name == name ? (f(r.value), true) : false) || ...)) throw std::invalid_argument(unknown());
    } else {
      std::optional<result> out;
      if (!((r.name == name ? (out.emplace(f(r.value)), true) : false) || ...)) throw std::invalid_argument(unknown());
      return std::move(*out);
    }
  });
}
}  // namespace detail

inline std::string recipe_names(std::string_view separator = ", ") { return detail::names_of(named_recipes, separator); }
inline std::string multimodal_recipe_names(std::string_view separator = ", ") {
  return detail::names_of(named_multimodal_recipes, separator);
}

inline bool is_recipe_name(std::string_view name) { return detail::has_name(named_recipes, name); }
inline bool is_multimodal_recipe_name(std::string_view name) { return detail::has_name(named_multimodal_recipes, name); }

// Calls f(recipe) with the compile-time language-model recipe called `name`; every
// instantiation of f must return the same type. Throws std::invalid_argument listing the
// valid names otherwise (and pointing to with_multimodal_recipe for a vision recipe).
template <class F>
decltype(auto) with_recipe(std::string_view name, F&& f) {
  return detail::dispatch_recipe(named_recipes, name, f, [&] {
    std::string m = "skillgraft: unknown recipe '" + std::string(name) + "'; valid names: " + recipe_names();
    if (detail::has_name(named_vision_recipes, name))
      m += " ('" + std::string(name) + "' trains a vision encoder or projector: use with_multimodal_recipe)";
    return m;
  });
}

// The same over every recipe a multimodal model can take (named_multimodal_recipes).
template <class F>
decltype(auto) with_multimodal_recipe(std::string_view name, F&& f) {
  return detail::dispatch_recipe(named_multimodal_recipes, name, f, [&] {
    return "skillgraft: unknown recipe '" + std::string(name) + "'; valid names: " + multimodal_recipe_names();
  });
}

}  // namespace skillgraft
