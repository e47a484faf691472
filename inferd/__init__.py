"""inferd: a readable, vLLM-compatible LLM inference server on PyTorch."""
from inferd.version import __version__

__all__ = ["LLM", "SamplingParams", "PoolingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    # Lazy: `import inferd` stays cheap for the CLI and the API process.
    if name == "LLM":
        from inferd.entrypoints.llm import LLM
        return LLM
    if name in ("SamplingParams", "PoolingParams"):
        import inferd.sampling_params as sp
        return getattr(sp, name)
    if name in ("RequestOutput", "CompletionOutput", "PoolingRequestOutput"):
        import inferd.outputs as o
        return getattr(o, name)
    raise AttributeError(name)
