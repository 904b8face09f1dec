// Instantiates the recipe run of the LoRA baseline (see SKILLGRAFT_REPRODUCE_RUN_RECIPE).
#include "experiment.hpp"

namespace skillgraft::reproduce {
template SKILLGRAFT_REPRODUCE_RUN_RECIPE(lora_recipe);
}  // namespace skillgraft::reproduce
