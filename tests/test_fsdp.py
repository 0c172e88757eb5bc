"""Hypergradients of an FSDP2-sharded model (common.fsdp) against one unsharded process.

The 2-rank checks run in one ``torch.multiprocessing.spawn`` of 2 CPU (gloo) processes: each
computes the unsharded whole-batch references first (no process group yet), then joins the group,
shards the model over the 2 ranks (dim-0 splits of 5, 3 and 1 rows are uneven: 3 + 2, 2 + 1, 1 + 0),
takes its half of every batch and must reproduce them, in float64.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  imported before any group: see close_data_parallel
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from common.distributed import close_data_parallel
from common.estimators import finite_difference_hypergrad
from common.evograd import evograd_hypergrad_low_memory, functional_forward
from common.fsdp import (FSDP_ESTIMATORS, IndexedNoise, check_fsdp_estimator, element_noise, hashed_bits,
                         local_shard, shard_model, sharded_evograd_hypergrad, sharded_finite_difference_hypergrad,
                         sharded_sama_hypergrad, tensor_key)
from common.hypergrad import ESTIMATORS
from common.implicit import sama_hypergrad
from test_distributed import free_port

WORLD = 2
BATCH = 8
SEED = 7
EVOGRAD = dict(n_candidates=3, sigma=1e-2, temperature=0.05)
INNER = dict(inner_lr=0.3, fd_epsilon=1e-3)


class Scale(nn.Module):
    """h ↦ h·(1 + s): a learnable per-feature scale (λ inside the network in the "inside" case)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(-0.3, 0.4, width))

    def forward(self, h):
        return h * (1 + self.s)


class Net(nn.Module):
    """Linear(4→5)-scale-tanh-Linear(5→3)-tanh-(Linear(3→3) + Linear(3→1)); the first two layers are
    sharded blocks. Split over 2 ranks, dim 0 of 5 rows is 3 + 2, of 3 rows 2 + 1, of 1 row 1 + 0."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Linear(4, 5)
        self.scale = Scale(5)
        self.block2 = nn.Linear(5, 3)
        self.head = nn.Linear(3, 3)  # held by the root, which FSDP2 keeps gathered after a forward
        self.shift = nn.Linear(3, 1)  # one row: rank 1's shard is empty

    def forward(self, x):
        h = torch.tanh(self.block2(torch.tanh(self.scale(self.block1(x)))))
        return self.head(h) + self.shift(h)


def data(rank: int | None):
    """(x, y, x_val, y_val): the whole batch, or rank ``rank``'s half."""
    g = torch.Generator().manual_seed(1)
    x, xv = (torch.randn(BATCH, 4, generator=g, dtype=torch.float64) for _ in range(2))
    y, yv = (torch.randint(0, 3, (BATCH,), generator=g) for _ in range(2))
    if rank is not None:
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        x, y, xv, yv = x[part], y[part], xv[part], yv[part]
    return x, y, xv, yv


def build(kind: str):
    """(model, λ): λ weights the per-example losses ("loss") or is the network's scale ("inside")."""
    torch.manual_seed(0)
    model = Net().double()
    lam = model.scale.s if kind == "inside" else torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64,
                                                              requires_grad=True)
    return model, lam


def losses_of(kind: str, lam, forward, rank: int | None):
    """(train, val) loss callables over ``forward`` (a plain forward, or one through a parameter dict)."""
    x, y, xv, yv = data(rank)

    def train(*params):
        per_example = F.cross_entropy(forward(x, *params), y, reduction="none")
        return (F.softplus(lam)[y] * per_example).mean() if kind == "loss" else per_example.mean()

    def val(*params):
        return F.cross_entropy(forward(xv, *params), yv)

    return train, val


def adam_after_one_step(model: nn.Module, lam: torch.Tensor, train_loss) -> torch.optim.Adam:
    """Adam over θ after one step on ``train_loss()`` (so its moments are not zero), λ's gradient cleared."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p is not lam], lr=0.01)
    train_loss().backward()
    optimizer.step()
    optimizer.zero_grad()
    lam.grad = None
    return optimizer


def reference(kind: str, method: str, rank: int | None = None) -> tuple[torch.Tensor, float]:
    """λ's hypergradient and the validation loss of the unsharded estimator (``common.evograd`` etc.)."""
    model, lam = build(kind)
    params = {n: p for n, p in model.named_parameters() if p is not lam}  # the optimiser's own tensors
    train, val = losses_of(kind, lam, lambda x, p: functional_forward(model, p, x), rank)
    if method == "evograd":
        value = evograd_hypergrad_low_memory(params, [lam], train, val, generator=torch.Generator().manual_seed(SEED),
                                             noise_addressing="index", **EVOGRAD).val_loss
    elif method == "finite_difference":
        value = finite_difference_hypergrad(params, [lam], train, val, **INNER)
    elif method == "sama":
        value = sama_hypergrad(params, [lam], train, val, **INNER)
    else:
        optimizer = adam_after_one_step(model, lam, lambda: train(params))
        value = sama_hypergrad(params, [lam], train, val, base_optimizer=optimizer, fd_epsilon=INNER["fd_epsilon"])
    return lam.grad.detach().clone(), value.item()


SHARDED = {"evograd": lambda model, lam, train, val, _: sharded_evograd_hypergrad(
               model, [lam], train, val, generator=torch.Generator().manual_seed(SEED), **EVOGRAD).val_loss,
           "finite_difference": lambda model, lam, train, val, _: sharded_finite_difference_hypergrad(
               model, [lam], train, val, **INNER),
           "sama": lambda model, lam, train, val, _: sharded_sama_hypergrad(model, [lam], train, val, **INNER),
           "sama_adam": lambda model, lam, train, val, optimizer: sharded_sama_hypergrad(
               model, [lam], train, val, base_optimizer=optimizer, fd_epsilon=INNER["fd_epsilon"])}
CASES = [(kind, method) for kind in ("loss", "inside") for method in SHARDED]


def sharded(kind: str, method: str, rank: int | None) -> tuple[torch.Tensor, float, nn.Module, list[torch.Tensor]]:
    """The sharded estimator's λ gradient and validation loss, the model, and θ's shards before the meta step."""
    model, lam = build(kind)
    if rank is not None:
        shard_model(model, [model.block1, model.block2], ignored_params=[lam] if kind == "inside" else [])
    train, val = losses_of(kind, lam, lambda x: model(x), rank)
    optimizer = adam_after_one_step(model, lam, train) if method == "sama_adam" else None
    before = [local_shard(p)[0].clone() for p in model.parameters() if p is not lam]
    value = SHARDED[method](model, lam, train, val, optimizer)
    return lam.grad.detach().clone(), value.item(), model, before


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got - ref).abs().max().item() / ref.abs().max().item()


# ---------------------------------------------------------------------------------------------
# one process
# ---------------------------------------------------------------------------------------------

def splitmix64(state: int) -> tuple[int, int]:
    """The published splitmix64 step on Python integers: (new state, output)."""
    mask = (1 << 64) - 1
    state = (state + 0x9E3779B97F4A7C15) & mask
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return state, z ^ (z >> 31)


def test_hashed_bits_are_splitmix64_at_any_offset():
    key, state, outputs = 0x123456789ABCDEF, 0x123456789ABCDEF, []
    for _ in range(6):
        state, out = splitmix64(state)
        outputs.append(out - (1 << 64) if out >= 1 << 63 else out)
    assert hashed_bits(key, 0, 6).tolist() == outputs
    assert hashed_bits(key, 4, 2).tolist() == outputs[4:]
    far = hashed_bits(key, 2**40 + 3, 1).item()
    assert far == hashed_bits(key, 2**40, 4)[3].item() and far not in outputs


def test_index_noise_has_the_law_of_its_kind_and_differs_by_seed_and_name():
    signs = element_noise(1, "w", 0, 200_000, "sign", torch.float64)
    assert set(signs.unique().tolist()) == {-1.0, 1.0} and abs(signs.mean().item()) < 0.01
    gauss = element_noise(1, "w", 0, 200_000, "gaussian", torch.float64)
    assert abs(gauss.mean().item()) < 0.01 and abs(gauss.var().item() - 1) < 0.02
    assert abs(gauss.pow(4).mean().item() - 3) < 0.1  # Gaussian kurtosis, not a uniform's or a sign's
    assert not torch.equal(signs, element_noise(2, "w", 0, 200_000, "sign", torch.float64))
    assert not torch.equal(signs, element_noise(1, "v", 0, 200_000, "sign", torch.float64))
    assert tensor_key(1, "w") != tensor_key(1, "v") != tensor_key(2, "v")


def test_index_noise_does_not_depend_on_how_it_is_chunked():
    """element_noise hashes 2^18 elements at a time: the values are those of the whole index range at once."""
    n, offset = (1 << 18) + 1000, 12345
    bits = hashed_bits(tensor_key(3, "w"), offset, n)
    assert torch.equal(element_noise(3, "w", offset, n, "sign"), torch.where(bits < 0, -1.0, 1.0))
    whole = element_noise(3, "w", offset, n, "gaussian", torch.float64)
    pieces = [element_noise(3, "w", offset + a, b - a, "gaussian", torch.float64)
              for a, b in ((0, 7), (7, 200_000), (200_000, n))]
    assert torch.equal(whole, torch.cat(pieces))


def test_index_noise_bad_input_raises():
    with pytest.raises(ValueError, match="noise must be one of"):
        element_noise(1, "w", 0, 3, "uniform")
    with pytest.raises(ValueError, match="offset and numel"):
        element_noise(1, "w", -1, 3, "sign")
    with pytest.raises(ValueError, match="names but"):
        IndexedNoise([1, 2], 0.1, "sign", ["a", "b"], [0])
    with pytest.raises(ValueError, match="noise_addressing"):
        evograd_hypergrad_low_memory({"w": torch.zeros(2)}, [torch.zeros(1, requires_grad=True)],
                                     lambda p: p["w"].sum(), lambda p: p["w"].sum(), noise_addressing="hashed")


def test_unsharded_model_matches_low_memory_evograd_and_is_restored():
    """Without a process group the sharded estimators run on a plain module: same numbers as the references."""
    for kind, method in CASES:
        ref_grad, ref_value = reference(kind, method)
        grad, value, model, before = sharded(kind, method, rank=None)
        assert relative_error(grad, ref_grad) < 1e-9 and abs(value - ref_value) < 1e-12, (kind, method)
        theta = [p for n, p in model.named_parameters() if not (kind == "inside" and n == "scale.s")]
        assert len(theta) == len(before) == 9 - (kind == "inside")
        assert all(torch.equal(a.detach(), b) for a, b in zip(theta, before)), "θ changed by the meta step"
        assert all(p.grad is None for p in theta), "θ's .grad must be left as it was"
        assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in theta), "a gradient hook was left"
    # the stream noise gives another hypergradient: the index noise is what the match above pins
    model, lam = build("loss")
    params = {n: p.detach() for n, p in model.named_parameters()}
    train, val = losses_of("loss", lam, lambda x, p: functional_forward(model, p, x), None)
    evograd_hypergrad_low_memory(params, [lam], train, val, generator=torch.Generator().manual_seed(SEED), **EVOGRAD)
    assert relative_error(lam.grad, reference("loss", "evograd")[0]) > 1e-3


def test_batchnorm_running_statistics_are_left_as_they_were():
    """The sharded passes run the module's own forward (which in training mode updates BatchNorm's running
    statistics); the meta step puts them back, as ``functional_forward`` never changes them."""
    x, y, xv, yv = data(None)
    for method in ("evograd", "finite_difference", "sama"):
        grads, buffers = [], []
        for run_sharded in (False, True):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
            lam = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
            forward = (lambda inputs: model(inputs)) if run_sharded else (
                lambda inputs, p: functional_forward(model, p, inputs))
            train, val = losses_of("loss", lam, forward, None)
            if run_sharded:
                SHARDED[method](model, lam, train, val, None)
            else:
                reference_of = {"evograd": lambda: evograd_hypergrad_low_memory(
                    dict(model.named_parameters()), [lam], train, val, noise_addressing="index",
                    generator=torch.Generator().manual_seed(SEED), **EVOGRAD),
                    "finite_difference": lambda: finite_difference_hypergrad(
                        dict(model.named_parameters()), [lam], train, val, **INNER),
                    "sama": lambda: sama_hypergrad(dict(model.named_parameters()), [lam], train, val, **INNER)}
                reference_of[method]()
            grads.append(lam.grad)
            buffers.append([b.clone() for b in model.buffers()])
        assert relative_error(grads[1], grads[0]) < 1e-9, method
        assert all(torch.equal(a, b) for a, b in zip(*buffers)) and buffers[0][0].abs().sum() == 0, method
    model(x)  # a plain training-mode forward does move them: the check above can fail
    assert model[1].running_mean.abs().sum() > 0


def test_other_estimators_are_refused_with_one_line():
    refused = [name for name in ESTIMATORS if name not in FSDP_ESTIMATORS]
    assert set(refused) == {"evograd_batched", "second_order", "second_order_func", "unrolled", "multistep",
                            "cg", "neumann"}
    for name in refused:
        with pytest.raises(ValueError) as err:
            check_fsdp_estimator(name)
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{name} cannot run on an FSDP-sharded model: it ")
        assert ("double backward" in message) != (name == "evograd_batched"), message
    for name in FSDP_ESTIMATORS:
        assert callable(check_fsdp_estimator(name))
    with pytest.raises(ValueError, match="unknown hypergradient method 'adam'"):
        check_fsdp_estimator("adam")


def test_sharded_estimators_bad_input_raises():
    model, lam = build("loss")
    train, val = losses_of("loss", lam, lambda x: model(x), None)
    with pytest.raises(ValueError, match="leaf tensors with requires_grad"):
        sharded_evograd_hypergrad(model, [lam * 2], train, val)
    with pytest.raises(ValueError, match="leaf tensors with requires_grad"):
        sharded_sama_hypergrad(model, [], train, val, inner_lr=0.1)
    with pytest.raises(ValueError, match="inner_lr must be a finite number > 0"):
        sharded_finite_difference_hypergrad(model, [lam], train, val, inner_lr=0.0)
    with pytest.raises(ValueError, match="fd_epsilon must be a finite number > 0"):
        sharded_sama_hypergrad(model, [lam], train, val, inner_lr=0.1, fd_epsilon=-1.0)
    with pytest.raises(ValueError, match="n_candidates"):
        sharded_evograd_hypergrad(model, [lam], train, val, n_candidates=1)
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        sharded_evograd_hypergrad(model.requires_grad_(False), [lam], train, val)
    assert lam.grad is None


def test_shard_model_without_process_group_raises():
    with pytest.raises(ValueError, match="process group"):
        shard_model(Net(), [])


# ---------------------------------------------------------------------------------------------
# two ranks
# ---------------------------------------------------------------------------------------------

def worker(rank: int, port: int) -> None:
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    references = {case: reference(*case) for case in CASES}
    half_alone = {case: reference(*case, rank=rank)[0] for case in CASES}
    mixed_precision = mixed_precision_reference()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        failures = []
        for case in CASES:
            grad, value, model, before = sharded(*case, rank)
            ref_grad, ref_value = references[case]
            error, alone_error = relative_error(grad, ref_grad), relative_error(half_alone[case], ref_grad)
            both = [torch.zeros_like(grad) for _ in range(WORLD)]
            dist.all_gather(both, grad)
            theta = [p for p in model.parameters() if isinstance(p, DTensor)]
            restored = len(theta) == len(before) == 9 - (case[0] == "inside") and all(
                torch.equal(local_shard(p)[0], b) for p, b in zip(theta, before))
            initial = [p for n, p in build(case[0])[0].named_parameters()
                       if not (case[0] == "inside" and n == "scale.s")]
            whole_unchanged = case[1] == "sama_adam" or all(  # (Adam's step: whole and half batches round apart)
                torch.equal(p.full_tensor(), q.detach()) for p, q in zip(theta, initial))
            if not (error < 1e-6 and abs(value - ref_value) < 1e-9 and alone_error > 1e-3
                    and torch.equal(both[0], both[1]) and restored and whole_unchanged):
                failures.append(f"{case}: rel. error {error:.2e} (half batch alone {alone_error:.2e}), val loss "
                                f"{value} vs {ref_value}, ranks equal {torch.equal(both[0], both[1])}, "
                                f"shards restored {restored}, whole θ unchanged {whole_unchanged}")
        assert not failures, f"rank {rank}:\n" + "\n".join(failures)
        check_noise_of_uneven_shards(rank)
        check_meta_steps_write_no_shard(rank)
        check_mixed_precision_policy(rank, mixed_precision)
        check_evograd_communication(rank)
        check_divergence_guard_reads_shards(rank)
        model, lam = build("loss")  # not sharded: its gradients would stay rank-local
        with pytest.raises(ValueError, match="parameter 'block1.weight' is not sharded by fully_shard"):
            sharded_evograd_hypergrad(model, [lam], *losses_of("loss", lam, lambda x: model(x), rank))
    finally:
        close_data_parallel()  # the group's gloo threads end here, not at interpreter exit


def check_noise_of_uneven_shards(rank: int) -> None:
    """Each rank's noise of its shard is its slice of the unsharded noise (rows 3 + 2 of 5, 2 + 1 of 3, 1 + 0)."""
    model, _ = build("loss")
    shard_model(model, [model.block1, model.block2])
    names = [n for n, _ in model.named_parameters()]
    shards = [local_shard(p) for p in model.parameters()]
    whole = [p.full_tensor() for p in model.parameters()]
    rows = dict(zip(names, (s.shape[0] for s, _ in shards)))
    assert rows["block1.weight"] == (3, 2)[rank] and rows["head.bias"] == (2, 1)[rank], rows
    assert rows["shift.weight"] == (1, 0)[rank], rows
    for kind in ("sign", "gaussian"):
        local = IndexedNoise([11, 12], 0.5, kind, names, [o for _, o in shards]).sample(1, [s for s, _ in shards])
        expected = IndexedNoise([11, 12], 0.5, kind, names).sample(1, whole)
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, local)
        for j, name in enumerate(names):
            joined = torch.cat([gathered[r][j] for r in range(WORLD)])
            assert torch.equal(joined, expected[j]), f"{kind} noise of {name} split over ranks differs"
        if rank == 1:  # the offsets matter: rank 1's shard read from offset 0 is other noise
            at_zero = IndexedNoise([11, 12], 0.5, kind, names).sample(1, [s for s, _ in shards])
            assert not torch.equal(at_zero[names.index("block1.weight")], local[names.index("block1.weight")])


def check_meta_steps_write_no_shard(rank: int) -> None:
    """Sharded over 2 ranks, the passes see θ + δ through FSDP's all-gather buffer: no estimator writes a
    shard (its version counter stays), and FSDP's own all-gather is back after the step, also after a
    pass that raised."""
    def all_gather_comms(model):
        return [group._all_gather_comm for m in model.modules() if hasattr(m, "_get_fsdp_state")
                for group in m._get_fsdp_state()._fsdp_param_groups]

    for method in ("evograd", "finite_difference", "sama"):
        model, lam = build("loss")
        shard_model(model, [model.block1, model.block2])
        train, val = losses_of("loss", lam, lambda x: model(x), rank)
        shards = [local_shard(p)[0] for p in model.parameters()]
        versions, comms = [s._version for s in shards], all_gather_comms(model)
        SHARDED[method](model, lam, train, val, None)
        assert [s._version for s in shards] == versions, f"{method} wrote a shard"
        assert all(a is b for a, b in zip(all_gather_comms(model), comms)) and len(comms) == 3, method

    def planted():
        raise RuntimeError("planted")

    with pytest.raises(RuntimeError, match="planted"):
        sharded_evograd_hypergrad(model, [lam], train, planted)
    assert all(a is b for a, b in zip(all_gather_comms(model), comms)), "the all-gather was left replaced"

    # one group gathering two dtypes (FSDP then gathers bytes): refused before anything changes
    model, lam = build("loss")
    model.block2.bias.data = model.block2.bias.data.float()
    shard_model(model, [model.block1, model.block2])
    train, val = losses_of("loss", lam, lambda x: model(x), rank)
    comms = all_gather_comms(model)
    with pytest.raises(ValueError, match=r"gathered in one dtype, got \['torch.float32', 'torch.float64'\]"):
        sharded_evograd_hypergrad(model, [lam], train, val)
    assert all(a is b for a, b in zip(all_gather_comms(model), comms)) and lam.grad is None


def mixed_precision_reference() -> torch.Tensor:
    """λ's EvoGrad hypergradient, one process, with the float64 θ + ε cast to float32 for every forward: what FSDP's
    ``MixedPrecisionPolicy(param_dtype=torch.float32)`` computes from a float64 model's perturbed shards."""
    model, lam = build("loss")
    params = dict(model.named_parameters())
    train, val = losses_of("loss", lam, lambda x, p: functional_forward(
        model, {k: v.float() for k, v in p.items()}, x.float()), None)
    evograd_hypergrad_low_memory(params, [lam], train, val, generator=torch.Generator().manual_seed(SEED),
                                 noise_addressing="index", **EVOGRAD)
    return lam.grad.detach().clone()


def check_mixed_precision_policy(rank: int, reference_grad: torch.Tensor) -> None:
    """Under FSDP's mixed precision the buffer holds the shard cast to float32; θ + δ is made in float64 and cast,
    as the reference does: the same hypergradient to float32 precision (measured 2e-7 relative)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model, lam = build("loss")
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float64)
    for module in (model.block1, model.block2, model):
        fully_shard(module, mp_policy=policy)
    train, val = losses_of("loss", lam, lambda x: model(x), rank)
    shards = [local_shard(p)[0] for p in model.parameters()]
    versions = [s._version for s in shards]
    sharded_evograd_hypergrad(model, [lam], train, val, generator=torch.Generator().manual_seed(SEED), **EVOGRAD)
    assert relative_error(lam.grad, reference_grad) < 1e-5, relative_error(lam.grad, reference_grad)
    assert [s._version for s in shards] == versions


def check_evograd_communication(rank: int) -> None:
    """Besides FSDP's own gathers and reduce-scatters, EvoGrad sends K seeds, K losses, K dot products,
    the validation loss and λ's gradient: nothing of θ's size."""
    model, lam = build("inside")
    shard_model(model, [model.block1, model.block2], ignored_params=[lam])
    train, val = losses_of("inside", lam, lambda x: model(x), rank)
    shapes, all_reduce, broadcast = [], dist.all_reduce, dist.broadcast

    def counted(collective):
        def run(tensor, *args, **kwargs):
            shapes.append(tuple(tensor.shape))
            return collective(tensor, *args, **kwargs)
        return run

    dist.all_reduce, dist.broadcast = counted(all_reduce), counted(broadcast)
    try:
        sharded_evograd_hypergrad(model, [lam], train, val, **EVOGRAD)
    finally:
        dist.all_reduce, dist.broadcast = all_reduce, broadcast
    k = EVOGRAD["n_candidates"]
    assert shapes == [(k,), (k,), (k,), (), tuple(lam.shape)], f"collectives of shapes {shapes}"


def check_divergence_guard_reads_shards(rank: int) -> None:
    """A NaN in rank 1's shard stops both ranks (a DTensor's own amax misses it)."""
    from common.distributed import on_every_rank
    from common.runtime import DivergenceGuard, NonFiniteLossError

    model, _ = build("loss")
    shard_model(model, [model.block1, model.block2])
    guard = DivergenceGuard("fsdp_test", "evograd", 1, [model])
    on_every_rank(lambda: guard.check(training_loss=1.0))
    if rank == 1:
        with torch.no_grad():
            local_shard(model.block1.weight)[0][0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError if rank == 1 else Exception, match="block1.weight|another process"):
        on_every_rank(lambda: guard.check(training_loss=1.0))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_sharded_match_one_unsharded_process():
    """A failing rank fails the test with its traceback; a rank left waiting stops at the group's 60 s timeout."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD, join=True)


# ---------------------------------------------------------------------------------------------
# label_noise_mwn --fsdp
# ---------------------------------------------------------------------------------------------

MWN = ["--quick", "--train_size", "60", "--num_meta", "20", "--batch_size", "20", "--meta_batch_size", "10",
       "--device", "cpu", "--seed", "3", "--threads", "1", "--epochs", "1"]


def test_mwn_fsdp_refusals_are_one_line(tmp_path, capsys):
    from common.runtime import run_cli
    from label_noise_mwn import train

    for argv, expected in [
        (["--methods", "mwn_second_order"], "error: --fsdp: mwn_second_order: second_order cannot run on an "
                                            "FSDP-sharded model: it backpropagates through"),
        (["--methods", "mwn_evograd"], "error: --fsdp shards the model over processes: run under torchrun"),
    ]:
        with pytest.raises(SystemExit) as stop:
            run_cli(train.main, [*MWN, *argv, "--fsdp", "--out", str(tmp_path)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith(expected), lines
    assert not list(tmp_path.glob("*.json"))


def torchrun(module: str, argv, out, **popen):
    """``torchrun --nproc_per_node 2 -m <module> <argv> --out <out>``, started (Popen; ``popen`` overrides its
    keyword arguments, e.g. to discard the output)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "EVOGRAD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    options = {"cwd": Path(__file__).resolve().parent.parent, "env": env, "stdout": subprocess.PIPE,
               "stderr": subprocess.PIPE, "text": True, **popen}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(WORLD), "-m", module, *argv, "--out", str(out)], **options)


def torchrun_mwn(out, *flags: str):
    """MWN's tiny finite-difference run under torchrun into ``out`` (``torchrun``)."""
    return torchrun("label_noise_mwn.train", [*MWN, "--methods", "finite_difference", *flags], out)


def finish(*runs, code: int = 0) -> list[str]:
    """Each run's stdout and stderr (one string) once it has ended with exit status ``code``."""
    outputs = []
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == code, err[-3000:]
        outputs.append(out + err)
    return outputs


def whole_checkpoint(out, pattern: str = "*.pt") -> dict:
    """A --fsdp run's last checkpoint with its shards as whole tensors (``gathered_checkpoint``)."""
    from common.fsdp import gathered_checkpoint, shards_folder

    (path,) = (out / "checkpoints").glob(pattern)
    rest = torch.load(path, weights_only=False)
    assert [p.name for p in shards_folder(path).iterdir()] == [rest["shards"]]  # older epochs removed
    return gathered_checkpoint(path, rest)


@pytest.fixture(scope="module")
def mwn_runs(tmp_path_factory):
    """Three 2-process runs launched side by side: --fsdp for 2 epochs, --fsdp for 1 epoch (its results file
    then removed and the run resumed to 2 epochs), and the replicated run of 1 epoch."""
    tmp = tmp_path_factory.mktemp("mwn_fsdp")
    outs = {name: tmp / name for name in ("whole", "resumed", "replicated")}
    finish(torchrun_mwn(outs["whole"], "--fsdp", "--epochs", "2"), torchrun_mwn(outs["resumed"], "--fsdp"),
           torchrun_mwn(outs["replicated"]))
    first = {"checkpoint": whole_checkpoint(outs["resumed"]), "results": next(outs["resumed"].glob("*.json"))}
    first["results"].unlink()
    (err,) = finish(torchrun_mwn(outs["resumed"], "--fsdp", "--epochs", "2", "--resume"))
    return {**outs, "first": first, "resume_log": err}


def test_mwn_fsdp_run_equals_the_data_parallel_run(mwn_runs):
    """--fsdp and the replicated 2-process run: the same ResNet and VNet after an epoch of finite-difference
    meta steps (float32 rounding apart, the reduce-scatter and the all-reduce sum in other orders), one
    results file, and a sharded checkpoint whose tensors load into the unsharded ResNet."""
    import json

    from label_noise_mwn.mwn import init_models

    sharded = mwn_runs["first"]["checkpoint"]
    record = json.loads(next(mwn_runs["whole"].glob("*.json")).read_text())
    assert record["config"]["fsdp"] is True and record["config"]["processes"] == WORLD
    assert "fsdp" not in json.loads(next(mwn_runs["replicated"].glob("*.json")).read_text())["config"]
    replicated = torch.load(next((mwn_runs["replicated"] / "checkpoints").glob("*.pt")), weights_only=False)
    model, vnet = init_models(3, 10, 1, 8, 1, 8, 100)
    model.load_state_dict(sharded["model"])  # whole tensors, the unsharded model's names
    vnet_moved = max((replicated["vnet"][k] - v).abs().max().item() for k, v in vnet.state_dict().items())
    vnet_gap = max((sharded["vnet"][k] - v).abs().max().item() for k, v in replicated["vnet"].items())
    model_gap = max((sharded["model"][k].double() - v.double()).abs().max().item()
                    for k, v in replicated["model"].items())
    assert vnet_moved > 1e-5 and vnet_gap < 1e-3 * vnet_moved and model_gap < 1e-5, (vnet_moved, vnet_gap, model_gap)
    momentum = {k: v["momentum_buffer"] for k, v in sharded["optimizer"]["state"].items()}
    assert set(momentum) == {k for k in replicated["model"] if "running" not in k and "num_batches" not in k}
    names = [k for k in replicated["model"] if k in momentum]  # the optimiser's parameters, in order
    momentum_gap = max((momentum[k] - replicated["model_opt"]["state"][i]["momentum_buffer"]).abs().max().item()
                       for i, k in enumerate(names))
    assert momentum_gap < 1e-5, momentum_gap


def test_mwn_fsdp_killed_after_its_first_checkpoint_resumes_to_the_uninterrupted_run(mwn_runs):
    """1 epoch, then --resume --epochs 2 (every rank reads its shards back): results and the final ResNet,
    VNet and optimiser state bit-identical to the 2-epoch run (same processes, same float32 operations
    in the same order, the checkpoint holding every tensor and generator exactly)."""
    import json

    assert mwn_runs["resume_log"].count("resuming after epoch 1") == 1, mwn_runs["resume_log"]
    want, got = (json.loads(next(mwn_runs[name].glob("*.json")).read_text())["metrics"]
                 for name in ("whole", "resumed"))
    assert got["test_epoch_per_epoch"] == [1, 2]
    for key in ("test_acc_per_epoch", "train_loss_per_epoch", "meta_loss_per_epoch", "weight_clean_per_epoch",
                "weight_noisy_per_epoch", "final_test_acc"):
        assert got[key] == want[key], key
    want, got = (whole_checkpoint(mwn_runs[name]) for name in ("whole", "resumed"))
    assert got["epoch"] == want["epoch"] == 2 and got["shards"].startswith("epoch2-")
    for part in ("model", "vnet"):
        assert all(torch.equal(got[part][k], v) for k, v in want[part].items()), part
    assert all(torch.equal(got["optimizer"]["state"][k]["momentum_buffer"], v["momentum_buffer"])
               for k, v in want["optimizer"]["state"].items())


def test_mwn_fsdp_resume_refuses_other_settings_and_world_size(mwn_runs, capsys):
    """--resume of a --fsdp checkpoint under another --lr (torchrun), or in one process: one line, exit 2
    (every rank prints it, as any error under torchrun)."""
    from common.runtime import run_cli
    from label_noise_mwn import train

    out = mwn_runs["whole"]
    for results in out.glob("*.json"):
        results.unlink()  # so the run is not skipped as finished
    (err,) = finish(torchrun_mwn(out, "--fsdp", "--epochs", "2", "--resume", "--lr", "0.05"), code=1)
    assert "error: --resume: checkpoint" in err and "other settings: lr (0.1 -> 0.05)" in err, err[-2000:]
    assert "exitcode  : 2" in err  # the ranks exited with the one-line error (torchrun itself exits 1)
    with pytest.raises(SystemExit) as stop:
        run_cli(train.main, [*MWN, "--methods", "finite_difference", "--epochs", "2", "--resume", "--out", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and "written by a run of 2 process(es), this one has 1" in lines[0]


# ---------------------------------------------------------------------------------------------
# metaxl --fsdp
# ---------------------------------------------------------------------------------------------

METAXL = ["--model", "tiny", "--train_size", "24", "--target_train_size", "12", "--epochs", "1", "--batch_size", "6",
          "--lr", "1e-3", "--meta_lr", "1e-3", "--bottle_size", "8", "--max_seq_length", "32",
          "--eval_max_seq_length", "32", "--transfer_layer", "4", "--targets", "qu", "--seed", "3", "--no_figures",
          "--device", "cpu", "--metaxl_estimator", "finite_difference"]


def test_metaxl_fsdp_run_equals_the_data_parallel_run(tmp_path):
    """2 processes with --fsdp and 2 without, side by side: after 4 iterations of metaxl (finite-difference
    hypergradient of the RTN, Adam on XLM-R) the same losses, dev F1, XLM-R and RTN up to float32 rounding
    (the reduce-scatter and the all-reduce sum in other orders); metaxl_evograd (the head's shards
    perturbed with index-addressed noise, so not the replicated run's noise) runs and checkpoints."""
    import json
    import math

    fsdp, replicated = tmp_path / "fsdp", tmp_path / "replicated"
    finish(torchrun("metaxl.train", [*METAXL, "--methods", "metaxl", "metaxl_evograd", "--fsdp"], fsdp),
           torchrun("metaxl.train", [*METAXL, "--methods", "metaxl"], replicated))
    want, got = (json.loads(next(out.glob("*_metaxl_seed3.json")).read_text()) for out in (replicated, fsdp))
    assert got["config"]["fsdp"] is True and "fsdp" not in want["config"]
    (want_epoch,), (got_epoch,) = want["metrics"]["history"], got["metrics"]["history"]
    assert got_epoch["train_loss"] == pytest.approx(want_epoch["train_loss"], rel=1e-5)
    assert got_epoch["dev_f1"] == want_epoch["dev_f1"]
    sharded = whole_checkpoint(fsdp, "*_metaxl_seed3.pt")
    reference = torch.load(next((replicated / "checkpoints").glob("*.pt")), weights_only=False)
    # attention's key bias is left out: its gradient is 0 in exact arithmetic (q·(k + b) adds q·b to every
    # score of a softmax row), so in float32 it is rounding noise, which Adam scales up to steps of about lr
    model_gap = max((sharded["model"][k] - v).abs().max().item() for k, v in reference["model"].items()
                    if not k.endswith("key.bias"))
    rtn_gap = max((sharded["rtn"][k] - v).abs().max().item() for k, v in reference["rtn"].items())
    assert model_gap < 1e-6 and rtn_gap < 1e-6, (model_gap, rtn_gap)
    evograd = json.loads(next(fsdp.glob("*_metaxl_evograd_seed3.json")).read_text())
    assert math.isfinite(evograd["metrics"]["history"][0]["train_loss"])
    assert whole_checkpoint(fsdp, "*_metaxl_evograd_seed3.pt")["rtn"] != {}


# ---------------------------------------------------------------------------------------------
# common.bench --nproc 2 --fsdp
# ---------------------------------------------------------------------------------------------

def test_bench_fsdp_rows_replicated_and_sharded(tmp_path, capsys):
    """Each method runs replicated and sharded under torchrun; a method without a sharded estimator is refused
    by the benchmark's make_step (checked in this process); --fsdp without --nproc is a one-line error."""
    import json

    from common import bench
    from common.runtime import run_cli

    out = tmp_path / "bench.json"
    bench.main(["label_noise_mwn", "--quick", "--nproc", "2", "--fsdp", "--methods", "baseline", "--reps", "1",
                "--warmup", "0", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["sharded"], r["processes"], r["batch_per_rank"]) for r in rows] == [
        ("baseline", False, 2, 4), ("baseline, sharded", True, 2, 4)], rows
    assert all(r["time_s"] > 0 and r["peak_mem_mb"] == max(r["peak_mem_mb_per_rank"]) for r in rows)
    assert "| baseline, sharded | 2 | 4 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="second_order cannot run on an FSDP-sharded model"):
        bench.discover()["label_noise_mwn"].make_step("mwn_second_order", {"depth": 8, "width": 1, "batch": 4,
                                                                          "fsdp": True}, torch.device("cpu"))
    with pytest.raises(SystemExit) as stop:
        run_cli(bench.main, ["label_noise_mwn", "--quick", "--fsdp"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and lines == ["error: --fsdp shards the model over processes: give their numbers "
                                              "with --nproc (e.g. --nproc 2)"], lines


def test_bench_metaxl_sharded_rows(monkeypatch):
    """metaxl's benchmark shards XLM-R as metaxl.train --fsdp does: the sharded EvoGrad row runs under torchrun
    and gives numbers (no worker aborted at exit); metaxl's second-order step and the shared encoder are refused
    by make_step before any work (checked in this process); each variant runs the estimator it names (the
    sharded finite-difference metaxl step itself is run by test_metaxl_fsdp_run_equals_the_data_parallel_run)."""
    from common import bench
    from metaxl import bench as metaxl_bench
    from metaxl.model import StepConfig

    quick = bench.discover()["metaxl"].quick_configs[0]
    row = bench.measure_data_parallel("metaxl", {**quick, "batch": 4, "fsdp": True}, "metaxl_evograd", 2,
                                      torch.device("cpu"), 0, 1)
    assert row.get("time_s", 0) > 0 and min(row["peak_total_mb_per_rank"]) > 0, row
    assert row["batch_per_rank"] == 2 and row["parameters"] > 0 and "aborted_at_exit" not in row, row
    for method, reason in (("metaxl", "metaxl \\(second_order meta step\\) cannot run sharded; run "
                                     "metaxl_finite_difference or metaxl_sama"),
                           ("metaxl_evograd_shared", "a sharded model runs the encoder for every candidate")):
        with pytest.raises(ValueError, match=reason):
            metaxl_bench.make_step(method, {**quick, "fsdp": True}, torch.device("cpu"))
    ran = []
    monkeypatch.setattr(metaxl_bench, "train_iteration", lambda method, *args: ran.append((method, args[-2])))
    for method in ("metaxl", "metaxl_finite_difference", "metaxl_sama", "metaxl_evograd", "metaxl_evograd_shared"):
        metaxl_bench.make_step(method, quick, torch.device("cpu"))()
    assert [(m, c.metaxl_estimator, c.candidate_encoder) for m, c in ran] == [
        ("metaxl", StepConfig.metaxl_estimator, "per_candidate"), ("metaxl", "finite_difference", "per_candidate"),
        ("metaxl", "sama", "per_candidate"), ("metaxl_evograd", StepConfig.metaxl_estimator, "per_candidate"),
        ("metaxl_evograd", StepConfig.metaxl_estimator, "shared")]


def teardown_worker(rank: int, port: int, second_port: int) -> None:
    """As a torchrun worker: a sharded model trained in ``process_group``; once it is left, no gloo thread runs,
    also when the training raised (its traceback held the model until ``process_group`` cleared its frames)."""
    from common.distributed import process_group

    def gloo_threads() -> list[str]:  # Linux lists this process's threads, each with its name, in /proc/self/task
        names = (open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
        return [name for name in names if "gloo" in name]

    def train(fail: bool = False) -> None:
        model, lam = build("loss")
        shard_model(model, [model.block1, model.block2])
        train_loss, _ = losses_of("loss", lam, lambda x: model(x), rank)
        train_loss().backward()
        dist.all_gather_object([None] * WORLD, rank)
        if fail:  # the traceback holds this frame, and with it the sharded model and its group
            raise RuntimeError("planted")

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with process_group(torch.device("cpu")):
        train()
        assert gloo_threads(), "the process group's gloo threads should run while it is open"
    assert not gloo_threads(), f"rank {rank}: gloo threads {gloo_threads()} outlived the process group"
    os.environ["MASTER_PORT"] = str(second_port)
    with pytest.raises(RuntimeError, match="planted"), process_group(torch.device("cpu")):
        train(fail=True)
    assert not gloo_threads(), f"rank {rank}: after an error, gloo threads {gloo_threads()} outlived the group"


@pytest.mark.skipif(not (dist.is_available() and os.path.isdir("/proc/self/task")),
                    reason="needs torch.distributed and /proc")
def test_leaving_the_process_group_ends_its_threads_after_sharding():
    """Once a sharded model's process is done, its gloo threads end with the group: FSDP2's device mesh (kept
    alive by DTensor's caches) and torch.distributed.nn.functional's default arguments (FSDP2 imports it here
    after the group exists) held the group, so its threads ran to interpreter exit, where one still releasing
    the last collective's tensors aborted the process ("terminate called without an active exception", 6 of 21
    short sharded benchmark runs on CPU); common.distributed's init_data_parallel and close_data_parallel."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(teardown_worker, args=(free_port(), free_port()), nprocs=WORLD, join=True)


def test_committed_sharded_benchmarks_meet_the_memory_target():
    """In every committed sharded benchmark, the sharded EvoGrad iteration's peak per rank (model and step) is at
    most 1.1x that of the plain sharded training iteration of the same model: a remeasurement that regresses
    fails here before its numbers reach the docs."""
    import json
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[1] / "runs" / "bench").glob("cpu_fsdp*.json"))
    assert files, "no committed sharded benchmark"
    checked = 0
    for path in files:
        rows = json.loads(path.read_text())["rows"]
        for row in rows:
            if not (row.get("sharded") and "evograd" in row["method"] and row.get("peak_model_mb")):
                continue
            plain = [r for r in rows if r.get("sharded") and r["config"] == row["config"]
                     and r["method"].split(",")[0] in ("baseline", "joint_training")]
            assert len(plain) == 1, (path.name, row["method"], row["config"])
            ratio = row["peak_model_mb"] / plain[0]["peak_model_mb"]
            assert ratio <= 1.1, f"{path.name} {row['config']}: {row['method']} at {ratio:.3f}x of plain sharded"
            checked += 1
    assert checked >= 7, checked  # MWN ResNet-32 x2, 4 ranks, ResNet-8 x2, MetaXL x3


def test_memory_model_arithmetic(tmp_path, capsys):
    """α from two sizes (replicated: the slope; sharded: the slope × N), P_max = M·D/α sharded, M/α replicated."""
    import json

    from common.memory_model import bytes_per_parameter, capacity_table, largest_model, main

    small, large = {"width": 1}, {"width": 2}
    sizes = {json.dumps(small): 1_000_000, json.dumps(large): 3_000_000}
    mb = 2**20

    def row(method, sharded, config, bytes_):
        return {"benchmark": "b", "method": method, "sharded": sharded, "processes": 2, "config": config,
                "peak_total_mb": bytes_ / mb, "parameters": sizes[json.dumps(config)]}

    rows = [row("so", False, small, 500 * mb), row("so", False, large, 500 * mb + 2_000_000 * 24),
            row("evo, sharded", True, small, 400 * mb), row("evo, sharded", True, large, 400 * mb + 2_000_000 * 8),
            {**row("so", False, small, 0), "peak_total_mb": None}]  # a failed row is skipped
    alphas = bytes_per_parameter(rows, sizes)
    assert alphas == pytest.approx({"so": 24.0, "evo, sharded": 16.0})
    assert largest_model(16.0, 12e9, 8, sharded=True) == pytest.approx(6e9)
    assert largest_model(24.0, 12e9, 8, sharded=False) == pytest.approx(5e8)
    table = capacity_table(alphas, ["so", "evo, sharded"], memories_gb=(12,), devices=(1, 8))
    assert table.splitlines()[2:] == ["| so | 24 | 500 M | 500 M |", "| evo, sharded | 16 | — | 6,000 M |"]
    alphas["evo"] = 12.0  # the replicated row of the same method: the sharded method's 1-device cell
    assert capacity_table(alphas, ["evo, sharded"], memories_gb=(12,), devices=(1,)).splitlines()[2] == \
        "| evo, sharded | 16 | 1,000 M |"
    with pytest.raises(ValueError, match="two model sizes"):
        bytes_per_parameter(rows[:1], sizes)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"rows": rows}))
    main([str(path), "--benchmark", "b", "--methods", "so", "evo, sharded"])
    assert "| evo, sharded | 16 |" in capsys.readouterr().out


def test_metaxl_fsdp_stopped_after_its_first_checkpoint_resumes_to_the_uninterrupted_run(tmp_path):
    """A 2-epoch --fsdp run stopped (SIGTERM, which torchrun passes on) once its first sharded checkpoint is
    committed, then --resume'd: its history and final XLM-R and RTN bit-identical to an uninterrupted run
    (--epochs cannot grow here: MetaXL's learning-rate schedule spans all epochs)."""
    import json
    import signal
    import subprocess
    import time

    argv = [*METAXL, "--methods", "metaxl", "--epochs", "2", "--train_size", "48", "--fsdp"]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    uninterrupted = torchrun("metaxl.train", argv, whole)
    run = torchrun("metaxl.train", argv, stopped, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   start_new_session=True)  # its own process group, for the SIGTERM below
    deadline = time.monotonic() + 240
    try:
        while not list((stopped / "checkpoints").glob("*.pt")):
            assert run.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGTERM)
        run.wait(timeout=120)
    finish(uninterrupted)
    time.sleep(1)  # no worker may survive torchrun to write results
    assert not list(stopped.glob("*.json")), "stopped too late: the run had finished"
    (output,) = finish(torchrun("metaxl.train", [*argv, "--resume"], stopped))
    assert output.count("after epoch 1") == 1, output[-2000:]  # rank 0 alone says so
    want, got = (json.loads(next(out.glob("*.json")).read_text())["metrics"]["history"] for out in (whole, stopped))
    assert got == want
    want, got = (whole_checkpoint(out) for out in (whole, stopped))
    for part in ("model", "rtn"):
        assert all(torch.equal(got[part][k], v) for k, v in want[part].items()), part


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_sharded_checkpoint_commit_protocol_in_one_process(tmp_path):
    """save_sharded_checkpoint / load_sharded_checkpoint without a process group (one process's "shards"):
    the .pt names the committed folder, older folders and a killed save's .tmp folder go, the state comes
    back exactly; a changed setting and a missing folder are refused naming the fix."""
    import shutil

    from common.fsdp import load_sharded_checkpoint, save_sharded_checkpoint, shards_folder
    from common.results import RunFileError

    def model_and_optimizer():
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, optimizer

    model, optimizer = model_and_optimizer()
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "run.pt"
    save_sharded_checkpoint(path, model, optimizer, {"epoch": 1}, {"lr": 0.1}, tag="epoch1")
    (shards_folder(path) / ".epoch2-deadbeef.tmp").mkdir()  # left by a killed save
    with torch.no_grad():
        model.weight.add_(1.0)
    save_sharded_checkpoint(path, model, optimizer, {"epoch": 2}, {"lr": 0.1}, tag="epoch2")
    state = torch.load(path, weights_only=False)
    assert state["epoch"] == 2 and [p.name for p in shards_folder(path).iterdir()] == [state["shards"]]
    assert state["shards"].startswith("epoch2-")

    fresh, fresh_optimizer = model_and_optimizer()
    assert load_sharded_checkpoint(path, {"lr": 0.1}, fresh, fresh_optimizer)["epoch"] == 2
    assert torch.equal(fresh.weight, model.weight)
    momentum = [fresh_optimizer.state[p]["momentum_buffer"] for p in fresh.parameters()]
    assert all(torch.equal(m, optimizer.state[p]["momentum_buffer"]) for m, p in zip(momentum, model.parameters()))
    with pytest.raises(RunFileError, match=r"other settings: lr \(0.1 -> 0.2\)"):
        load_sharded_checkpoint(path, {"lr": 0.2}, *model_and_optimizer())
    shutil.rmtree(shards_folder(path) / state["shards"])
    with pytest.raises(RunFileError, match="is gone: delete it"):
        load_sharded_checkpoint(path, {"lr": 0.1}, *model_and_optimizer())
    assert load_sharded_checkpoint(tmp_path / "none.pt", {"lr": 0.1}, *model_and_optimizer()) is None
