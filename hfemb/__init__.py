"""hfemb: fine-tune text-embedding models (Qwen3-Embedding first).

Pipeline: data -> BM25 negative mining -> MultiNegEmbeddingTrainer -> merged model ->
threshold-sweep F1 evaluation -> Hub export. Heavy modules (torch, transformers) are imported lazily
so that `hfemb --help` and the data/mining stages start fast.
"""

__version__ = "0.1.0"
