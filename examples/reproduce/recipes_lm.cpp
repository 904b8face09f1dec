// Instantiates the recipe runs of: llm mlp (see SKILLGRAFT_REPRODUCE_RUN_RECIPE).
#include "experiment.hpp"

namespace skillgraft::reproduce {
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::llm);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::mlp);
}  // namespace skillgraft::reproduce
