"""llama.cpp through llama-cpp-python: the native library, the Gemma 3 decoder and tokenizer, the mtmd image encoder."""
