"""handrail: on-policy self-distillation from a privileged teacher."""

__version__ = "0.1.0"
