"""An OpenAI-compatible multimodal server with batched decoding: ``python -m runtime.serve``.

app.py (HTTP), engine.py (the model's thread, continuous batching over runtime/batching.py),
messages.py (OpenAI messages to DSVL rounds, image limits), textstream.py (stop strings),
metrics.py (Prometheus), ray_app.py (the same app on Ray Serve). See docs/serving.md.
"""
