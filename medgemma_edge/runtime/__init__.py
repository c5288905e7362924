"""The runtime: prompts, caches, composition through embeddings, generation, chat, loading, memory and audit."""
