"""The engine: the per-token mathematics and the sampler every method shares.

targets     the aggregation rules that build the distillation target from teacher and student
objectives  the chunked losses (distillation, clipped policy gradient, cross-entropy)
rollout     KV-cached batched sampling, guided and given rollouts
decoder     the lean Llama-family forward used for sampling and teacher passes
steps       splitting a solution into its steps
budget      what a run may spend and what each step costs, in samples

It imports nothing from the rest of handrail but `errors`.
"""
