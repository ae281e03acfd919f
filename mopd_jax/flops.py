"""Model FLOPs: the matmul work a program must do, counted once (the numerator of MFU).

Notation: L layers, d hidden, m MLP width, H / K query / kv heads of size dh, V vocab,
d_attn = H * dh, and the matmul weights of one layer

  P_layer = 2*d*d_attn + 2*d*K*dh + 3*d*m       (q, o, k, v, gate/up/down)

  forward(B rows, T tokens, S keys) = 2*L*P_layer*B*T     (trunk matmuls)
                                    + 4*L*d_attn*B*T*S     (QK^T and PV over the whole T x S
                                                            rectangle: the dense masked kernel
                                                            computes it all; S = T without a cache)
  head(n positions) = 2*d*V*n                               (the unembedding matmul)

Train step (B rows; Ts / Tt student / teacher row lengths, R response length):
  student = 3 * (forward(B, Ts, Ts) + head(B*R))    forward + backward = 3x forward; logits only
                                                     at the R positions that predict the response
  teacher = forward(B, Tt, Tt) + head(B*R)           `ema` / `frozen` (the student architecture),
            `external` (the teacher's), twice for `trust_region` (initial and current student);
            non-distillation methods with a reference model (DPO, GRPO with KL) run
            forward(B, Ts, Ts) + head(B*R) on the student rows instead; others have none.
  Extra hardware work beyond the model FLOPs (`TrainFlops.recompute`): the chunked loss
  recomputes the student logits in the backward pass (+head), and remat recomputes every
  layer's forward (+forward(B, Ts, Ts)).
Teacher scoring alone (`teacher_score_flops`): the teacher forwards to the final hidden states
  (the logits are formed inside the loss).
Sampler: prefill = forward(B prompts, Lp, Lp) + head(B) (the prompt attends to itself, written
  into an empty cache; only the last position's logits are taken); one decode step =
  forward(R rows, 1, Lp + N) + head(R) (each new token attends over the whole cache of Lp + N
  slots).
Norms, RoPE, softmax, the loss, sampling, AdamW and the EMA are ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from mopd_jax.models import ModelConfig
from mopd_jax.train_step import StepConfig


@dataclasses.dataclass(frozen=True)
class TrainShape:
  """One train step's rows: B rows of [prompt | response] (student) and [teacher prompt | response]."""

  rows: int
  prompt: int
  teacher_prompt: int
  response: int

  @property
  def student_len(self) -> int:
    return self.prompt + self.response

  @property
  def teacher_len(self) -> int:
    return self.teacher_prompt + self.response


@dataclasses.dataclass(frozen=True)
class TrainFlops:
  student: float  # forward + backward of the student, incl. its LM head at the response positions
  teacher: float  # teacher (or reference-model) forwards, incl. their heads
  recompute: float  # hardware work beyond the model FLOPs (loss-chunk logits, remat layers)

  @property
  def model(self) -> float:
    return self.student + self.teacher


def layer_matmul_params(cfg: ModelConfig) -> int:
  """P_layer: matmul weights of one decoder layer (biases and norms excluded)."""
  d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
  return 2 * d * cfg.num_heads * cfg.head_dim + 2 * d * kv + 3 * d * cfg.intermediate_size


def forward_flops(cfg: ModelConfig, rows: int, tokens: int, keys: Optional[int] = None) -> float:
  """Trunk matmuls and attention of one forward pass over rows x tokens; `keys` per query
  (default `tokens`: a full-sequence call without a cache)."""
  keys = tokens if keys is None else keys
  d_attn = cfg.num_heads * cfg.head_dim
  return (2.0 * cfg.num_layers * layer_matmul_params(cfg) * rows * tokens
          + 4.0 * cfg.num_layers * d_attn * rows * tokens * keys)


def head_flops(cfg: ModelConfig, positions: int) -> float:
  return 2.0 * cfg.hidden_size * cfg.vocab_size * positions


def train_step_flops(cfg: ModelConfig, shape: TrainShape, step: StepConfig = StepConfig(),
                     teacher_cfg: Optional[ModelConfig] = None) -> TrainFlops:
  """The module docstring's train-step count. teacher_cfg: the external teacher's architecture."""
  b, r = shape.rows, shape.response
  head = head_flops(cfg, b * r)
  student_forward = forward_flops(cfg, b, shape.student_len)
  student = 3.0 * (student_forward + head)
  method = step.method
  t_cfg = teacher_cfg if method.external_teacher and teacher_cfg is not None else cfg
  # Teacher-context forwards (distillation: 1, trust region: 2) and a reference forward on the
  # student rows (GRPO with KL, DPO).
  teacher = method.teacher_context_forwards * (forward_flops(t_cfg, b, shape.teacher_len) + head_flops(t_cfg, b * r))
  if method.reference_forward:
    teacher += student_forward + head
  recompute = head + (student_forward if cfg.remat else 0.0)
  return TrainFlops(student=student, teacher=teacher, recompute=recompute)


def teacher_score_flops(cfg: ModelConfig, rows: int, teacher_len: int, step: StepConfig = StepConfig(),
                        teacher_cfg: Optional[ModelConfig] = None) -> float:
  """The teacher side of a distillation step alone, to the final hidden states."""
  t_cfg = teacher_cfg if step.method.external_teacher and teacher_cfg is not None else cfg
  return step.method.teacher_context_forwards * forward_flops(t_cfg, rows, teacher_len)


def prefill_flops(cfg: ModelConfig, prompts: int, prompt_len: int) -> float:
  """One full-sequence forward over the prompts (into an empty cache); logits of the last
  position only."""
  return forward_flops(cfg, prompts, prompt_len) + head_flops(cfg, prompts)


def decode_step_flops(cfg: ModelConfig, rows: int, cache_len: int) -> float:
  """One token for each of `rows` rows, attending over the whole cache."""
  return forward_flops(cfg, rows, 1, cache_len) + head_flops(cfg, rows)
