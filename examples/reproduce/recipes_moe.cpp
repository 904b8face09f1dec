// Instantiates the recipe run of the MoE baseline (see SKILLGRAFT_REPRODUCE_RUN_RECIPE_WITH).
#include "experiment.hpp"

namespace skillgraft::reproduce {
template SKILLGRAFT_REPRODUCE_RUN_RECIPE_WITH(moe_recipe, moe_policy);
}  // namespace skillgraft::reproduce
