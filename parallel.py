"""Several processes under torchrun, each training on its slice of every batch (train.py).

    torchrun --nproc_per_node 2 train.py --config configs/x.py                      # DDP
    torchrun --nproc_per_node 2 train.py --config configs/x.py --parallel=fsdp      # FSDP2

parallel = "ddp": every rank holds the whole model, its gradients and AdamW's moments; after the
backward pass the gradients are averaged over ranks (all-reduce).

parallel = "fsdp" (FSDP2, torch.distributed.fsdp.fully_shard; Zhao et al. 2023, after ZeRO-3 of
Rajbhandari et al. 2020): every parameter, gradient and moment is cut along dim 0 into N pieces, one
per rank (a DTensor). A block's whole weights are gathered just before it runs and freed after it
(all-gather), and its gradients are summed straight into the pieces (reduce-scatter): each rank
holds about 1/N of the state, for the price of that traffic at every step. The frozen base weights
of LoRA are cut too, and QLoRA's NF4 bytes as plain uint8 tensors (shard_nf4).

The optimizer (train.adamw_step) updates each rank's pieces (`local`); the gradient norm sums the
pieces' squares over ranks (`grad_norm_squared`). Checkpoints are written by every rank at once
with torch.distributed.checkpoint (each rank its pieces); exports gather the whole weights first.
"""
import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nf4 import NF4Linear, NF4State


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE; plain `python` runs one process (rank 0 of 1)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if torch.cuda.is_available():  # each rank its GPU, before any collective uses one
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce_sum(values, world):
    """Sum a list of floats over ranks (identity in a single process)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier():
    dist.barrier()


def finish():
    dist.destroy_process_group()


def wrap(model, cfg, world):
    """The model as the training loop calls it: itself (one process), in DDP, or sharded by FSDP2."""
    if world == 1:
        return model
    if cfg.parallel == "ddp":
        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard
    shard_nf4(model)
    for block in model.layers:  # one all-gather per block, freed when the block is done
        fully_shard(block)
    fully_shard(model)          # the rest (embedding, final norm, head) at the root
    return model


def unwrap(net):
    """The model inside DDP's wrapper (FSDP2 changes the model in place: nothing to unwrap)."""
    return net.module if isinstance(net, DistributedDataParallel) else net


def gather_to_all(obj, world):
    """[rank 0's obj, rank 1's, ...] on every rank ([obj] in one process)."""
    if world == 1:
        return [obj]
    objs = [None] * world
    dist.all_gather_object(objs, obj)
    return objs


def is_sharded(net):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(net, FSDPModule)


@contextlib.contextmanager
def gradient_sync(net, sync):
    """Gradient accumulation under DDP: exchange gradients only after the last micro-batch of a step.
    FSDP sums each micro-batch's gradients into the pieces at once (reduce-scatter): keeping whole
    gradients until the last one would hold a whole copy on every rank, which sharding is there to avoid."""
    if isinstance(net, DistributedDataParallel) and not sync:
        with net.no_sync():
            yield
    else:
        yield


def local(t):
    """This rank's piece of a sharded tensor (a view: updating it updates the parameter); t itself
    when it is not sharded."""
    return t.to_local() if hasattr(t, "to_local") else t


def grad_norm_squared(grads):
    """The sum of squares of all gradients; with FSDP, of each rank's pieces, summed over ranks."""
    total = sum((local(g).float().pow(2).sum() for g in grads), torch.zeros(()))
    if grads and hasattr(grads[0], "to_local"):
        dist.all_reduce(total)
    return total


def state_bytes(model, params, opt_state):
    """Bytes of weights, gradients (one per trainable weight) and AdamW moments held by this rank."""
    nbytes = lambda ts: sum(local(t).numel() * local(t).element_size() for t in ts)  # noqa: E731
    weights = nbytes(model.parameters()) + sum(m.nf4.nbytes for m in model.modules()
                                               if isinstance(m, NF4Linear) and not isinstance(m, ShardedNF4Linear))
    return dict(weights=weights, gradients=nbytes(params), optimizer=nbytes(opt_state["m"] + opt_state["v"]))


def sharded_state(names, params, opt_state):
    """What a sharded checkpoint holds, by name: torch.distributed.checkpoint writes each rank's
    pieces and reads them back in place (an exact resume takes the same number of ranks: the data
    plan depends on it)."""
    return {"trainable": dict(zip(names, params)), "m": dict(zip(names, opt_state["m"])),
            "v": dict(zip(names, opt_state["v"]))}


def save_sharded(folder, names, params, opt_state):
    """Every rank writes its pieces into `folder` (cleared first by rank 0)."""
    import shutil
    import torch.distributed.checkpoint as dcp
    if dist.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    dcp.save(sharded_state(names, params, opt_state), checkpoint_id=folder)


def sharded_shapes(folder):
    """{name: shape} of the trainable tensors a sharded checkpoint holds (its .metadata alone)."""
    from torch.distributed.checkpoint import FileSystemReader
    meta = FileSystemReader(folder).read_metadata().state_dict_metadata
    return {k[len("trainable."):]: tuple(m.size) for k, m in meta.items() if k.startswith("trainable.")}


def load_sharded(folder, names, params, opt_state):
    import torch.distributed.checkpoint as dcp
    dcp.load(sharded_state(names, params, opt_state), checkpoint_id=folder)


@contextlib.contextmanager
def gathered(net):
    """Every sharded module's whole weights as its attributes, on every rank, for the duration of the
    block (an export reads them on rank 0; use whole_state_dict, not state_dict(), whose FSDP hook
    would put the pieces back). Every rank must enter it."""
    from torch.distributed.fsdp import FSDPModule
    modules = [m for m in net.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()


def whole_state_dict(model):
    """model.state_dict() as its modules hold it now (whole inside gathered()), read from each
    module's own parameters and persistent buffers; the NF4 pieces are left out, as NF4Linear's
    state is not in a state_dict either."""
    state = {}
    for prefix, module in model.named_modules():
        skip = ShardedNF4Linear.PIECES if isinstance(module, ShardedNF4Linear) else ()
        tensors = list(module._parameters.items()) + [(n, b) for n, b in module._buffers.items()
                                                      if n not in module._non_persistent_buffers_set]
        state.update({f"{prefix}.{n}" if prefix else n: t for n, t in tensors if t is not None and n not in skip})
    return state


# ---------------------------------------------------------------------------------------------
# QLoRA under FSDP: the NF4 state as frozen parameters, so that fully_shard cuts and gathers it


class ShardedNF4Linear(NF4Linear):
    """NF4Linear with its packed bytes and absmax statistics registered as frozen parameters
    (NF4Linear keeps them as a plain attribute, out of model.to()'s reach): FSDP2 shards parameters
    only. `nf4` is rebuilt from them at each use: whole inside the block's all-gather."""
    PIECES = ("packed", "absmax", "absmax_scale", "absmax_offset")

    @property
    def nf4(self):
        return NF4State(*(self._parameters.get(name) for name in self.PIECES), self.nf4_shape, self.nf4_blocksize)


SHARDED_CLASSES = {}  # one class per NF4 class, made once


def sharded_class(cls):
    """ShardedNF4Linear's `nf4` with cls's forward (NF4Linear's, or its fast twin's in fast.py)."""
    if cls not in SHARDED_CLASSES:
        SHARDED_CLASSES[cls] = cls if issubclass(cls, ShardedNF4Linear) else type(
            "Sharded" + cls.__name__, (ShardedNF4Linear, cls), {})
    return SHARDED_CLASSES[cls]


def shard_nf4(model):
    """Every NF4Linear (or its fast twin) becomes a ShardedNF4Linear; no whole copy of its bytes
    stays behind on any rank."""
    for module in model.modules():
        if isinstance(module, NF4Linear):
            s = module.__dict__.pop("nf4")
            for name in ShardedNF4Linear.PIECES:
                t = getattr(s, name)
                if t is not None:  # a 0-d offset becomes (1,): fully_shard cuts along dim 0
                    module.register_parameter(name, nn.Parameter(t.reshape(-1), requires_grad=False))
            module.nf4_shape, module.nf4_blocksize = s.shape, s.blocksize
            module.__class__ = sharded_class(type(module))
