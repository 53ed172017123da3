"""edgeseek: DeepSeek-style MoE (and dense llama/qwen2) GGUF models on ordinary hardware.

    import edgeseek
    engine = edgeseek.load("model.gguf")
    for r in edgeseek.stream_generate(engine, "Hello", max_tokens=32):
        print(r.text, end="")
"""
import os

# numba's threads run the kernels; a second pool of BLAS threads (numpy's attention products) on
# the same few cores spins against them: decode fell from 9 to 2 tokens/s once those products grew
# past OpenBLAS's threading threshold. Set before numpy loads its BLAS; a caller can override.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import edgeseek` stays cheap (the CLI's --help need not compile kernels).
    if name in ("load", "Engine", "Context"):
        from . import engine
        return getattr(engine, name)
    if name in ("generate_step", "stream_generate", "GenerationResponse", "generate"):
        from . import generation
        return getattr(generation, name)
    if name in ("Sampler", "SamplerConfig"):
        from . import sampler
        return getattr(sampler, name)
    raise AttributeError(f"module 'edgeseek' has no attribute {name!r}")
