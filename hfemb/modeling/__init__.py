"""The EmbeddingModel: a backbone + pooling + prompts; loading and the sentence-transformers layout."""
