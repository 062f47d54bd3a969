"""The compute core (torch, transformers; no files, no store, no ray).

divergence  log-probs -> kl / kl_reverse / js: the math, defined once
adapter     where a model keeps its blocks, final norm and head
probes      what each probe does to one block
engine      model + prompts -> KL matrices (generation, trace, layer sweep)
models      finding and loading models (the only module here that reads weights)
steering    steering vectors: from files or from prompt sets (reads and writes files)
"""
