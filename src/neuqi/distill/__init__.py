"""Lightweight distillation of a packed model: train scales, zero-points and norms, codes frozen (spec §6, §11.10).

Student: a model with ``QuantLinear`` layers (codes q, fp16 s and Z); teacher: the original model. Only s, Z
and (by default, as in the reference) the norm weights train: Ŵ = s·(q − Z), ∂L/∂s = Σ_group ∂L/∂Ŵ·(q − Z),
∂L/∂Z = −s·Σ_group ∂L/∂Ŵ.

Losses on windows (B, T): ``kl`` (the default) = KL(p_T ‖ p_S) of the next-token distributions averaged over
the B·T positions, with logits built and back-propagated ``kl_chunk`` positions at a time; ``mse`` (the
reference's) = mean over all B·T·H elements of (h_T − h_S)², h = the last hidden state after the final norm.
On SmolLM2 the KL loss beat the MSE at every setting measured (2.5 bpw: 44.69 against 52.44 WikiText-2 PPL).

Precision: every trained tensor has an fp32 master ``nn.Parameter`` whatever the model dtype (the reference
ran AdamW on bf16 tensors, where a 3e-4 step vanishes once |Z| ≥ 0.125; spec §6). While training, each
QuantLinear is swapped for a stand-in holding the masters and its unpacked codes (1 byte/weight); matmuls
run under autocast in ``compute_dtype`` (bf16 ≈ 4x the fp32 matmul speed on an AVX512-BF16 CPU). At the end
the masters are rounded to fp16 (``grid.to_storage``) into the QuantLinear buffers: the packed model and its
saved checkpoint hold exactly what inference uses.

Teacher targets are cached by default: one no-grad pass stores h_T, (n, T, H) fp32 on the CPU (75 MB for
64×512 SmolLM2 windows, 8.6 GB for 256×2048 on a 7B model); the teacher then goes back where it was and extra
epochs reuse the targets (``kl`` keeps a copy of its lm_head on the device). So a 2-bit 7B student fits one
24 GB GPU with per-decoder-layer gradient checkpointing (~13 GB: codes 1.6 packed + 6.5 unpacked, masters and
AdamW 1.8, fp16 embeddings and head 0.5, activations). ``cache_teacher=False`` runs the teacher every step.

On purpose unlike the reference: the student runs in eval mode (deterministic, no dropout); biases and
embeddings are frozen, norm weights too unless ``train_norms`` (the reference trained them: nothing froze
them); scales are clamped to ≥ ``grid.MIN_SCALE`` after each step (storable); warmup is lr·(t+1)/w over
w = ceil(warmup_ratio·steps) steps, then cosine to 0 (HF's first step has lr 0).

Modules: ``config`` (DistillConfig, DistillHistory), ``masters`` (the fp32 master tensors and the trainable
stand-in layer), ``train`` (teacher targets, losses, the training loop ``distill``).
"""

from __future__ import annotations

from .config import COMPUTE_DTYPES, CONFIG_VERSION, LOSSES, DistillConfig, DistillHistory, resolve_compute_dtype
from .masters import MasterWeights, norm_modules
from .train import distill, final_hidden, layer_checkpointing, teacher_targets

__all__ = ["COMPUTE_DTYPES", "CONFIG_VERSION", "LOSSES", "DistillConfig", "DistillHistory", "MasterWeights",
           "distill", "final_hidden", "layer_checkpointing", "norm_modules", "resolve_compute_dtype",
           "teacher_targets"]
