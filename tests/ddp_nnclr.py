"""Helper for test_contrastive.py, run under `torchrun --nproc_per_node=2`: one NNCLR step of MAECT on this
rank's half of a fixed batch, through common.ddp and common.gather exactly as the stage scripts do, for the
stage-2 case and then the stage-3 case (one process group for both: torchrun's start-up is the slow part).
Saves the loss (averaged over ranks), the gradients after DDP's all-reduce and the queue after the enqueue to
OUT_PREFIX{0,1}.pt (1: stage 3)."""
import gc
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, __import__("os").path.dirname(__file__) + "/..")
import common  # noqa: E402
from tests.nnclr_case import make_case  # noqa: E402

out_prefix = sys.argv[1]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
proc = common.Proc(rank, world, torch.device("cpu"), torch.float32)

for stage3 in (False, True):
    model, views, idx, kw = make_case(stage3)
    n = idx.shape[0] // world
    mine = slice(rank * n, (rank + 1) * n)
    ddp = common.ddp(model, proc)
    loss, z0, _ = ddp([v[mine] for v in views], idx[mine], gather=lambda x: common.gather(x, grad=True), rank=rank, **kw)
    loss.backward()
    model.queue.enqueue(common.gather(z0), common.gather(idx[mine]))
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    if rank == 0:
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        torch.save(dict(loss=mean_loss / world, grads=grads, queue=model.queue.state_dict(),
                        bn={k: v for k, v in model.state_dict().items() if "running" in k}), f"{out_prefix}{int(stage3)}.pt")
    del ddp, loss
    gc.collect()  # free DDP's reference cycles while the process group lives (common.main_guard says why)
    dist.barrier()
dist.destroy_process_group()
