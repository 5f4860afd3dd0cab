"""A small, fixed NNCLR case shared by test_contrastive.py and the two-process helper ddp_nnclr.py."""
import torch

from model import MAECT, init_weights, model_config

HEAD = dict(proj_hidden=32, proj_dim=16, pred_hidden=32)


def make_case(stage3, batch=8, queue_size=16):
    """The same model, queue, views and indices in every process (all drawn from seed 0). Stage 3 trains the
    upper half with a target projector and top-1 lookup (top-k draws are random per rank)."""
    torch.manual_seed(0)
    cfg = model_config("vit_nano", 16, 4, 3)
    model = MAECT(cfg, queue_size, "mean", **HEAD, target=stage3)
    init_weights(model.encoder)  # the head keeps PyTorch's default init, as in init_head.py
    if stage3:
        model.target_projector.load_state_dict(model.head.projector.state_dict())
        model.encoder.freeze(2)  # before DDP, as contrastive_tune.py does: DDP reduces only trained params
    else:
        model.encoder.freeze(4)
    # half of the queue holds earlier embeddings of the batch's own images (indices 0..7): they must be skipped
    model.queue.indices[:batch] = torch.arange(batch)
    views = [torch.randn(batch, 3, 16, 16), torch.randn(batch, 3, 16, 16)]
    idx = torch.arange(batch)
    kw = dict(temperature=0.2, topk=1)
    model.train()
    return model, views, idx, kw
