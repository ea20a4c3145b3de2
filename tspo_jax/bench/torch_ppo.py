"""The TSPO policy-update step written plainly in PyTorch: the baseline for `update_step`.

Same loss as tspo_jax.losses with Search-R1's defaults (PPO clip, low-variance KL to the
reference, entropy bonus, token-mean over the loss mask), the next-token logprobs of a
transformers Qwen2ForCausalLM, global-norm gradient clipping and torch.optim.AdamW.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class LossConfig:
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.001
    entropy_coef: float = 0.001


def token_logprobs_and_entropy(model, tokens: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0):
    """[B, T-1] log p(tokens[:, 1:]) and the entropy of each next-token distribution."""
    logits = model(input_ids=tokens, attention_mask=valid.long()).logits[:, :-1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _token_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(logp, old_logp, ref_logp, advantages, mask, entropy, cfg: LossConfig = LossConfig()):
    log_ratio = torch.clamp(logp - old_logp, -20.0, 20.0)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
    pg = torch.maximum(-advantages * ratio, -advantages * clipped)
    loss = _token_mean(pg, mask)
    if cfg.kl_coef:
        d = torch.clamp(ref_logp - logp, -20.0, 20.0)
        loss = loss + cfg.kl_coef * _token_mean(torch.clamp(torch.exp(d) - d - 1.0, -10.0, 10.0), mask)
    if cfg.entropy_coef:
        loss = loss - cfg.entropy_coef * _token_mean(entropy, mask)
    return loss


class TorchPolicyStep:
    """One update: forward, loss, backward, clip to global norm, AdamW."""

    def __init__(self, model, *, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8,
                 grad_clip: float = 1.0, loss: LossConfig = LossConfig()):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.grad_clip = grad_clip
        self.loss_cfg = loss

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logp, entropy = token_logprobs_and_entropy(self.model, batch["tokens"], batch["valid"])
        shift = {k: batch[k][:, 1:] for k in ("old_logp", "ref_logp", "advantages", "loss_mask")}
        return policy_loss(logp, shift["old_logp"], shift["ref_logp"], shift["advantages"], shift["loss_mask"],
                           entropy, self.loss_cfg)

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        return float(loss.detach()), float(norm)


def to_torch(batch: dict[str, np.ndarray], device) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        t = torch.as_tensor(np.asarray(v))
        out[k] = t.long() if k == "tokens" else (t.bool() if k == "valid" else t.float())
    return {k: v.to(device) for k, v in out.items()}
