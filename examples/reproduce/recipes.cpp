// Instantiates the recipe runs of every method (see SKILLGRAFT_REPRODUCE_RUN_RECIPE): the
// paper's recipes and the default run's methods (llm mlp mlp_gate_up sa_proj), mlp_down and
// frozen, the vision recipes (vision_projector full) and the baselines (LoRA, and the MoE with
// SKILLGRAFT_REPRODUCE_RUN_RECIPE_WITH). One unit: see CMakeLists.txt.
#include "experiment.hpp"

namespace skillgraft::reproduce {
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::llm);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::mlp);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::mlp_gate_up);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::sa_proj);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::mlp_down);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::frozen);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::vision_projector);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::full);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(lora_recipe);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE_WITH(moe_recipe, moe_policy);
}  // namespace skillgraft::reproduce
