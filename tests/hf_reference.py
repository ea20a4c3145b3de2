"""Shared helpers for tests that compare against the Hugging Face PyTorch Qwen2."""

import numpy as np
import torch
import transformers


def tiny_hf_config(tie: bool, **kw) -> transformers.Qwen2Config:
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        use_sliding_window=False,
    )
    base.update(kw)
    cfg = transformers.Qwen2Config(**base)
    cfg._attn_implementation = "eager"
    return cfg


def random_hf_model(cfg, seed: int = 0) -> transformers.Qwen2ForCausalLM:
    """An HF Qwen2 with every tensor random (HF initialises biases and norms to constants)."""
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    kw = {}
    if mask is not None:
        # Positions that skip left padding, as generate() computes them.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw["position_ids"] = pos
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits.float().numpy()
