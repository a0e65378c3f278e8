"""DeepSeek-V3 model: config, MLA with a paged latent cache, noaux_tc MoE, HF checkpoint loading, tokenizer.

Kept import-free so `wideep --help` stays fast: import `wideep.model.loader.load_model`,
`wideep.model.attention.AttentionMetadata`, `wideep.model.tokenizer.Tokenizer` directly.
"""
