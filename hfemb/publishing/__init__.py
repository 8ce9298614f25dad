"""Publishing: model card, Hub push, training-curve plots, the embeddings server."""
