#pragma once
// Trainable sets: which parameters a training step updates, as a compile-time
// Boost.Hana set of tags, plus the layers it applies to.
//
// Sets are kept in one canonical order (that of `all_tags`), so equal sets are
// the same C++ type: `trainable<q, k>` and `trainable<k, q>` instantiate the
// same blocks, and a recipe is visible in a type name in a stable spelling.
#include <boost/hana.hpp>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "skillgraft/policy/tags.hpp"

namespace skillgraft {

namespace hana = boost::hana;

// Every tag a recipe may name, in canonical order.
inline constexpr auto all_tags = hana::make_tuple(
    hana::type_c<proj::q>, hana::type_c<proj::k>, hana::type_c<proj::v>, hana::type_c<proj::o>,
    hana::type_c<proj::gate>, hana::type_c<proj::up>, hana::type_c<proj::down>,
    hana::type_c<group::attn_norm>, hana::type_c<group::mlp_norm>, hana::type_c<group::embed>,
    hana::type_c<group::final_norm>, hana::type_c<group::lm_head>, hana::type_c<group::vision>,
    hana::type_c<group::projector>, hana::type_c<lora<proj::q>>, hana::type_c<lora<proj::k>>,
    hana::type_c<lora<proj::v>>, hana::type_c<lora<proj::o>>, hana::type_c<lora<proj::gate>>,
    hana::type_c<lora<proj::up>>, hana::type_c<lora<proj::down>>, hana::type_c<group::act_range>,
    hana::type_c<group::router>, hana::type_c<group::residual_gate<branch::attention>>,
    hana::type_c<group::residual_gate<branch::mlp>>);

// The parameters of one decoder block (adapters, the activation range and the router of
// the MLP policies that have them, and the residual gates of gate_skip blocks, included), and of the whole language model.
inline constexpr auto block_tags = hana::make_tuple(
    hana::type_c<proj::q>, hana::type_c<proj::k>, hana::type_c<proj::v>, hana::type_c<proj::o>,
    hana::type_c<proj::gate>, hana::type_c<proj::up>, hana::type_c<proj::down>,
    hana::type_c<group::attn_norm>, hana::type_c<group::mlp_norm>, hana::type_c<lora<proj::q>>,
    hana::type_c<lora<proj::k>>, hana::type_c<lora<proj::v>>, hana::type_c<lora<proj::o>>,
    hana::type_c<lora<proj::gate>>, hana::type_c<lora<proj::up>>, hana::type_c<lora<proj::down>>,
    hana::type_c<group::act_range>, hana::type_c<group::router>,
    hana::type_c<group::residual_gate<branch::attention>>, hana::type_c<group::residual_gate<branch::mlp>>);
inline constexpr auto language_model_tags = hana::concat(
    block_tags, hana::make_tuple(hana::type_c<group::embed>, hana::type_c<group::final_norm>,
                                 hana::type_c<group::lm_head>));

template <class Tag>
struct is_known_tag : std::bool_constant<decltype(hana::contains(all_tags, hana::type_c<Tag>))::value> {};

// Raised (once per offending tag) when a set names a type that is not a skillgraft tag.
template <class Tag>
struct reject_unknown_tag {
  static_assert(is_known_tag<Tag>::value, "skillgraft: this type is not a parameter tag (see policy/tags.hpp)");
  static constexpr bool value = true;
};

// A recipe's tags as a plain list type. Recipes are spelled with it, so compiler messages
// print a recipe as `trainable_set<skillgraft::tag_list<skillgraft::proj::gate,
// skillgraft::proj::up>>` rather than as nested Hana types.
template <class... Tags>
struct tag_list {};

// The canonical form of any Hana set of tags: the tags of `all_tags` it contains, in that
// order, as a tag_list.
template <class Set>
constexpr auto canonical(Set s) {
  return hana::unpack(hana::filter(all_tags, [s](auto t) { return hana::contains(s, t); }),
                      [](auto... t) { return tag_list<typename decltype(t)::type...>{}; });
}
template <class Set>
using canonical_t = decltype(canonical(std::declval<Set>()));

// Which layers of a stack a recipe trains: [first, last], `last == -1` meaning the top layer.
struct layer_range {
  int first = 0;
  int last = -1;
  constexpr bool all() const { return first == 0 && last == -1; }
  constexpr bool operator==(const layer_range&) const = default;
};

// A recipe: a canonical list of trainable tags (the type) and the layers it applies to (a
// value). `set` is the same tags as a Hana set, for algorithms over them.
template <class List>
struct trainable_set;

template <class... Tags>
struct trainable_set<tag_list<Tags...>> {
  using tags_type = tag_list<Tags...>;
  using set_type = decltype(hana::make_set(hana::type_c<Tags>...));
  static constexpr set_type set{};
  layer_range layers{};

  template <class Tag>
  static constexpr bool trains = (std::is_same_v<Tag, Tags> || ...);
  static constexpr bool empty = sizeof...(Tags) == 0;

  template <class Tag>
  constexpr bool contains(Tag) const { return trains<Tag>; }

  // The same set, trained only on layers first..last (inclusive).
  constexpr trainable_set on_layers(int first, int last) const {
    if (first < 0 || last < first)
      throw std::invalid_argument("skillgraft: layer range [" + std::to_string(first) + ", " +
                                  std::to_string(last) + "] is empty or negative");
    return trainable_set{{first, last}};
  }
};

template <class T>
struct is_recipe : std::false_type {};
template <class S>
struct is_recipe<trainable_set<S>> : std::true_type {};
template <class T>
concept recipe_like = is_recipe<std::remove_cvref_t<T>>::value;

namespace detail {
template <class... Tags>
constexpr bool all_known() {
  return (reject_unknown_tag<Tags>::value && ... && true);
}
template <class Set>
constexpr trainable_set<canonical_t<Set>> make_recipe(Set) { return {}; }
}  // namespace detail

// `trainable<proj::gate, proj::up>`: a recipe from a list of tags (unscoped).
template <class... Tags>
  requires(detail::all_known<Tags...>())
inline constexpr trainable_set<canonical_t<decltype(hana::make_set(hana::type_c<Tags>...))>> trainable{};

// Does recipe type R train Tag?
template <class Tag, class R>
inline constexpr bool trains_v = std::remove_cvref_t<R>::template trains<Tag>;

// Set algebra. Scopes combine only when they agree: two recipes scoped to different
// layers have no single scope, and silently picking one would train the wrong layers.
namespace detail {
inline constexpr layer_range combine(layer_range a, layer_range b) {
  if (a.all()) return b;
  if (b.all() || a == b) return a;
  throw std::invalid_argument("skillgraft: cannot combine recipes scoped to different layer ranges");
}
}  // namespace detail

template <class A, class B>
constexpr auto operator|(trainable_set<A> a, trainable_set<B> b) {
  auto r = detail::make_recipe(hana::union_(a.set, b.set));
  r.layers = detail::combine(a.layers, b.layers);
  return r;
}
template <class A, class B>
constexpr auto operator&(trainable_set<A> a, trainable_set<B> b) {
  auto r = detail::make_recipe(hana::intersection(a.set, b.set));
  r.layers = detail::combine(a.layers, b.layers);
  return r;
}
template <class A, class B>
constexpr auto operator-(trainable_set<A> a, trainable_set<B> b) {
  auto r = detail::make_recipe(hana::difference(a.set, b.set));
  r.layers = a.layers;
  return r;
}
template <class A, class B>
constexpr bool operator==(trainable_set<A> a, trainable_set<B> b) {
  return std::is_same_v<A, B> && a.layers == b.layers;
}

// The part of a recipe that lies inside a tuple of tags (for example `block_tags`).
template <class R, class Tags>
using restrict_t = trainable_set<canonical_t<decltype(hana::intersection(
    typename R::set_type{}, hana::to_set(std::declval<Tags>())))>>;

}  // namespace skillgraft
