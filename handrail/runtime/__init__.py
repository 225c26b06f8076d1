"""Running a model: loading and saving it, evaluating it, checkpoints, processes and threads.

models      loading (HF folder, GGUF, LoRA), saving, hidden states for the chunked loss
evaluate    sampling a model on records and scoring it (pass@1 strict and lenient, leak)
checkpoint  atomic checkpoints and their restore
parallel    one process, DDP or FSDP2: preparing, clipping, saving optimizer state
sharding    FSDP2's sharding of a model
cpu         glibc malloc settings that keep a CPU training step from faulting in fresh memory
"""
