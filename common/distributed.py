"""Hypergradients under data parallelism (``torch.distributed``, one process per device).

With a process group initialised (``torchrun``, or ``torch.distributed.init_process_group``) and
N > 1 ranks, each rank r holds a shard of every batch and its loss callables return the shard's
mean l_r(θ, λ). The hypergradient every estimator should give is that of the whole batch,

    L(θ, λ) = (1/N) Σ_r l_r(θ, λ)        (equal shards: the mean over the whole batch),

identical on every rank. The estimators' entry points (``evograd_meta_loss``,
``evograd_hypergrad_low_memory``, ``second_order_meta_loss(_func)``, ``finite_difference_hypergrad``,
``multistep_meta_loss`` and ``common.hypergrad.meta_backward``, hence every method registered
there) are decorated with ``data_parallel``, which changes nothing when no process group is
initialised (one ``is_initialized()`` check per call) and otherwise does three things:

1. Replicated losses. ``train_loss_fn`` and ``val_loss_fn`` are wrapped so that each call returns
   L = (1/N) Σ_r l_r, the same number on every rank (one all-reduce of a scalar). Every quantity
   built from losses and from θ (candidate weights, θ*, θ_t of an unroll) is then identical on
   every rank, and so is any ``ValueError`` on a non-finite loss: every rank raises it, none hangs.
2. Exact gradients of replicated tensors. Autograd on one rank sees only its own l_r. The rules
   that make ``backward()``/``autograd.grad`` of L give, on every rank, the exact derivative with
   respect to any replicated tensor x (the same x on every rank) are:
     - local → replicated (the all-reduce in 1.): the backward passes the replicated gradient
       through (divided by N for the mean), no communication;
     - replicated → local (x is read by a rank's own computation): the backward sums the
       rank-local gradients over ranks, Σ_r ∂l_r/∂x, with an all-reduce that is itself
       differentiable (its backward is the identity), so second derivatives (second_order,
       unrolled, multistep, ``create_graph=True``) are exact as well.
   The replicated tensors read by local computations are the parameter dict handed to a loss
   (its tensors that require grad pass through ``_RanksShare``) and the leaves the loss reads
   from its closure: the hyperparameters λ and any live model parameters. The latter get a
   gradient hook (one per leaf, however many losses read it) that all-reduces the gradient
   arriving at the leaf, for as long as the meta step lasts: until the decorated call returns, or,
   for a call that returns a differentiable meta loss, until the end of the ``backward()`` of
   that loss.
3. Identical noise. EvoGrad's K noise seeds are drawn on every rank (so each generator advances
   as it would alone) and rank 0's are broadcast (``broadcast_seeds``).

EvoGrad avoids the parameter-sized all-reduce at θ*: ``common.evograd`` marks θ* with
``mark_gradient_summed_elsewhere`` so the loss wrapper leaves its gradient rank-local, and sums
the K dot products ∂L/∂w_k = <∇_θ* L, ε_k> instead (``sum_over_ranks``): 8K bytes, not |θ| b.

Communication per meta step through ``meta_backward`` (b bytes per element, |θ| and |λ| element
counts, T inner steps, K candidates, W window; each gradient w.r.t. θ is one flat all-reduce, each
λ leaf one all-reduce per gradient call that reaches it; ``tests/test_distributed.py`` counts them):

    evograd             8K (seed broadcast) + (K+1) b (losses) + 8K (∂L/∂w_k, float64) + |λ| b
    evograd_low_memory  as evograd, with the λ hook in each of the K (K+1 if L_val reads λ)
                        gradient calls: 16K + (K+1) b + K |λ| b
    second_order,       T |θ| b (inner gradients, forward) + T |θ| b (backward: L_val's input and
    unrolled,           θ_1..θ_{T−1}; one more |θ| b if the backward also reaches θ) + |λ| b
    second_order_func   + (T+1) b
    multistep           as second_order with ⌈T/W⌉ in place of T
    finite_difference   2 |θ| b (∇_θ L_train, ∇_θ' L_val) + 2 |λ| b (∇_λ at θ ± εv; 3 if L_val
                        reads λ) + 4 b

The wrapped losses also work under ``torch.func.grad`` and ``torch.func.vmap`` (e.g. K candidates
in one batched call: one all-reduce of K losses). All-reduce traffic per rank is about twice these
sizes on a ring. Ranks must run the same code,
hence build graphs of the same structure: collectives run in the autograd engine's order, which
is then the same on every rank.

Not covered: BatchNorm in training mode keeps per-rank batch statistics (the sharded hypergradient
then legitimately differs from the whole-batch one); unequal shards weight ranks equally; a
returned meta loss's step closes at the end of its first ``backward()`` (a second one, with
``retain_graph``, would sum no leaf gradient), and one never backpropagated keeps its leaf hooks
until its graph is garbage collected; a rank whose own code raises before a collective leaves
the others waiting until the process group's timeout (``torchrun`` stops every rank when one
exits with an error; ``on_every_rank`` makes a check, e.g. the divergence guard, fail on every
rank together).

The second half of the module serves experiments launched by ``torchrun``: ``init_data_parallel``
(nccl on CUDA, gloo on CPU), ``shard`` (this rank's part of a global batch), ``average_gradients``
(the base model's gradients averaged over ranks, as DDP does), ``broadcast_buffers`` (rank 0's
BatchNorm running statistics on every rank, as DDP does before each forward), ``shared_mean``
(a batch statistic of all ranks, e.g. a normaliser, read by each rank's loss with exact gradients),
``any_rank_failed`` (one flag all-reduced, so every rank stops together), ``sync_batchnorm``
(``--sync-bn``), ``is_main_process`` (rank 0 prints and writes), ``barrier``, ``close_data_parallel``, and
``process_group`` (a context manager around the first and the last).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from common.runtime import CLIError

_SUMMED_ELSEWHERE = "_grad_summed_over_ranks_elsewhere"


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device(like: Tensor | None = None) -> torch.device:
    """Where a collective's tensor must live: the current CUDA device for nccl, else ``like``'s/CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device if like is not None else torch.device("cpu")


class _AllRanksSum(torch.autograd.Function):
    """Local → replicated: y = Σ_r x_r on every rank; ∂y/∂x_r = 1, so the backward is the identity."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.detach().to(_comm_device(x)).clone()
        dist.all_reduce(out)
        return out.to(x.device)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad

    @staticmethod
    def vmap(info, in_dims, x: Tensor):  # torch.func.vmap: one all-reduce of the whole batch of values
        return _AllRanksSum.apply(x), in_dims[0]


class _RanksShare(torch.autograd.Function):
    """Replicated → local for several tensors: identity forward; the backward sums the rank-local
    gradients over ranks, all tensors in one flat all-reduce, differentiably (``_AllRanksSum``)."""

    @staticmethod
    def forward(*tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.like = [(t.shape, t.dtype, t.device) for t in inputs]

    @staticmethod
    def vmap(info, in_dims, *tensors: Tensor):  # torch.func.vmap: identity, dims unchanged
        return _RanksShare.apply(*tensors), tuple(in_dims)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        grads = [torch.zeros(s, dtype=d, device=dev) if g is None else g for g, (s, d, dev) in zip(grads, ctx.like)]
        flat = _AllRanksSum.apply(torch.cat([g.reshape(-1).to(grads[0].dtype) for g in grads]))
        return tuple(part.view(s).to(d) for part, (s, d, _) in zip(flat.split([g.numel() for g in grads]), ctx.like))


_OWN_NODES = ("_AllRanksSumBackward", "_RanksShareBackward")


def sum_over_ranks(x: Tensor) -> Tensor:
    """Σ_r x_r over ranks (differentiable, identity backward); ``x`` itself without a process group."""
    return _AllRanksSum.apply(x) if is_distributed() else x


def mean_over_ranks(x: Tensor) -> Tensor:
    """(1/N) Σ_r x_r over ranks (differentiable); ``x`` itself without a process group."""
    return _AllRanksSum.apply(x) / dist.get_world_size() if is_distributed() else x


def broadcast_seeds(seeds: Sequence[int]) -> list[int]:
    """Rank 0's integer seeds on every rank (one broadcast of len(seeds) int64); unchanged alone."""
    if not is_distributed():
        return list(seeds)
    t = torch.tensor(list(seeds), dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src=0)
    return t.tolist()


def mark_gradient_summed_elsewhere(tensors: Iterable[Tensor]) -> None:
    """Tell the loss wrapper to leave these inputs' gradients rank-local (the caller sums downstream).

    Used for EvoGrad's θ*, whose only consumer of ∇_θ* L is the K dot products <∇_θ* L, ε_k>,
    summed over ranks instead (K numbers rather than |θ|).
    """
    if is_distributed():
        for t in tensors:
            setattr(t, _SUMMED_ELSEWHERE, True)


# ---------------------------------------------------------------------------------------------
# leaf hooks: one per leaf, reference-counted by the meta steps that need it
# ---------------------------------------------------------------------------------------------

_leaf_hooks: dict[int, list] = {}  # id(leaf) -> [hook handle, open meta steps using it, the leaf (kept alive)]


def _sum_leaf_grad(grad: Tensor) -> Tensor:
    return _AllRanksSum.apply(grad)


class _MetaStep:
    """The leaves whose gradients are summed over ranks while this meta step is open."""

    def __init__(self) -> None:
        self.leaf_ids: set[int] = set()
        self.closed = False

    def hook(self, leaves: Iterable[Tensor]) -> None:
        for leaf in leaves:
            key = id(leaf)
            if key in self.leaf_ids:
                continue
            self.leaf_ids.add(key)
            entry = _leaf_hooks.get(key)
            if entry is None:
                _leaf_hooks[key] = [leaf.register_hook(_sum_leaf_grad), 1, leaf]
            else:
                entry[1] += 1

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for key in self.leaf_ids:
            entry = _leaf_hooks[key]
            entry[1] -= 1
            if entry[1] == 0:
                entry[0].remove()
                del _leaf_hooks[key]


_open_step: _MetaStep | None = None


def _outermost(t: Tensor) -> Tensor:
    """The plain tensor under ``torch.func`` wrappers (its graph is the one the outer ``backward()`` runs)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _captured_leaves(local_loss: Tensor, inputs: Iterable[Tensor]) -> list[Tensor]:
    """Leaves that require grad in ``local_loss``'s graph, other than ``inputs``; stops at this module's nodes."""
    skip = {id(t) for t in inputs}
    found, seen = [], set()
    stack = [local_loss.grad_fn] if local_loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in _OWN_NODES:
            continue
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            if id(leaf) not in skip:
                found.append(leaf)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def all_ranks_loss(loss_fn: Callable[[dict[str, Tensor]], Tensor]) -> Callable[[dict[str, Tensor]], Tensor]:
    """``loss_fn`` made data-parallel: params ↦ (1/N) Σ_r l_r(params), with exact replicated gradients.

    The parameter tensors that require grad enter ``loss_fn`` through ``_RanksShare`` (their
    gradient is summed over ranks), unless marked with ``mark_gradient_summed_elsewhere``; the
    leaves ``loss_fn`` reads from its closure are hooked for the open meta step. Wrapping twice
    wraps the original once.
    """
    loss_fn = getattr(loss_fn, "local_loss_fn", loss_fn)

    def all_ranks(params: dict[str, Tensor]) -> Tensor:
        shared = dict(params)
        names = [n for n, t in params.items() if t.requires_grad and not getattr(t, _SUMMED_ELSEWHERE, False)]
        if names:
            shared.update(zip(names, _RanksShare.apply(*(params[n] for n in names))))
        local = loss_fn(shared)
        if not isinstance(local, Tensor):
            return local  # the estimator's own check reports it
        if _open_step is not None:
            _open_step.hook(_captured_leaves(_outermost(local), [_outermost(t) for t in params.values()]))
        return _AllRanksSum.apply(local) / dist.get_world_size()

    all_ranks.local_loss_fn = loss_fn  # type: ignore[attr-defined]
    return all_ranks


class _CloseAfterBackward(torch.autograd.Function):
    """Identity on the meta loss; its backward (the first node run) queues the meta step's closing."""

    @staticmethod
    def forward(loss: Tensor, step: _MetaStep) -> Tensor:  # type: ignore[override]
        return loss.view_as(loss)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.step = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        torch.autograd.Variable._execution_engine.queue_callback(ctx.step.close)
        return grad, None


def _close_after_backward(result, step: _MetaStep):
    """Attach the step's closing to the returned meta loss (a tensor or a NamedTuple with ``val_loss``)."""
    loss = result.val_loss if hasattr(result, "val_loss") else result
    if not isinstance(loss, Tensor) or not loss.requires_grad:
        step.close()
        return result
    closing = _CloseAfterBackward.apply(loss, step)  # the graph holds the step: freed unused, it closes
    return result._replace(val_loss=closing) if hasattr(result, "val_loss") else closing


def data_parallel(returns_meta_loss: bool) -> Callable:
    """Decorator for a hypergradient entry point taking ``train_loss_fn``/``val_loss_fn`` (and maybe ``hyperparams``).

    Without a process group the function runs untouched. With one, its loss callables are wrapped
    by ``all_ranks_loss``, ``hyperparams`` (if it takes them) get leaf hooks, and a meta step is
    opened (joined, when an outer entry point already opened one) and closed when the function
    returns, or, with ``returns_meta_loss``, at the end of the returned loss's ``backward()``.
    """
    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not is_distributed():
                return fn(*args, **kwargs)
            global _open_step
            bound = signature.bind(*args, **kwargs)
            for name in ("train_loss_fn", "val_loss_fn"):
                if name in bound.arguments:
                    bound.arguments[name] = all_ranks_loss(bound.arguments[name])
            outer = _open_step is not None
            step = _open_step if outer else _MetaStep()
            hyperparams = bound.arguments.get("hyperparams")
            if hyperparams is not None:
                hyperparams = bound.arguments["hyperparams"] = list(hyperparams)
                step.hook(h for h in hyperparams if isinstance(h, Tensor) and h.requires_grad)
            _open_step = step
            try:
                result = fn(*bound.args, **bound.kwargs)
            except BaseException:
                if not outer:
                    step.close()
                raise
            finally:
                if not outer:
                    _open_step = None
            if outer:
                return result
            if returns_meta_loss:
                return _close_after_backward(result, step)
            step.close()
            return result
        return wrapper
    return decorate


# ---------------------------------------------------------------------------------------------
# experiments under torchrun: process group, shards of the global batch, averaged model gradients
# ---------------------------------------------------------------------------------------------

def launched_by_torchrun() -> bool:
    """True in a process started by ``torchrun`` with more than one process in all (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_data_parallel(device: torch.device) -> torch.device:
    """Join the ``torchrun`` process group (nccl on CUDA, gloo on CPU); return this rank's device.

    Outside ``torchrun`` (or with one process) nothing happens and ``device`` is returned. On CUDA
    each rank takes the GPU numbered by its ``LOCAL_RANK``.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # its collectives take ``group=group.WORLD`` as a default argument, evaluated at import: imported
    # once the group exists (FSDP2 imports it), it would keep the group alive (see close_data_parallel)
    import torch.distributed.nn.functional  # noqa: F401
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def close_data_parallel() -> None:
    """Leave the process group, if one was joined, and end its worker threads.

    ``destroy_process_group`` unregisters the groups, but a group's C++ object, and with gloo its
    worker threads, lives as long as a Python object refers to it. Under FSDP2 three did: the
    sharded model (its FSDP state), its device mesh (``DeviceMesh._pg_registry``; DTensor's
    sharding caches keep the mesh alive after the model is gone), and the default arguments
    ``group=group.WORLD`` of ``torch.distributed.nn.functional``, when that module is first
    imported after the group exists (``init_data_parallel`` imports it before). The gloo threads
    then outlived the group until interpreter exit, where a thread still releasing the last
    collective's tensors took the GIL of a finalising interpreter, which ended the thread inside
    a C++ destructor: the process aborted with "terminate called without an active exception"
    (6 of 21 short sharded benchmark runs on CPU). Emptying every mesh's registry (read only
    under ``torch.compile``; a destroyed group cannot be used anyway) drops the mesh's references,
    so once the model is freed (leave this after the function that holds it has returned) the
    group is destroyed here and its threads are joined.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _release_device_meshes()


def _release_device_meshes() -> None:
    """Empty the process-group registry of every live ``DeviceMesh`` (see ``close_data_parallel``)."""
    import gc

    from torch.distributed.device_mesh import DeviceMesh

    gc.collect()  # models freed in reference cycles release their meshes first
    for obj in gc.get_objects():
        if isinstance(obj, DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
            obj._pg_registry.clear()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """``with process_group(device) as device:`` joins the ``torchrun`` group and always leaves it.

    ``init_data_parallel`` on entry (yields this rank's device; outside ``torchrun`` the given one)
    and ``close_data_parallel`` on exit, also when the body raises. Then the finished frames of
    the exception's traceback are cleared first (their lines stay for the error message): their
    locals, a sharded model among them, would keep the group and its gloo threads alive past
    ``close_data_parallel``, to an abort at interpreter exit.
    """
    device = init_data_parallel(device)
    try:
        yield device
    except BaseException as err:
        traceback.clear_frames(err.__traceback__)  # frames still running (this one, the caller's) are skipped
        raise
    finally:
        close_data_parallel()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks N (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or the only process): the one that prints, writes results, figures and checkpoints."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if is_distributed():
        dist.barrier()


def rng_states_of_every_rank(get_state: Callable[[], Tensor] = torch.get_rng_state) -> list[Tensor]:
    """Every rank's ``get_state()`` in rank order, on every rank (collective; [own] without a group).

    Ranks draw different amounts of randomness (dropout over shards of different sizes), so a
    resumed run must give each rank its own state back, not rank 0's. ``get_state``: the CPU
    generator's by default; ``torch.cuda.get_rng_state`` for the current CUDA device's (dropout on
    a GPU draws from it).
    """
    state = get_state()
    if not is_distributed():
        return [state]
    states: list[Tensor | None] = [None] * world_size()
    dist.all_gather_object(states, state)
    return states


def shard(batch: Tensor, dim: int = 0) -> Tensor:
    """This rank's contiguous share of a global batch along ``dim`` (the whole batch without a process group).

    Every rank holds the same global batch (same seed, same data order); rank r keeps part r of
    ``batch.tensor_split(N, dim)``, so shards differ in size by at most one item.

    Raises:
        ValueError: if the batch has fewer items along ``dim`` than there are ranks.
    """
    n = world_size()
    if batch.shape[dim] < n:
        raise ValueError(f"a batch of {batch.shape[dim]} items cannot be split over {n} processes")
    return batch.tensor_split(n, dim=dim)[rank()] if n > 1 else batch


def average_gradients(module: torch.nn.Module) -> None:
    """``p.grad ← (1/N) Σ_r p.grad_r`` for the module's parameters, in one flat all-reduce.

    What ``DistributedDataParallel`` does after ``backward()`` (without overlapping it with the
    backward pass); keeping the module unwrapped leaves its parameter names, hence
    ``functional_forward`` on it, unchanged. Nothing happens without a process group.
    """
    if not is_distributed():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_comm_device(grads[0]))
    dist.all_reduce(flat)
    flat = flat.to(grads[0].device) / dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank, one flat broadcast.

    Parameters stay identical on every rank through ``average_gradients``; buffers updated by
    per-rank batch statistics drift apart. DDP broadcasts rank 0's before every forward
    (``broadcast_buffers=True``); calling this once per step does the same, so every rank
    evaluates (eval mode) the model rank 0 checkpoints. Nothing happens without a process group.
    """
    if not is_distributed():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1) for b in buffers]).to(_comm_device(buffers[0]))
    dist.broadcast(flat, src=0)
    flat = flat.to(buffers[0].device)
    for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
        b.copy_(part.view_as(b))


def shared_mean(x: Tensor) -> Tensor:
    """m = (1/N) Σ_r x_r, the same on every rank, to be read by each rank's own (local) computation.

    Exact gradients both ways: the forward all-reduce's backward is the identity (``_AllRanksSum``)
    and reading m locally sums the rank-local gradients over ranks (``_RanksShare``), so x_r
    receives Σ_r' ∂l_r'/∂m · (1/N), the derivative of the all-ranks loss Σ_r' l_r' through m.
    Used for a normaliser over the whole batch, e.g. Meta-Weight-Net's Σ_j v_j. ``x`` itself alone.
    """
    if not is_distributed():
        return x
    return _RanksShare.apply(_AllRanksSum.apply(x) / dist.get_world_size())[0]


def any_rank_failed(failed: bool, device: torch.device | None = None) -> bool:
    """True on every rank when ``failed`` is true on any rank (one all-reduce of one number).

    Lets a rank whose own data or loss went wrong stop every rank with the same one-line error,
    instead of leaving the others waiting in the next collective. ``failed`` itself alone.
    """
    if not is_distributed():
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=_comm_device(torch.empty(0, device=device)))
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


class OtherRankFailed(CLIError):
    """Raised on the ranks whose own check passed when another rank's failed (``on_every_rank``)."""


def on_every_rank(check: Callable[[], None], device: torch.device | None = None) -> None:
    """Run ``check`` (e.g. ``DivergenceGuard.check``); if it raises on any rank, every rank raises.

    The failing rank re-raises its own error (the one-line message); the others raise
    ``OtherRankFailed``, so no rank waits in a collective the failed one never reaches. Costs one
    all-reduce of one number (``any_rank_failed``); alone, ``check()`` as it is.
    """
    if not is_distributed():
        check()
        return
    error: Exception | None = None
    try:
        check()
    except Exception as err:  # noqa: BLE001 - re-raised below, on this rank as it was
        error = err
    if any_rank_failed(error is not None, device):
        if error is not None:
            raise error
        raise OtherRankFailed(f"process {rank()} stopped because another process failed (its error is printed above)")


_PLAIN_BATCHNORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def check_sync_bn(requested: bool, device: torch.device) -> None:
    """The CLI check of ``--sync-bn``, before any work: ``CLIError`` unless it can run on ``device``."""
    if requested and device.type != "cuda":
        raise CLIError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm does not run on CPU); leave it out")


def sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` with every plain BatchNorm layer converted to ``torch.nn.SyncBatchNorm`` (``--sync-bn``).

    SyncBatchNorm computes training-mode statistics over the whole batch of all ranks (per layer
    and forward: an all-gather of the per-channel mean, variance and count). Only layers whose type
    is exactly ``BatchNorm1d/2d/3d`` are converted, their parameters and buffers kept: a subclass
    (e.g. a BatchNorm with a feature-wise transformation after it) would lose its own forward, so
    it keeps per-rank statistics. PyTorch implements SyncBatchNorm for CUDA tensors only (on CPU
    its forward raises), hence the refusal on CPU.

    Raises:
        ValueError: on a device other than CUDA.
    """
    if device.type != "cuda":
        raise ValueError("SyncBatchNorm runs on CUDA only in PyTorch (on CPU its forward raises)")
    if type(module) in _PLAIN_BATCHNORMS:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        setattr(module, name, sync_batchnorm(child, device))
    return module
