"""Hypergradients of a model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

EvoGrad (Bohdal, Yang, Hospedales, NeurIPS 2021, arXiv 2106.10575) needs only forward passes of the
base model at perturbed parameters and one ordinary backward pass, so it runs on a model whose
parameters θ are split over N ranks (each rank holds the rows [a_r, b_r) of every parameter's dim 0)
without ever holding a whole copy of θ. One meta step, with λ the hyperparameters:

    ε_k = σ·s_k,   s_k[p, i] = ±1 (or N(0, 1)) from a hash of (seed_k, name of p, global index i)
    ℓ_k(λ) = L_train(θ + ε_k, λ)                    θ + ε_k made in FSDP's all-gather buffer
    w = softmax(−ℓ/τ),   θ* = θ + Σ_k w_k ε_k        the same way
    g = ∇_θ L_val(θ*)  (sharded, from FSDP's reduce-scatter),   d_k = ⟨ε_k, g⟩ = Σ_r ⟨ε_k, g⟩_shard r
    dL_val(θ*)/dλ = Σ_k (∂L_val/∂ℓ_k) ∂ℓ_k/∂λ + ∂L_val/∂λ,
    ∂L_val/∂ℓ_k = −(w_k/τ)(d_k − Σ_j w_j d_j)       (the Jacobian of softmax(−ℓ/τ))

the same value as ``common.evograd.evograd_hypergrad_low_memory`` with
``noise_addressing="index"`` on the unsharded model (tested to 1e-6 relative in float64).

Index-addressed noise. ``CandidateNoise`` draws ε_k as one stream over a parameter, so element i's
value depends on everything drawn before it: a rank holding rows [a_r, b_r) could not draw its part
without drawing the whole tensor. ``IndexedNoise`` computes every element from its own global
index with a counter-based hash (splitmix64, integer ops only), so a shard's noise is the
corresponding slice of the unsharded noise whatever the split, and is the same on a CPU and a GPU.

Data: like FSDP itself, every rank runs its own part of each batch and the losses are the mean over
ranks, L = (1/N) Σ_r l_r. The loss callables take no argument (they run the sharded module's own
forward on this rank's data) and return l_r. λ is replicated (a tensor of the caller's or the
parameters of a submodule left out of sharding with ``shard_model(..., ignored_params=...)``); its
gradient is averaged over ranks, identical on every rank.

How a pass sees θ + δ without θ being written (``_Perturbation``). FSDP2 gathers a block's
parameters by copying each rank's shards into one flat buffer and all-gathering it. The meta step
replaces that all-gather (``FSDPModule.set_custom_all_gather``) by one that first adds δ to this
rank's part of the buffer, one parameter's δ at a time: every parameter gathered for a forward or
a backward is then θ + δ, while the shard itself is never written, so nothing has to be saved or
restored and θ comes out of the meta step bit for bit as it went in. (θ ← (θ + ε) − ε would not do:
floating-point addition rounds, so it differs from θ in the last bits wherever θ and ε differ in
exponent, e.g. θ = 1e-5, ε = 1e-3 in float32 loses about 7 of θ's 24 bits.) A backward gathers a
block again, so δ is computed again there. FSDP2 keeps the root module's parameters gathered after
a forward (it expects a backward next), so every change of δ first reshards the whole model: no
pass runs on values gathered for the one before. FSDP's own all-gather is put back when the step ends.
Without a collective (a plain module under no process group, or a mesh of one rank, where FSDP
copies the shard without an all-gather) θ is shifted in place and restored from a copy instead.

Memory per rank (|θ| parameter elements, N ranks, K candidates, |λ| hyperparameter elements):
no copy of θ's shard; of the validation backward's gradient, one FSDP group's shards at a time (a
hook dots each shard with ε_k as the reduce-scatter delivers it, then drops it: the whole sharded
gradient, |θ|/N, is never held); one parameter's noise at a time (its shard, hashed in chunks of
2^18 elements), at each gather and at each dot; K·|λ| for the candidates' gradients into λ; one
loss graph at a time; the parameters FSDP gathers for the block that is running, and their
unsharded gradients during the backward; a copy of the model's buffers. A plain sharded training
iteration holds its whole sharded gradient at the end of its backward: measured, the EvoGrad
iteration peaks at 0.98-1.01× of the plain one per rank on ResNet-32 (docs/multi_device.md).

BatchNorm: the passes run the module's own forward, so in training mode each normalises with its
rank's batch statistics (as FSDP training does; the sharded hypergradient then legitimately
differs from the whole-batch one, as under ``common.distributed``), and the running statistics
are restored after the meta step, as ``functional_forward`` leaves them unchanged. Communication beyond FSDP's own
all-gathers and reduce-scatter: one broadcast of K seeds, all-reduces of the K losses, of the K
dot products d_k, of the validation loss and of λ's gradient (|λ| numbers): nothing of θ's size.

The finite-difference and SAMA estimators (``common.estimators``, ``common.implicit``) use the same
pattern for their steps θ − ηg and θ ± εv: g and v are sharded like θ, and the step is added in the
all-gather buffer. The estimators that backpropagate through a backward pass (second_order,
unrolled, multistep, cg, neumann) are refused (``check_fsdp_estimator``).

Checkpoints (``save_sharded_checkpoint``, ``load_sharded_checkpoint``): every rank writes and reads
its own shards of the model and of its optimiser's state with ``torch.distributed.checkpoint``;
rank 0's ``<name>.pt`` holds the replicated rest and names the shards' folder, so replacing it is
the commit point. ``gathered_checkpoint`` reads one back whole in a single process.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Replicate, Shard

from common.distributed import barrier, is_distributed, is_main_process, mean_over_ranks, sum_over_ranks
from common.evograd import (NOISE_KINDS, EvoGradOutput, _prepare, candidate_weights, check_hyperparams,
                            check_finite_losses, scalar_loss)
from common.implicit import _accumulate, _check_number, optimizer_preconditioner
from common.precision import full_precision
from common.results import RESTART_FIX, RunFileError, resume_checkpoint, save_checkpoint

LocalLossFn = Callable[[], Tensor]

# splitmix64 (Steele, Lea, Flood 2014): state_i = key + (i + 1)·γ, output = mix(state_i), mod 2^64
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1
_NOISE_CHUNK = 1 << 18  # elements hashed at a time by element_noise


def _as_int64(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 ``z`` (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix_(z: Tensor) -> Tensor:
    """splitmix64's output function on an int64 tensor, in place (wrap-around multiplication = mod 2^64).

    In place with one temporary: the noise of a shard is hashed many times per meta step, and
    every fresh temporary costs an allocation and its page faults.
    """
    shifted = torch.empty_like(z)
    for bits, multiplier in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, bits, out=shifted)
        z.bitwise_xor_(shifted.bitwise_and_((1 << (64 - bits)) - 1))  # logical shift: the sign bits cleared
        if multiplier is not None:
            z.mul_(_as_int64(multiplier))
    return z


def _mix_int(z: int) -> int:
    """``_mix`` on one unsigned Python integer (for keys)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def tensor_key(seed: int, name: str) -> int:
    """64-bit key of (seed, parameter name): mix(seed ⊕ mix(blake2b_64(name)))."""
    name_hash = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")
    return _mix_int(int(seed) ^ _mix_int(name_hash))


def hashed_bits(key: int, offset: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """splitmix64 outputs of the stream ``key`` at indices offset..offset+numel−1, int64 [numel].

    Element i is mix(key + (i + 1)·γ mod 2^64), a function of (key, i) alone.
    """
    index = torch.arange(offset + 1, offset + numel + 1, dtype=torch.int64, device=device)
    return _mix_(index.mul_(_as_int64(_GAMMA)).add_(_as_int64(key)))


def element_noise(seed: int, name: str, offset: int, numel: int, kind: str,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """Unit noise of elements offset..offset+numel−1 (flat, row-major) of parameter ``name``, shape [numel].

    ``kind="sign"``: s_i = +1 where the top bit of the hash is 0, −1 where it is 1 (the law of
    sign(N(0, 1))). ``kind="gaussian"``: Box–Muller, s_i = √(−2 ln u_i) cos(2π v_i) with u_i, v_i
    uniform on (0, 1] from the top 53 bits of two independent streams of (seed, name), computed
    in float64.

    Raises:
        ValueError: on an unknown kind or a negative offset or count.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
    if offset < 0 or numel < 0:
        raise ValueError(f"offset and numel must be >= 0, got {offset} and {numel}")
    key = tensor_key(seed, name)
    out = torch.empty(numel, dtype=dtype, device=device)
    # in chunks: the hash's int64 (and Box–Muller's float64) temporaries stay a few MB for any tensor
    for start in range(0, numel, _NOISE_CHUNK):
        count = min(_NOISE_CHUNK, numel - start)
        bits = hashed_bits(key, offset + start, count, device)
        if kind == "sign":  # 1 − 2·[bits < 0]: −1 where the top bit is set
            out[start:start + count].copy_(bits.lt(0)).mul_(-2).add_(1)
            continue
        other = hashed_bits(_mix_int(key ^ _GAMMA), offset + start, count, device)
        out[start:start + count] = (-2 * _uniform(bits).log()).sqrt() * torch.cos(2 * math.pi * _uniform(other))
    return out


def _uniform(z: Tensor) -> Tensor:
    """(0, 1] from the top 53 bits of int64 hashes, in float64."""
    return (_shift_right(z, 11) + 1).to(torch.float64) * 2.0 ** -53


class IndexedNoise:
    """ε_k with element i of parameter p a function of (seed_k, p's name, i) only.

    Same interface as ``common.evograd.CandidateNoise`` (``seeds``, ``sigma``, ``kind``, ``len``,
    ``sample(k, like)``). ``names[j]`` and ``offsets[j]`` describe the j-th tensor of ``like``: the
    parameter it belongs to and the flat index of its first element in the unsharded parameter
    (0 for a whole parameter; a shard's offset from ``local_shard``), so a shard gets exactly its
    slice of the unsharded noise.
    """

    def __init__(self, seeds: Sequence[int], sigma: float, kind: str, names: Sequence[str],
                 offsets: Sequence[int] | None = None) -> None:
        if kind not in NOISE_KINDS:
            raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
        self.seeds = [int(s) for s in seeds]
        self.sigma = float(sigma)
        self.kind = kind
        self.names = list(names)
        self.offsets = [0] * len(self.names) if offsets is None else [int(o) for o in offsets]
        if len(self.offsets) != len(self.names):
            raise ValueError(f"{len(self.names)} names but {len(self.offsets)} offsets")

    def __len__(self) -> int:
        return len(self.seeds)

    def sample(self, k: int, like: Iterable[Tensor]) -> list[Tensor]:
        """ε_k for every tensor in ``like`` (shapes, dtypes and devices of ``like``; order of ``names``)."""
        like = list(like)
        if len(like) != len(self.names):
            raise ValueError(f"noise for {len(self.names)} tensors asked for {len(like)}")
        return [self.sample_one(k, j, ref) for j, ref in enumerate(like)]

    def sample_one(self, k: int, j: int, like: Tensor) -> Tensor:
        """ε_k of the j-th tensor alone (shape, dtype and device of ``like``): one tensor's noise in memory."""
        return (element_noise(self.seeds[k], self.names[j], self.offsets[j], like.numel(), self.kind, like.dtype,
                              like.device).mul_(self.sigma).view(like.shape))


# ---------------------------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------------------------

def shard_model(module: nn.Module, blocks: Sequence[nn.Module], mesh=None,
                ignored_params: Iterable[nn.Parameter] = ()) -> nn.Module:
    """``fully_shard`` every block of ``blocks``, then the root ``module``; returns ``module``.

    Each block's parameters are gathered only while the block runs; the root holds the rest.
    ``mesh`` defaults to a 1-D mesh over all ranks (``init_device_mesh("cpu", (N,))`` under gloo,
    ``"cuda"`` under nccl). ``ignored_params`` stay whole and replicated (e.g. hyperparameters λ
    that live inside the network); the caller keeps them identical across ranks.

    Raises:
        ValueError: without a process group, or if a block is the root or not a submodule of it.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard_model needs an initialised torch.distributed process group")
    inside = {id(m) for m in module.modules()}
    for block in blocks:
        if block is module or id(block) not in inside:
            raise ValueError(f"every block must be a proper submodule of the model, got {type(block).__name__}")
    if mesh is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    ignored = set(ignored_params)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored or None)
    fully_shard(module, mesh=mesh, ignored_params=ignored or None)
    return module


def local_shard(param: Tensor) -> tuple[Tensor, int]:
    """(this rank's part of ``param``, flat index of its first element in the whole parameter).

    A plain tensor is its own part (offset 0). A DTensor must live on a 1-D mesh and be
    ``Replicate`` (offset 0) or ``Shard(0)``, FSDP2's default: rank r of N holds rows
    [min(r·c, d0), min((r+1)·c, d0)) with c = ⌈d0/N⌉ (``torch.chunk``'s split, so the last ranks
    may hold fewer rows, or none; FSDP's padding is not part of the local tensor).

    Raises:
        ValueError: for another placement or mesh, or a local shape that does not match the split.
    """
    if not isinstance(param, DTensor):
        return param.detach(), 0
    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(f"only 1-D meshes are supported, got placements {placements}")
    with torch.no_grad():
        local = param.to_local()
    if isinstance(placements[0], Replicate):
        return local, 0
    if not (isinstance(placements[0], Shard) and placements[0].dim == 0) or param.dim() == 0:
        raise ValueError(f"only dim-0 sharding (FSDP2's default) is supported, got {placements[0]}")
    rows, world = param.shape[0], param.device_mesh.size()
    coordinate = param.device_mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("this rank is not part of the parameter's device mesh")
    chunk = -(-rows // world)
    first, last = min(coordinate[0] * chunk, rows), min((coordinate[0] + 1) * chunk, rows)
    if tuple(local.shape) != (last - first, *param.shape[1:]):
        raise ValueError(f"local shard of shape {tuple(local.shape)} does not match rows [{first}, {last}) "
                         f"of {tuple(param.shape)}")
    return local, first * math.prod(param.shape[1:])


def _reshard(model: nn.Module) -> None:
    """Free every gathered parameter of every FSDP2 module (the root keeps its own after a forward)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def base_params(model: nn.Module, hyperparams: Sequence[Tensor]) -> dict[str, Tensor]:
    """θ: the model's parameters that require grad and are not hyperparameters, by name.

    Under a process group every one of them must be a DTensor (sharded by ``fully_shard``): a
    replicated plain parameter would get a rank-local gradient from the backward pass.

    Raises:
        ValueError: if none is left, or (process group) one is not a DTensor.
    """
    _reshard(model)
    hyper_ids = {id(h) for h in hyperparams}
    theta = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in hyper_ids}
    if not theta:
        raise ValueError("the model has no parameter that requires grad besides the hyperparameters")
    if is_distributed():
        plain = [n for n, p in theta.items() if not isinstance(p, DTensor)]
        if plain:
            raise ValueError(f"parameter {plain[0]!r} is not sharded by fully_shard; shard the model with "
                             "shard_model, or pass it among the hyperparameters")
    return theta


def _locals(theta: dict[str, Tensor]) -> list[Tensor]:
    """This rank's shards of θ (views of FSDP's storage: writing them changes the model)."""
    return [local_shard(p)[0] for p in theta.values()]


# add_step(j, target): target += δ_j in place, target shaped like θ_j's shard on this rank
AddStep = Callable[[int, Tensor], None]


class _GatherWithStep:
    """FSDP2's all-gather of one parameter group, with δ added to this rank's part of the buffer first.

    FSDP copies every shard of the group into one flat buffer (``padded`` elements per parameter,
    the shard's own ``len(shape)`` rows first, padding after) and gathers it; adding δ there makes
    every gathered parameter θ + δ while the shard itself stays θ. Where FSDP gathers in another
    dtype than the shard's (``MixedPrecisionPolicy(param_dtype=...)``: the buffer holds the shard
    cast), the part is overwritten with θ + δ made in the shard's dtype, then cast: what FSDP would
    gather from a shard written in place. Implements FSDP2's ``AllGather`` comm interface
    (``FSDPModule.set_custom_all_gather``) around the comm it replaces.
    """

    def __init__(self, perturbation: _Perturbation, slots: list[tuple[int | None, int, torch.Size]],
                 dtype: torch.dtype, inner) -> None:
        self.perturbation, self.slots, self.dtype, self.inner = perturbation, slots, dtype, inner
        self.numel = sum(padded for _, padded, _ in slots)

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group, async_op: bool = False):
        add_step = self.perturbation.add_step
        if add_step is not None:
            if input_tensor.numel() != self.numel or input_tensor.dtype != self.dtype:
                raise RuntimeError(f"FSDP's all-gather buffer ({input_tensor.numel()} {input_tensor.dtype}) is not "
                                   f"the group's shards ({self.numel} {self.dtype}): this torch's FSDP2 lays it out "
                                   "otherwise than common.fsdp expects")
            with torch.no_grad():
                start = 0
                for j, padded, shape in self.slots:
                    if j is not None:
                        part, shard = input_tensor[start:start + shape.numel()].view(shape), self.perturbation.shards[j]
                        if part.dtype == shard.dtype:
                            add_step(j, part)
                        else:  # one tensor's shard in its own dtype, for the time of this copy
                            shifted = shard.clone()
                            add_step(j, shifted)
                            part.copy_(shifted)
                    start += padded
        return self.inner(output_tensor=output_tensor, input_tensor=input_tensor, group=group, async_op=async_op)


class _Perturbation:
    """Lets a meta step's passes run at θ + δ without writing θ where FSDP gathers it.

    ``set(add_step)`` makes every following forward and backward see θ + δ (δ from ``add_step``,
    one tensor's part at a time); ``set(None)``, θ again. A parameter sharded over more than one
    rank gets δ in FSDP's all-gather buffer (``_GatherWithStep``): its shard is never written, so
    nothing has to be saved to restore it bit for bit, and δ is computed again at each gather (the
    backward gathers a block again). Any other parameter of θ (a plain module, a mesh of one rank,
    where FSDP gathers nothing) is shifted in place and restored from a copy made here.
    """

    def __init__(self, model: nn.Module, theta: dict[str, Tensor]) -> None:
        from torch.distributed.fsdp import FSDPModule

        self.model, self.add_step = model, None
        self.shards = _locals(theta)  # views of this rank's shards (shapes and offsets for the steps)
        index = {id(p): j for j, p in enumerate(theta.values())}
        gathered, self.replaced = set(), []
        groups = [(module, group) for module in model.modules() if isinstance(module, FSDPModule)
                  for group in module._get_fsdp_state()._fsdp_param_groups]
        try:
            for module, group in groups:
                params = [fp.sharded_param for fp in group.fsdp_params]
                if not any(id(p) in index for p in params) or params[0].device_mesh.size() == 1:
                    continue  # no θ here, or a one-rank shard FSDP copies without a collective (in place below)
                # the dtype FSDP gathers each parameter in (MixedPrecisionPolicy casts floating-point ones)
                dtypes = {fp.mp_policy.param_dtype if fp.mp_policy.param_dtype and p.is_floating_point() else p.dtype
                          for fp, p in zip(group.fsdp_params, params)}
                if len(dtypes) != 1:
                    raise ValueError("a sharded hypergradient needs each FSDP group's parameters gathered in one "
                                     f"dtype, got {sorted(map(str, dtypes))}: shard parameters of other dtypes in "
                                     "groups of their own")
                if any(hasattr(p.to_local(), "fsdp_pre_all_gather") for p in params):
                    raise ValueError("a sharded hypergradient cannot perturb parameters with an FSDP2 all-gather "
                                     "extension (fsdp_pre_all_gather)")
                slots = [(index.get(id(p)), fp.padded_sharded_param_size.numel(), torch.Size(fp.sharded_size))
                         for fp, p in zip(group.fsdp_params, params)]
                gathered.update(j for j, _, _ in slots if j is not None)
                self.replaced.append((group, group._all_gather_comm))
                module.set_custom_all_gather(_GatherWithStep(self, slots, dtypes.pop(), group._all_gather_comm))
            if isinstance(model, FSDPModule):
                # FSDP's lazy setup (at the first forward) reads which parameters require grad to choose the
                # dtype gradients are cast back to; the candidate passes freeze θ, so it must not happen there
                model._get_fsdp_state()._lazy_init()
        except BaseException:
            self._put_back_all_gathers()
            raise
        self.in_place = {j: self.shards[j].clone() for j in range(len(theta)) if j not in gathered}

    def set(self, add_step: AddStep | None) -> None:
        """From now on the passes see θ + δ (``add_step``) or, for None, θ."""
        _reshard(self.model)  # nothing gathered at the previous θ + δ may serve the next pass
        with torch.no_grad():
            for j, copy in self.in_place.items():
                self.shards[j].copy_(copy)
                if add_step is not None:
                    add_step(j, self.shards[j])
        self.add_step = add_step
        # a caller's torch.autocast weight cache would serve the old values to the next pass
        # (common.precision's autocast keeps none)
        torch.clear_autocast_cache()

    def close(self) -> None:
        """θ again, and FSDP's own all-gathers back."""
        try:
            self.set(None)
        finally:
            self._put_back_all_gathers()

    def _put_back_all_gathers(self) -> None:
        for group, comm in self.replaced:
            group._all_gather_comm = comm
        self.replaced = []


def _noise_step(noise: IndexedNoise, terms: Sequence[tuple[int, Tensor | None]]) -> AddStep:
    """δ = Σ_(k, c) c·ε_k (c None: 1), added term by term: one tensor's noise in memory at a time."""
    def add(j: int, target: Tensor) -> None:
        for k, scale in terms:
            step = noise.sample_one(k, j, target)
            target.add_(step if scale is None else step.mul_(scale.to(step.dtype)))
    return add


def _tensor_step(steps: Sequence[Tensor]) -> AddStep:
    """δ_j = steps[j] (shaped like θ_j's shard)."""
    return lambda j, target: target.add_(steps[j])


@contextlib.contextmanager
def _meta_step(model: nn.Module, theta: dict[str, Tensor], hyperparams: Sequence[Tensor]) -> Iterator[_Perturbation]:
    """Yields the step's ``_Perturbation``; on exit θ, the ``.grad`` of θ and λ and the buffers are as before.

    Inside, ``.grad`` of θ and λ starts as None, so each backward's gradients can be read alone.
    The buffers (BatchNorm's running statistics; small, and not sharded by FSDP) are copied: the
    passes here run the module's own forward, which in training mode would update them once per
    pass, where ``functional_forward`` in the unsharded estimators leaves them unchanged.
    """
    perturbation = _Perturbation(model, theta)  # first: it may refuse the model, with nothing yet changed
    buffers = [(b, b.clone()) for b in model.buffers()]
    grads = [(t, t.grad) for t in [*theta.values(), *hyperparams]]
    for t, _ in grads:
        t.grad = None
    try:
        yield perturbation
    finally:
        perturbation.close()
        with torch.no_grad():
            for buffer, copy in buffers:
                buffer.copy_(copy)
        for t, grad in grads:
            t.grad = grad


@contextlib.contextmanager
def frozen(params: Iterable[Tensor]) -> Iterator[None]:
    """Within the block, the parameters that required grad do not (θ: forward passes build a graph
    into λ only, and FSDP reduces nothing; FSDP2 copies the flag to the gathered parameters)."""
    thawed = [p for p in params if p.requires_grad]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)


def _grads_into(loss: Tensor, hyperparams: Sequence[Tensor]) -> list[Tensor]:
    grads = torch.autograd.grad(loss, list(hyperparams), allow_unused=True)
    return [torch.zeros_like(h) if g is None else g for g, h in zip(grads, hyperparams)]


def _backward(model: nn.Module, loss: Tensor, theta: dict[str, Tensor],
              hyperparams: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """(∇_θ L shards, rank-local ∂l_r/∂λ) from one ordinary backward; clears the ``.grad`` it wrote.

    FSDP's reduce-scatter averages θ's gradient over ranks: ∇_θ (1/N) Σ_r l_r. λ's gradient is this
    rank's own; the callers average their combination of them once.
    """
    with full_precision():
        loss.backward()
    _reshard(model)
    theta_grads = [torch.zeros_like(local) if p.grad is None else local_shard(p.grad)[0]
                   for p, local in zip(theta.values(), _locals(theta))]
    return theta_grads, _take_hyper_grads(theta, hyperparams)


def _take_hyper_grads(theta: dict[str, Tensor], hyperparams: Sequence[Tensor]) -> list[Tensor]:
    """λ's ``.grad`` after a backward (zeros where none), then every ``.grad`` of θ and λ cleared."""
    hyper_grads = [torch.zeros_like(h) if h.grad is None else h.grad for h in hyperparams]
    for t in [*theta.values(), *hyperparams]:
        t.grad = None
    return hyper_grads


def _backward_noise_dots(model: nn.Module, loss: Tensor, theta: dict[str, Tensor], hyperparams: Sequence[Tensor],
                         noise: IndexedNoise, like: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """([⟨∇_θ L, ε_k⟩ summed over ranks for k], rank-local ∂l_r/∂λ) from one backward, float64 [K].

    ∇_θ L is never held whole: a hook on each parameter takes its gradient shard as soon as it is
    accumulated (after FSDP's reduce-scatter), dots it with ε_k of that shard for every k, and
    drops it, so memory holds one FSDP group's gradient shards at a time, not |θ|/N. The dots are
    summed over tensors in θ's order, as ``common.evograd._noise_dots`` does.
    """
    per_tensor: list[Tensor | None] = [None] * len(theta)

    def take(j: int) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            grad = local_shard(param.grad)[0].reshape(-1)
            per_tensor[j] = torch.stack([torch.dot(grad, noise.sample_one(k, j, like[j]).reshape(-1))
                                         .to(torch.float64) for k in range(len(noise))])
            param.grad = None
        return hook

    handles = [p.register_post_accumulate_grad_hook(take(j)) for j, p in enumerate(theta.values())]
    try:
        with full_precision():
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    _reshard(model)
    zero = torch.zeros(len(noise), dtype=torch.float64, device=like[0].device)
    dots = sum_over_ranks(sum((zero if d is None else d for d in per_tensor), zero))
    return dots, _take_hyper_grads(theta, hyperparams)


def _mean_over_ranks_flat(tensors: Sequence[Tensor]) -> list[Tensor]:
    """(1/N) Σ_r t_r for every tensor, in one flat all-reduce."""
    flat = mean_over_ranks(torch.cat([t.detach().reshape(-1) for t in tensors]))
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _dot_over_ranks(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """⟨a, b⟩ of two sharded vectors: local float64 dot products summed over ranks."""
    return sum_over_ranks(sum((x.to(torch.float64) * y.to(torch.float64)).sum() for x, y in zip(a, b)))


# ---------------------------------------------------------------------------------------------
# estimators
# ---------------------------------------------------------------------------------------------

def sharded_evograd_hypergrad(
    model: nn.Module,
    hyperparams: Sequence[Tensor],
    train_loss_fn: LocalLossFn,
    val_loss_fn: LocalLossFn,
    n_candidates: int = 2,
    sigma: float = 1e-3,
    temperature: float = 0.05,
    noise: str = "sign",
    generator: torch.Generator | None = None,
    candidates_in_float32: bool = True,
) -> EvoGradOutput:
    """EvoGrad hypergradient of a sharded model; accumulates (1/N) Σ_r into every λ's ``.grad``.

    The update (module docstring): ℓ_k = L_train(θ + ε_k), w = softmax(−ℓ/τ),
    θ* = θ + Σ_k w_k ε_k, and dL_val(θ*)/dλ through w(λ) plus any direct ∂L_val/∂λ. Computed as
    ``evograd_hypergrad_low_memory``: one candidate graph at a time (into λ only: θ is frozen
    during the candidate passes), ∂ℓ_k/∂λ kept (K·|λ|), then combined with the softmax Jacobian
    and d_k = ⟨ε_k, ∇_θ L_val(θ*)⟩. θ is left bit-identical, and so are the ``.grad`` of θ.

    Args:
        model: the sharded model (``shard_model``); under no process group, any module.
        hyperparams: λ, leaf tensors with ``requires_grad=True``, replicated; model parameters
            among them (left out of sharding) are not perturbed.
        train_loss_fn: () -> this rank's training loss l_r (a scalar), running ``model``'s forward.
        val_loss_fn: () -> this rank's validation loss. It may read λ; it should read no other
            leaf that requires grad besides θ (its ``.grad`` would receive ∂L_val).
        n_candidates, sigma, temperature, noise, generator, candidates_in_float32: as in
            ``common.evograd.evograd_meta_loss``; the noise is index-addressed (``IndexedNoise``).

    Returns:
        ``EvoGradOutput`` with the all-rank mean validation loss at θ*, candidate losses and weights.

    Raises:
        ValueError: as ``evograd_hypergrad_low_memory``, for an unsupported placement
            (``local_shard``), or a model parameter left unsharded under a process group.
    """
    hyperparams = check_hyperparams(hyperparams, leaf=True)
    theta = base_params(model, hyperparams)
    shards = [local_shard(p) for p in theta.values()]
    # the argument checks, and K seeds (rank 0's) for noise indexed by each shard's global offsets
    _, noise_spec = _prepare({n: s for n, (s, _) in zip(theta, shards)}, n_candidates, sigma, temperature,
                             noise, generator, noise_addressing="index", offsets=[o for _, o in shards])
    del shards
    with _meta_step(model, theta, hyperparams) as perturbation:
        local_losses, loss_grads = [], []  # loss_grads[k][i] = ∂l_{r,k}/∂λ_i, this rank's
        with frozen(theta.values()):
            for k in range(n_candidates):
                perturbation.set(_noise_step(noise_spec, [(k, None)]))  # the passes see θ + ε_k
                with full_precision(candidates_in_float32):
                    loss = scalar_loss(train_loss_fn(), f"train_loss_fn (candidate {k})")
                with full_precision():
                    loss_grads.append(_grads_into(loss, hyperparams))
                local_losses.append(loss.detach())
                del loss
        losses = mean_over_ranks(torch.stack(local_losses))  # ℓ_k, one all-reduce of K
        weights = candidate_weights(losses, temperature)

        # θ* = θ + Σ_k w_k ε_k, in _MergeCandidates' order of operations (per element: + w_1 ε_1, + w_2 ε_2...)
        perturbation.set(_noise_step(noise_spec, list(enumerate(weights))))
        val_loss = scalar_loss(val_loss_fn(), "val_loss_fn")
        # d_k = ⟨∇_θ* L_val, ε_k⟩ summed over ranks (K numbers, not |θ|), each shard's gradient read and freed
        # as FSDP's reduce-scatter delivers it
        dots, direct = _backward_noise_dots(model, val_loss, theta, hyperparams, noise_spec, perturbation.shards)
        dots = dots.to(weights.dtype)
        val_mean = mean_over_ranks(val_loss.detach())
        check_finite_losses(torch.cat([losses, val_mean.reshape(1)]),
                            [f"train_loss_fn (candidate {k})" for k in range(n_candidates)] + ["val_loss_fn"])
        dl_dloss = -(weights / temperature) * (dots - (weights * dots).sum())
        local_total = [sum(dl_dloss[k] * loss_grads[k][i] for k in range(n_candidates)) + direct[i]
                       for i in range(len(hyperparams))]
        total = _mean_over_ranks_flat(local_total)
    _accumulate(hyperparams, total)
    return EvoGradOutput(val_mean, losses, weights)


def _central_difference(perturbation: _Perturbation, theta: dict[str, Tensor], direction: Sequence[Tensor],
                        hyperparams: Sequence[Tensor], train_loss_fn: LocalLossFn, fd_epsilon: float,
                        in_float32: bool) -> tuple[list[Tensor], Tensor]:
    """([∇_λ l_r(θ + εu) − ∇_λ l_r(θ − εu)] / (2ε), the two local losses) with ε = fd_epsilon/‖u‖
    (u sharded like θ); the passes see θ ± εu through ``perturbation``, one tensor's step at a time."""
    norm = torch.sqrt(_dot_over_ranks(direction, direction))
    eps = fd_epsilon / norm.clamp_min(torch.finfo(torch.float64).tiny)  # u = 0: both sides are θ, difference 0
    sides, losses = [], []
    with frozen(theta.values()):
        for sign in (1.0, -1.0):
            perturbation.set(lambda j, target, sign=sign: target.add_((sign * eps * direction[j]).to(target.dtype)))
            with full_precision(in_float32):
                loss = scalar_loss(train_loss_fn(), "train_loss_fn (finite difference)")
                sides.append(_grads_into(loss, hyperparams))
            losses.append(loss.detach())
            del loss
    perturbation.set(None)
    difference = [((gp - gm) / (2 * eps)) for gp, gm in zip(*sides)]
    return difference, torch.stack(losses)


def sharded_finite_difference_hypergrad(
    model: nn.Module,
    hyperparams: Sequence[Tensor],
    train_loss_fn: LocalLossFn,
    val_loss_fn: LocalLossFn,
    inner_lr: float,
    fd_epsilon: float = 0.01,
) -> Tensor:
    """``common.estimators.finite_difference_hypergrad`` on a sharded model; accumulates into ``.grad``.

        θ' = θ − η ∇_θ L_train(θ, λ),   v = ∇_θ' L_val(θ'),   ε = fd_epsilon / ‖v‖,
        dL_val(θ')/dλ ≈ ∂L_val/∂λ − η [∇_λ L_train(θ + εv) − ∇_λ L_train(θ − εv)] / (2ε)

    θ' and θ ± εv are made in FSDP's all-gather buffer (``_Perturbation``: the shards are never
    written); v is sharded like θ; ‖v‖ is one all-reduce of a scalar. Memory per rank: 2
    shard-sized tensors (−ηg and the validation backward's gradient, then v alone) plus FSDP's
    gathered block. Returns the all-rank mean L_val(θ') (detached); θ and its ``.grad`` are left
    bit-identical.

    Raises:
        ValueError: on η ≤ 0, fd_epsilon ≤ 0, bad hyperparams, a non-scalar or non-finite loss.
    """
    _check_number("inner_lr", inner_lr, strictly_positive=True)
    _check_number("fd_epsilon", fd_epsilon, strictly_positive=True)
    hyperparams = check_hyperparams(hyperparams, leaf=True)
    theta = base_params(model, hyperparams)
    with _meta_step(model, theta, hyperparams) as perturbation:
        train_loss = scalar_loss(train_loss_fn(), "train_loss_fn")
        train_grads, _ = _backward(model, train_loss, theta, hyperparams)
        # θ' = θ − ηg, as t − η·g unsharded; the steps live until the next set (no other name holds them)
        perturbation.set(_tensor_step([-(inner_lr * g) for g in train_grads]))
        del train_grads
        val_loss = scalar_loss(val_loss_fn(), "val_loss_fn")
        v, direct = _backward(model, val_loss, theta, hyperparams)
        difference, side_losses = _central_difference(perturbation, theta, v, hyperparams, train_loss_fn,
                                                         fd_epsilon, in_float32=False)
        losses = mean_over_ranks(torch.cat([train_loss.detach().reshape(1), val_loss.detach().reshape(1),
                                            side_losses]))
        check_finite_losses(losses, ["train_loss_fn", "val_loss_fn", "train_loss_fn (finite difference, +)",
                                     "train_loss_fn (finite difference, −)"])
        total = _mean_over_ranks_flat([d - inner_lr * m.to(d.dtype) for d, m in zip(direct, difference)])
    _accumulate(hyperparams, total)
    return losses[1]


def sharded_sama_hypergrad(
    model: nn.Module,
    hyperparams: Sequence[Tensor],
    train_loss_fn: LocalLossFn,
    val_loss_fn: LocalLossFn,
    inner_lr: float | None = None,
    base_optimizer: torch.optim.Optimizer | None = None,
    fd_epsilon: float = 0.01,
    differences_in_float32: bool = True,
) -> Tensor:
    """``common.implicit.sama_hypergrad`` on a sharded model; accumulates into ``.grad``.

        v = ∇_θ L_val(θ, λ),   P = ∂u/∂g of the base optimiser's update (η·I for plain SGD),
        dL_val/dλ ≈ ∂L_val/∂λ − [∇_λ L_train(θ + εPv) − ∇_λ L_train(θ − εPv)] / (2ε),
        ε = fd_epsilon / ‖Pv‖

    P is elementwise, so each rank computes its shard of Pv from its shard of v (and, for Adam, of
    the optimiser's moments and of ∇_θ L_train, one more sharded backward). θ ± εPv are made in
    FSDP's all-gather buffer (``_Perturbation``: the shards are never written). Memory per rank:
    up to 3 shard-sized tensors (P, v and Pv while Pv is formed; then Pv alone) plus FSDP's gathered
    block. Returns the all-rank mean L_val(θ) (detached); θ and its ``.grad`` are left bit-identical.

    Raises:
        ValueError: as ``sama_hypergrad`` (see ``optimizer_preconditioner``), or bad hyperparams.
    """
    _check_number("fd_epsilon", fd_epsilon, strictly_positive=True)
    hyperparams = check_hyperparams(hyperparams, leaf=True)
    theta = base_params(model, hyperparams)
    losses, whats = [], []
    with _meta_step(model, theta, hyperparams) as perturbation:
        train_grads = None
        if base_optimizer is not None and not isinstance(base_optimizer, torch.optim.SGD):
            loss = scalar_loss(train_loss_fn(), "train_loss_fn")
            losses.append(loss.detach())
            whats.append("train_loss_fn")
            with full_precision():
                loss.backward()
            _reshard(model)
            train_grads = [p.grad for p in theta.values()]  # DTensors, like the optimiser's moments
            for t in [*theta.values(), *hyperparams]:
                t.grad = None
            del loss
        precondition = [local_shard(p)[0] for p in optimizer_preconditioner(base_optimizer, theta, inner_lr,
                                                                             train_grads)]
        del train_grads
        val_loss = scalar_loss(val_loss_fn(), "val_loss_fn")
        v, direct = _backward(model, val_loss, theta, hyperparams)
        losses.append(val_loss.detach())
        whats.append("val_loss_fn")
        pv = [p * g for p, g in zip(precondition, v)]
        del precondition, v
        difference, side_losses = _central_difference(perturbation, theta, pv, hyperparams, train_loss_fn,
                                                         fd_epsilon, in_float32=differences_in_float32)
        losses = mean_over_ranks(torch.cat([torch.stack(losses), side_losses]))
        check_finite_losses(losses, whats + ["train_loss_fn (finite difference, +)",
                                             "train_loss_fn (finite difference, −)"])
        total = _mean_over_ranks_flat([d - m.to(d.dtype) for d, m in zip(direct, difference)])
    _accumulate(hyperparams, total)
    return losses[whats.index("val_loss_fn")]


# ---------------------------------------------------------------------------------------------
# which estimators run on a sharded model
# ---------------------------------------------------------------------------------------------

FSDP_ESTIMATORS: dict[str, Callable[..., object]] = {
    "evograd": sharded_evograd_hypergrad,
    "evograd_low_memory": sharded_evograd_hypergrad,  # the sharded EvoGrad keeps one graph at a time anyway
    "finite_difference": sharded_finite_difference_hypergrad,
    "sama": sharded_sama_hypergrad,
}

_DOUBLE_BACKWARD = ("backpropagates through ∇_θ L_train (double backward through the network), which FSDP2 "
                    "does not support: it reduce-scatters and frees the gathered parameters during the first "
                    "backward")
_REFUSED = {
    "evograd_batched": "stacks K whole copies of θ for torch.func.vmap, the memory sharding exists to save, and "
                       "vmap cannot run FSDP2's hooks",
    "second_order": _DOUBLE_BACKWARD,
    "second_order_func": _DOUBLE_BACKWARD,
    "unrolled": _DOUBLE_BACKWARD,
    "multistep": _DOUBLE_BACKWARD,
    "cg": "needs Hessian-vector products (double backward through the network), which FSDP2 does not support",
    "neumann": "needs Hessian-vector products (double backward through the network), which FSDP2 does not support",
}


def check_fsdp_estimator(name: str) -> Callable[..., object]:
    """The sharded version of estimator ``name``; ``ValueError`` (one line, with the reason) if it has none.

    Runs sharded: evograd (and evograd_low_memory, the same computation), finite_difference, sama.
    """
    if name in FSDP_ESTIMATORS:
        return FSDP_ESTIMATORS[name]
    if name in _REFUSED:
        raise ValueError(f"{name} cannot run on an FSDP-sharded model: it {_REFUSED[name]}; "
                         f"use one of {sorted(FSDP_ESTIMATORS)}")
    raise ValueError(f"unknown hypergradient method {name!r}; on an FSDP-sharded model choose from "
                     f"{sorted(FSDP_ESTIMATORS)}")


def is_sharded(module: nn.Module) -> bool:
    """True if ``fully_shard`` was applied to ``module`` itself (e.g. by ``shard_model``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def sharded_meta_backward(method: str, model: nn.Module, hyperparams: Sequence[Tensor], train_loss_fn: LocalLossFn,
                          val_loss_fn: LocalLossFn, **options) -> float:
    """``common.hypergrad.meta_backward`` for a sharded model: the estimator's hypergradient into λ's ``.grad``.

    Options the estimator does not take are ignored (one dict of everything can be passed, as to
    ``meta_backward``). Returns the all-rank mean validation loss as a float.

    Raises:
        ValueError: for a method with no sharded version (``check_fsdp_estimator``), or from the estimator.
    """
    estimator = check_fsdp_estimator(method)
    accepted = inspect.signature(estimator).parameters
    result = estimator(model, hyperparams, train_loss_fn, val_loss_fn,
                       **{k: v for k, v in options.items() if k in accepted})
    return float(result.val_loss if isinstance(result, EvoGradOutput) else result)


# ---------------------------------------------------------------------------------------------
# sharded checkpoints (torch.distributed.checkpoint)
# ---------------------------------------------------------------------------------------------

def shards_folder(path: str | Path) -> Path:
    """Where the shards of the checkpoint ``<name>.pt`` live: the folder ``<name>.shards``."""
    return Path(path).with_suffix(".shards")


def save_sharded_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                            config: dict, tag: str) -> Path:
    """Save a sharded model and its optimiser with ``torch.distributed.checkpoint``, the rest on rank 0.

    Collective: every rank calls it. Each rank writes its own shards of the model's and the
    optimiser's state (``get_state_dict``: DTensors, keyed by parameter name) into
    ``<name>.shards/.<tag>-<random>.tmp``; the folder is renamed to ``<name>.shards/<tag>-<random>``
    once every rank has written; then rank 0 writes ``path`` atomically (``save_checkpoint``:
    ``state``, ``config`` and the folder's name under ``"shards"``) and removes every other folder
    in ``<name>.shards``. The commit point is that rename of ``path``: a run killed before it
    leaves ``path`` naming the previous folder, still there. Nothing of θ's size is gathered.

    Returns:
        ``path``.
    """
    path, root = Path(path), shards_folder(path)
    # rank 0's random suffix: a folder never has the name of one that the current checkpoint names
    name = [f"{tag}-{uuid.uuid4().hex[:8]}"]
    if is_distributed():
        dist.broadcast_object_list(name, src=0)
    name = name[0]
    partial, final = root / f".{name}.tmp", root / name
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if is_main_process():
        root.mkdir(parents=True, exist_ok=True)
    barrier()
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=partial)
    barrier()  # every rank's shards and the metadata are on disk
    if is_main_process():
        partial.rename(final)
        save_checkpoint(path, {**state, "shards": name}, config)
        for other in root.iterdir():  # the previous checkpoint's folder, and any left by a killed save
            if other.name != name:
                shutil.rmtree(other, ignore_errors=True)
    barrier()
    return path


def load_sharded_checkpoint(path: str | Path, config: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                            may_change: Iterable[str] = ()) -> dict | None:
    """Resume from ``save_sharded_checkpoint``: the rest of the state, or None if there is no checkpoint.

    Collective. ``path`` is checked as ``common.results.resume_checkpoint`` does (the same world
    size, the same settings but ``may_change``); then every rank reads its own shards into ``model``
    and ``optimizer`` (``dcp.load`` into their sharded state dicts, ``set_state_dict``).

    Raises:
        RunFileError: as ``resume_checkpoint``, or if the shards are missing or do not fit the model.
    """
    state = resume_checkpoint(path, config, may_change=may_change)
    if state is None:
        return None
    folder = shards_folder(path) / str(state.get("shards"))
    if "shards" not in state or not (folder / ".metadata").is_file():
        raise RunFileError(f"checkpoint {path} names no sharded model, or its folder {folder} is gone: {RESTART_FIX}")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    both = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(both, checkpoint_id=folder)
    except Exception as err:  # noqa: BLE001 (CheckpointException wraps every rank's error)
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        raise RunFileError(f"the shards in {folder} do not fit this run ({type(err).__name__}: {reason}): "
                           f"{RESTART_FIX}") from None
    set_state_dict(model, optimizer, model_state_dict=both["model"], optim_state_dict=both["optimizer"])
    return state


def gathered_checkpoint(path: str | Path, state: dict) -> dict:
    """``state`` (the file ``path``, as ``common.results.load_checkpoint`` reads it) with its shards
    gathered as whole tensors under ``"model"`` and ``"optimizer"``, in one process, no process group.

    A checkpoint without shards is returned as it is.

    Raises:
        RunFileError: if the shards' folder is missing or unreadable.
    """
    if "shards" not in state:
        return state
    folder = shards_folder(path) / str(state["shards"])
    with tempfile.TemporaryDirectory(prefix="gathered_checkpoint_") as scratch:
        try:
            dcp_to_torch_save(folder, Path(scratch) / "whole.pt")
        except Exception as err:  # noqa: BLE001 (a missing folder or a damaged shard)
            reason = (str(err).strip().splitlines() or [""])[0][:160]
            raise RunFileError(f"the shards of checkpoint {path} in {folder} are unreadable "
                               f"({type(err).__name__}: {reason})") from None
        whole = torch.load(Path(scratch) / "whole.pt", weights_only=False)
    return {**state, **whole}
