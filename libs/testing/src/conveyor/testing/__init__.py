"""Test seams shipped with Conveyor, for its own tests and for its users' tests.

- `conveyor.testing.fake_llm`: a local server that speaks the OpenAI and Anthropic HTTP
  protocols, scriptable per model.
"""
