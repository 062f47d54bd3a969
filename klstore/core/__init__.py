"""The compute core (torch, transformers; no files, no store, no ray).

divergence  log-probs -> kl / kl_reverse / js: the math, defined once
adapter     where a model keeps its blocks, final norm and head
probes      what each probe does to one block
runtime     a loaded model as the engine's passes call it (ModelRuntime)
generation  prompt text -> token ids -> the clean continuation
tracing     the continuation -> its clean trace: every block's output, P_t
sweeps      trace + probe -> final residual states per layer (the layer sweep)
unembed     the fused head pass: final states -> each cell's numbers, vocabulary-chunked
readout     final states -> cell numbers -> KLMatrix (fused or row-chunked head pass)
engine      model + prompts -> KL matrices: composes runtime .. readout, returns per-prompt outcomes
models      finding and loading models (the only module here that reads weights)
steering    steering vectors: from files or from prompt sets (reads and writes files)
"""
