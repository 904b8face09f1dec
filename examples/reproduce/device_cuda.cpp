// The reproduction's entry points for --device cuda (declared in experiment.hpp).
// Compiled by nvcc as device_cuda.cu into the program when SKILLGRAFT_REPRODUCE_CUDA is on;
// compiled by g++ with Thrust's host device system into test_reproduce_cuda_host.
#include "device_cuda.hpp"

namespace skillgraft::reproduce {

bool cuda_device_ready(std::string& why) {
  if (skillgraft::cuda::device_available()) return true;
  why = "no CUDA device (or no driver) on this machine";
  return false;
}

std::string pretrain_cuda(weights_t& w, const settings& s, const run_data& d, progress& prog) {
  return pretrain_on_device(w, s, d, prog);
}

method_result run_method_cuda(const std::string& m, const settings& s, const weights_t& base,
                              const std::vector<double>& base_row, const probe_value& base_probe, const run_data& d,
                              progress& prog) {
  return run_method_on_device(m, s, base, base_row, base_probe, d, prog);
}

}  // namespace skillgraft::reproduce
