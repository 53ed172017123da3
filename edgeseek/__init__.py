"""edgeseek: DeepSeek-style MoE (and dense llama/qwen2) GGUF models on ordinary hardware.

    import edgeseek
    engine = edgeseek.load("model.gguf")
    for r in edgeseek.stream_generate(engine, "Hello", max_tokens=32):
        print(r.text, end="")
"""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import edgeseek` stays cheap (the CLI's --help need not compile kernels).
    if name in ("load", "Engine", "Context"):
        from . import engine
        return getattr(engine, name)
    if name in ("generate_step", "stream_generate", "GenerationResponse", "generate", "BatchGenerator",
                "ContextPool"):
        from . import generation
        return getattr(generation, name)
    if name in ("Sampler", "SamplerConfig"):
        from . import sampler
        return getattr(sampler, name)
    raise AttributeError(f"module 'edgeseek' has no attribute {name!r}")
