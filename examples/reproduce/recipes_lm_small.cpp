// Instantiates the recipe runs of: mlp_gate_up sa_proj mlp_down frozen (see SKILLGRAFT_REPRODUCE_RUN_RECIPE).
#include "experiment.hpp"

namespace skillgraft::reproduce {
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::mlp_gate_up);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::sa_proj);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::mlp_down);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::frozen);
}  // namespace skillgraft::reproduce
