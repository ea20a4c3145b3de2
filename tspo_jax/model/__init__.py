"""Models: the Qwen2.5 policy and the BERT-family retrieval encoder."""
