"""What the `handrail` command runs, one module per subcommand (and what only they use).

train       the training loop: sample prompts, roll out, score, loss, step, log, evaluate, checkpoint
compare     methods side by side at equal rollouts, seeds and learning-rate sweeps
probe       whether the privileged teacher can help a model on some data, before training (probe_html: its page)
pretrain    the lab's small base models
bootstrap   worked solutions for answer-only records
sources     a command's inputs: its held-out problems and its model, 'default' resolved
trl_target  handrail's target inside TRL's SDFT trainer
"""
