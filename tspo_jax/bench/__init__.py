"""Throughput measurements behind `python -m tspo_jax.benchmark`, one module per job:

  machine   what we ran on, and its measured memory bandwidth and matmul rate (the limit)
  costs     FLOPs and bytes each measurement must move (the roofline model)
  timing    interleaved repetitions (ours, theirs, ours, theirs), medians, compile time apart
  configs   the benchmark configurations (tiny, 0.5B shape, real checkpoint) and their models
  decode    our jitted sampler vs transformers `generate`
  scripted  a Qwen2 whose greedy output follows a script: identical search episodes for all methods
  searchr1  the Search-R1 episode loop in PyTorch (generate to the limit, cut, retrieve, re-run)
  episodes  interrupt/resume vs re-prefill vs Search-R1 on the same retriever
  torch_ppo the TSPO policy loss and AdamW step written plainly in PyTorch
  update    one jitted policy-update step vs the PyTorch step
  report    the markdown table
"""
