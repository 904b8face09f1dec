#pragma once
// Members that exist only when a policy needs them.
//
// `optional_NAME<Present, V>` is an empty base when Present is false and a base with
// one member `V NAME;` when true. Inheriting from a list of them builds a struct
// whose members are exactly the ones the policy asks for, so code that names a
// member the policy ruled out fails to compile instead of silently doing work.
#define SKILLGRAFT_OPTIONAL_MEMBER(NAME)          \
  template <bool Present, class V>                \
  struct optional_##NAME {};                      \
  template <class V>                              \
  struct optional_##NAME<true, V> {               \
    V NAME;                                       \
  }

namespace skillgraft::nn::members {
// Saved activations.
SKILLGRAFT_OPTIONAL_MEMBER(x);
SKILLGRAFT_OPTIONAL_MEMBER(rstd);
SKILLGRAFT_OPTIONAL_MEMBER(h);
SKILLGRAFT_OPTIONAL_MEMBER(q);
SKILLGRAFT_OPTIONAL_MEMBER(k);
SKILLGRAFT_OPTIONAL_MEMBER(v);
SKILLGRAFT_OPTIONAL_MEMBER(probs);
SKILLGRAFT_OPTIONAL_MEMBER(attn);
SKILLGRAFT_OPTIONAL_MEMBER(g);
SKILLGRAFT_OPTIONAL_MEMBER(u);
SKILLGRAFT_OPTIONAL_MEMBER(m);
// Adapter inputs u = x A^T, kept for dB.
SKILLGRAFT_OPTIONAL_MEMBER(u_q);
SKILLGRAFT_OPTIONAL_MEMBER(u_k);
SKILLGRAFT_OPTIONAL_MEMBER(u_v);
SKILLGRAFT_OPTIONAL_MEMBER(u_o);
SKILLGRAFT_OPTIONAL_MEMBER(u_gate);
SKILLGRAFT_OPTIONAL_MEMBER(u_up);
SKILLGRAFT_OPTIONAL_MEMBER(u_down);
// Sub-layers of a block.
SKILLGRAFT_OPTIONAL_MEMBER(attn_norm);
SKILLGRAFT_OPTIONAL_MEMBER(attention);
SKILLGRAFT_OPTIONAL_MEMBER(mlp_norm);
SKILLGRAFT_OPTIONAL_MEMBER(mlp);
// Gradients, named as the parameters they belong to.
SKILLGRAFT_OPTIONAL_MEMBER(weight);
SKILLGRAFT_OPTIONAL_MEMBER(q_proj);
SKILLGRAFT_OPTIONAL_MEMBER(k_proj);
SKILLGRAFT_OPTIONAL_MEMBER(v_proj);
SKILLGRAFT_OPTIONAL_MEMBER(o_proj);
SKILLGRAFT_OPTIONAL_MEMBER(gate_proj);
SKILLGRAFT_OPTIONAL_MEMBER(up_proj);
SKILLGRAFT_OPTIONAL_MEMBER(down_proj);
SKILLGRAFT_OPTIONAL_MEMBER(q_lora);
SKILLGRAFT_OPTIONAL_MEMBER(k_lora);
SKILLGRAFT_OPTIONAL_MEMBER(v_lora);
SKILLGRAFT_OPTIONAL_MEMBER(o_lora);
SKILLGRAFT_OPTIONAL_MEMBER(gate_lora);
SKILLGRAFT_OPTIONAL_MEMBER(up_lora);
SKILLGRAFT_OPTIONAL_MEMBER(down_lora);
}  // namespace skillgraft::nn::members
