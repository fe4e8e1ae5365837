"""Held-out evaluation of a fine-tune against its base model (`python -m ftdist.eval RUN_DIR`).

metrics: generation metrics (exact match, numeric answer, token F1, ...) of one response;
generation: batched generation, sharded or not, and the generations file; perplexity:
token-weighted perplexity on reference text (forgetting); harness: lm-evaluation-harness;
runner: base and tuned models through the run's objective; report: report.json/md/html.
"""
