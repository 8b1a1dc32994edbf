"""LLM steps: provider calls, and the rate limiter they share (``llm.ratelimit``)."""
