"""The benchmark model's shape: Llama-3.1-8B (32 layers, 32 query / 8 KV heads, head dim
128, hidden 4096, intermediate 14336; its config.json on the Hugging Face hub), built with
random bf16 weights. Kept free of service imports: the kvpress peer imports it under an
older transformers."""

LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    max_position_embeddings=135168,
    tie_word_embeddings=False,
)
