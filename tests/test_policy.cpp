// Recipes: canonical sets, set algebra, scopes and runtime dispatch.
#include <catch2/catch.hpp>

#include "skillgraft/policy/dispatch.hpp"

namespace sg = skillgraft;
namespace hana = boost::hana;
using namespace sg::proj;
using sg::group::attn_norm;

// Set algebra is checked at compile time.
static_assert(std::is_same_v<decltype(sg::trainable<k, q>), decltype(sg::trainable<q, k>)>, "sets are canonical");
static_assert(std::is_same_v<decltype(sg::trainable<q, q, k>), decltype(sg::trainable<q, k>)>, "no duplicates");
static_assert(sg::recipe::sa_proj.trains<q> && sg::recipe::sa_proj.trains<o> && !sg::recipe::sa_proj.trains<gate>);
static_assert(sg::trains_v<down, decltype(sg::recipe::mlp)> && !sg::trains_v<down, decltype(sg::recipe::mlp_gate_up)>);
static_assert((sg::recipe::mlp - sg::recipe::mlp_down) == sg::recipe::mlp_gate_up);
static_assert((sg::recipe::mlp_gate_up | sg::recipe::mlp_down) == sg::recipe::mlp);
static_assert((sg::recipe::mlp & sg::recipe::mlp_down) == sg::recipe::mlp_down);
static_assert((sg::recipe::sa_proj & sg::recipe::mlp).empty);
static_assert(sg::recipe::frozen.empty && !sg::recipe::llm.empty);
static_assert(sg::recipe::llm.contains(sg::group::lm_head{}) && sg::recipe::llm.contains(attn_norm{}));
static_assert(!sg::recipe::llm.contains(sg::group::vision{}));
static_assert(decltype(hana::length(sg::recipe::llm.set))::value == 12);
static_assert((sg::recipe::sa_proj | sg::recipe::mlp | sg::trainable<attn_norm, sg::group::mlp_norm, sg::group::embed,
                                                                      sg::group::final_norm, sg::group::lm_head>) ==
              sg::recipe::llm);
// The block's part of a model-wide recipe.
static_assert(std::is_same_v<sg::restrict_t<decltype(sg::recipe::llm), decltype(sg::block_tags)>,
                             std::remove_const_t<decltype(sg::recipe::sa_proj | sg::recipe::mlp |
                                                          sg::trainable<attn_norm, sg::group::mlp_norm>)>>);
// Scopes are compile-time values too.
constexpr auto upper = sg::recipe::mlp_gate_up.on_layers(8, 15);
static_assert(upper.layers.first == 8 && upper.layers.last == 15 && !upper.layers.all());
static_assert(sg::recipe::mlp_gate_up.layers.all());
static_assert(!(upper == sg::recipe::mlp_gate_up));

TEST_CASE("scoped recipes combine only over the same layers") {
  auto a = sg::recipe::sa_proj.on_layers(0, 3);
  CHECK(((a | sg::recipe::mlp).layers == sg::layer_range{0, 3}));
  CHECK(((a | sg::recipe::mlp.on_layers(0, 3)).layers == sg::layer_range{0, 3}));
  CHECK_THROWS_WITH(a | sg::recipe::mlp.on_layers(4, 7), Catch::Contains("different layer ranges"));
  CHECK_THROWS_WITH(sg::recipe::mlp.on_layers(5, 2), Catch::Contains("[5, 2]"));
  CHECK_THROWS_AS(sg::recipe::mlp.on_layers(-1, 2), std::invalid_argument);
}

TEST_CASE("with_recipe turns a name into the compile-time recipe") {
  auto count = [](auto r) { return int(decltype(hana::length(r.set))::value); };
  CHECK(sg::with_recipe("sa_proj", count) == 4);
  CHECK(sg::with_recipe("mlp", count) == 3);
  CHECK(sg::with_recipe("mlp_gate_up", count) == 2);
  CHECK(sg::with_recipe("mlp_down", count) == 1);
  CHECK(sg::with_recipe("llm", count) == 12);
  CHECK(sg::with_recipe("frozen", count) == 0);
  bool gate_up = false;
  sg::with_recipe("mlp_gate_up", [&](auto r) { gate_up = r.template trains<gate> && !r.template trains<down>; });
  CHECK(gate_up);
  hana::for_each(sg::named_recipes, [&](const auto& nr) {
    CHECK(sg::is_recipe_name(nr.name));
    sg::with_recipe(nr.name, [&](auto r) { CHECK(std::is_same_v<decltype(r), std::remove_const_t<decltype(nr.value)>>); });
  });
}

TEST_CASE("an unknown recipe name lists the valid ones") {
  CHECK_FALSE(sg::is_recipe_name("attention"));
  CHECK_THROWS_AS(sg::with_recipe("attention", [](auto) {}), std::invalid_argument);
  CHECK_THROWS_WITH(sg::with_recipe("attention", [](auto) {}),
                    "skillgraft: unknown recipe 'attention'; valid names: sa_proj, mlp, mlp_gate_up, mlp_down, llm, frozen");
  CHECK_THROWS_WITH(sg::with_recipe("", [](auto) { return 1; }), Catch::Contains("unknown recipe ''"));
  CHECK(sg::recipe_names() == "sa_proj, mlp, mlp_gate_up, mlp_down, llm, frozen");
}

TEST_CASE("tag names are the Hugging Face module names") {
  CHECK(sg::tag_name<q> == "q_proj");
  CHECK(sg::tag_name<gate> == "gate_proj");
  CHECK(sg::tag_name<attn_norm> == "input_layernorm");
  CHECK(sg::tag_name<sg::group::mlp_norm> == "post_attention_layernorm");
  CHECK(sg::tag_name<sg::group::embed> == "embed_tokens");
}
