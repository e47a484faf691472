"""/v1/completions: OpenAI text completions."""
from inferd.entrypoints.openai.completions.router import router

__all__ = ["router"]
