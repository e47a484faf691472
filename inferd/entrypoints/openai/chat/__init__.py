"""/v1/chat/completions: OpenAI chat completions, with tools and reasoning."""
from inferd.entrypoints.openai.chat.router import router

__all__ = ["router"]
