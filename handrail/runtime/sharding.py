"""Sharded training (`fsdp: true` under torchrun): torch's fully_shard (FSDP2) on the policy.

What is sharded is what grows with training: the trainable weights, their gradients and AdamW's
two moments, split across processes; each decoder layer is gathered only for its own forward and
backward. What runs outside the training forward — sampling, a live teacher's pass, evaluation,
saving — reads `rollout_lm`, a plain full copy of the weights on every process, refreshed from
the shards after each optimizer step. That copy is the seam where a separate inference engine
would sit (README: "Roadmap"); it costs one set of weights per process, against the
four (weights, gradients, two moments) that unsharded data-parallel training keeps.

accelerate does not set FSDP up on the CPU (it reports no distributed type there), so this calls
torch directly; it runs on the CPU with gloo and on GPUs with nccl alike. Gradient clipping and
the optimizer see DTensors. A checkpoint's weights are the full copy; its optimizer state is
written shard by shard by every process (torch.distributed.checkpoint), never gathered whole on
one, and read back on any number of processes, sharded or not (`load_optimizer`).
"""

from __future__ import annotations

import copy

import torch

from handrail.errors import UsageError


class Shards:
    """The sharded policy (sharded in place by the constructor) and its full-weight copy for
    sampling, with what the loop needs of them: refresh, gradient clipping, optimizer state."""

    def __init__(self, policy, mixed_precision: str = "no"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self.policy = policy
        self.rollout_lm = copy.deepcopy(policy.lm).eval()  # before sharding: plain tensors
        self.rollout_lm.requires_grad_(False)
        self._full = dict(self.rollout_lm.named_parameters())
        device = next(policy.parameters()).device
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if mixed_precision == "bf16" else MixedPrecisionPolicy()
        for layer in decoder_layers(policy.lm):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(policy, mesh=mesh, mp_policy=mp)  # the rest (embeddings, final norm, head) as one group

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the sharded weights into rollout_lm (one all-gather per weight, on every process)."""
        for name, p in self.policy.named_parameters():
            self._full[name.removeprefix("lm.")].copy_(_full(p))

    def clip_grad_norm_(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.policy.parameters() if p.grad is not None], max_norm)
        return float(_full(norm))

    def save_optimizer(self, opt, folder) -> None:
        """Each process writes its shards of the optimizer state under folder (a collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(self.policy, opt)}, checkpoint_id=str(folder))

    def load_optimizer_state(self, opt, state: dict) -> None:
        """A full optimizer state (an unsharded run's optimizer.pt), split into this process's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.policy, opt, by_name(self.policy, state),
                                 options=StateDictOptions(full_state_dict=True))


def load_optimizer(policy, opt, folder) -> None:
    """Read a sharded run's optimizer state (Shards.save_optimizer) into opt, whatever the number
    of processes now and whether policy is sharded: each process reads the parts it holds."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    template = {"optimizer": get_optimizer_state_dict(policy, opt)}  # shapes and placements to fill
    dcp.load(template, checkpoint_id=str(folder))
    set_optimizer_state_dict(policy, opt, template["optimizer"])


def decoder_layers(lm) -> list:
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if layers is None:
        raise UsageError(f"config key 'fsdp': cannot find the decoder layers of {type(lm).__name__} "
                         f"(expected model.layers)")
    return list(layers)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def by_name(policy, state: dict) -> dict:
    """An optimizer state dict keyed by parameter name; one keyed by position (what an unsharded
    run's optimizer.state_dict() writes) is translated through the policy's parameter order."""
    return state if _named(state) else _rekey(state, dict(enumerate(_trainable(policy))))


def by_position(policy, state: dict) -> dict:
    """The inverse of by_name, for an unsharded run resuming a sharded run's checkpoint."""
    return _rekey(state, {n: i for i, n in enumerate(_trainable(policy))}) if _named(state) else state


def _named(state: dict) -> bool:
    # read from the groups, which always list every parameter (the per-parameter state is empty
    # until a step has been taken)
    return isinstance(state["param_groups"][0]["params"][0], str)


def _trainable(policy) -> list[str]:
    return [n for n, p in policy.named_parameters() if p.requires_grad]


def _rekey(state: dict, key: dict) -> dict:
    return {"state": {key[k]: s for k, s in state["state"].items()},
            "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in state["param_groups"]]}
