"""/tokenize and /detokenize."""
from inferd.entrypoints.openai.tokenize.router import router

__all__ = ["router"]
