// Instantiates the recipe runs of: vision_projector full (see SKILLGRAFT_REPRODUCE_RUN_RECIPE).
#include "experiment.hpp"

namespace skillgraft::reproduce {
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::vision_projector);
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(recipe::full);
}  // namespace skillgraft::reproduce
