"""Reference for `pcb bench trainer`: the same training step in torchvision with
torch.distributed (Gloo) and DistributedDataParallel, on this machine's CPU.

Model as the Rust side builds it: Faster R-CNN with a ResNet-18 FPN of 128 channels,
trainable batch norm, 7 classes, square images of --size, 128 sampled proposals per image,
SGD. Configurations: 1 rank x 1 thread, 1 rank x N threads, N ranks x 1 thread (DDP).
The all-reduce time per step is timed apart from the step (DDP overlaps it with the
backward pass): N ranks all-reduce one flat tensor of the model's gradient size.

Prints one JSON list of rows on stdout. Needs torch==2.11.0 and torchvision==0.26.0
(deploy/requirements-bench.txt).
"""

import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


def build(size):
    torch.manual_seed(1)
    body = torchvision.models.resnet18(weights=None, norm_layer=torch.nn.BatchNorm2d)
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[64, 128, 256, 512],
        out_channels=128,
        extra_blocks=LastLevelMaxPool(),
    )
    return FasterRCNN(
        backbone,
        num_classes=7,
        min_size=size,
        max_size=size,
        box_batch_size_per_image=128,
    )


def batch(rank, n, size):
    g = torch.Generator().manual_seed(100 + rank)
    s = size / 160.0
    imgs = [0.5 + 0.5 * torch.rand(3, size, size, generator=g) for _ in range(n)]
    tgts = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0], [80.0, 20.0, 140.0, 90.0]]) * s,
            "labels": torch.tensor([1, 4]),
        }
        for _ in range(n)
    ]
    return imgs, tgts


def worker(rank, world, threads, port, args, queue):
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    model = build(args.size).train()
    params = [p for p in model.parameters() if p.requires_grad]
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(params, lr=1e-5, momentum=0.9)
    local = args.batch // world + (1 if rank < args.batch % world else 0)
    imgs, tgts = batch(rank, local, args.size)

    def step():
        loss = sum(net(imgs, tgts).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    if world > 1:
        dist.barrier()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - t
    allreduce = None
    if world > 1:
        flat = torch.zeros(sum(p.numel() for p in params))
        dist.all_reduce(flat)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(args.steps):
            dist.all_reduce(flat)
        allreduce = (time.perf_counter() - t) / args.steps
        dist.destroy_process_group()
    queue.put((rank, seconds, allreduce))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(world, threads, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=worker, args=(r, world, threads, port, args, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            sys.exit(f"rank failed with exit code {p.exitcode}")
    seconds = max(r[1] for r in results)
    ar = [r[2] for r in results if r[2] is not None]
    return {
        "side": "torchvision + DDP (Gloo)" if world > 1 else "torchvision",
        "ranks": world,
        "threads": threads,
        "images_per_s": args.batch * args.steps / seconds,
        "allreduce_ms": 1e3 * sum(ar) / len(ar) if ar else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--ranks", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    n = args.ranks
    rows = []
    for world, threads in [(1, 1), (1, n), (n, 1)]:
        print(f"bench: torchvision, {world} rank(s) x {threads} thread(s)", file=sys.stderr)
        rows.append(config(world, threads, args))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
