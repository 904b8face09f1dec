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

// The recipes reachable by name, in the order they are listed in messages.
inline constexpr auto named_recipes = hana::make_tuple(
    named_recipe{"sa_proj", recipe::sa_proj}, named_recipe{"mlp", recipe::mlp},
    named_recipe{"mlp_gate_up", recipe::mlp_gate_up}, named_recipe{"mlp_down", recipe::mlp_down},
    named_recipe{"llm", recipe::llm}, named_recipe{"frozen", recipe::frozen});

inline std::string recipe_names(std::string_view separator = ", ") {
  std::string out;
  hana::for_each(named_recipes, [&](const auto& r) {
    if (!out.empty()) out += separator;
    out += r.name;
  });
  return out;
}

inline bool is_recipe_name(std::string_view name) {
  bool found = false;
  hana::for_each(named_recipes, [&](const auto& r) { found = found || r.name == name; });
  return found;
}

// Calls f(recipe) with the compile-time recipe called `name`; every instantiation of f
// must return the same type. Throws std::invalid_argument listing the valid names otherwise.
template <class F>
decltype(auto) with_recipe(std::string_view name, F&& f) {
  using result = std::invoke_result_t<F&, decltype(recipe::frozen)>;
  return hana::unpack(named_recipes, [&](const auto&... r) -> result {
    static_assert((std::is_same_v<result, std::invoke_result_t<F&, decltype(r.value)>> && ...),
                  "skillgraft: with_recipe needs f to return the same type for every recipe");
    if constexpr (std::is_void_v<result>) {
      if (!((r.name == name ? (f(r.value), true) : false) || ...))
        throw std::invalid_argument("skillgraft: unknown recipe '" + std::string(name) +
                                    "'; valid names: " + recipe_names());
    } else {
      std::optional<result> out;
      if (!((r.name == name ? (out.emplace(f(r.value)), true) : false) || ...))
        throw std::invalid_argument("skillgraft: unknown recipe '" + std::string(name) +
                                    "'; valid names: " + recipe_names());
      return std::move(*out);
    }
  });
}

}  // namespace skillgraft
