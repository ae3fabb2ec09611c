"""How fast a diffusion setting learns the classes: train DDGR's diffusion
model on SplitMNIST's first experience alone and report how often an MLP judge
(trained on all of MNIST) recognises the requested class in DDIM samples,
unguided and guided by a solver trained on that experience.

The figures in benchmarks/README.md ("What was tried for DDGR") came from
commands such as (one torch thread):

    AVL_GENREPLAY_DATA=../shared/data .venv/bin/python benchmarks/diffusion_probe.py \
        --steps 1000 --prediction sample --lr 2e-3 --ema 0.995
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F
from avalanche.models import SimpleMLP
from torch.utils.data import DataLoader

from avl_genreplay.bench.data import make_benchmark
from avl_genreplay.generators.diffusion import DDPMTrainer, DiffusionGenerator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument(
        "--prediction",
        default="sample",
        choices=["epsilon", "sample", "v_prediction"],
    )
    parser.add_argument("--snr-gamma", type=float, default=None)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema", type=float, default=None)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument(
        "--data-root", default=os.environ.get("AVL_GENREPLAY_DATA"), help="data root"
    )
    parser.add_argument("--threads", type=int, default=1)
    return parser


def _tensors(dataset):
    x, y, *_ = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    return x, y


def _mlp(x, y):
    """Avalanche's SimpleMLP, 2 epochs of Adam on ``(x, y)``."""
    model = SimpleMLP(num_classes=10, hidden_size=400, hidden_layers=2, drop_rate=0)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(2):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            batch = order[i : i + 128]
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    args = _parser().parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    benchmark = make_benchmark("splitmnist", data_root=args.data_root, seed=0)
    xs, ys = zip(*[_tensors(e.dataset) for e in benchmark.train_stream])
    judge = _mlp(torch.cat(xs), torch.cat(ys))
    x0, y0 = xs[0], ys[0]
    classes = y0.unique()
    solver = _mlp(x0, y0)
    generator = DiffusionGenerator(
        (1, 28, 28),
        10,
        base_channels=args.channels,
        sampling_steps=args.sampling_steps,
        prediction_type=args.prediction,
    )
    generator.calibrate_range(x0)
    trainer = DDPMTrainer(
        generator, lr=args.lr, snr_gamma=args.snr_gamma, ema_decay=args.ema
    )
    trainer.start_experience(0)
    labels = classes.repeat(100)

    def log_p(x, y):
        logits = solver(x)[:, classes]
        return F.log_softmax(logits, 1).gather(1, (y == classes[1]).long()[:, None])[
            :, 0
        ]

    started = time.time()
    for _ in range(args.steps):
        batch = torch.randint(len(x0), (args.batch,))
        trainer.train_step(x0[batch], y0[batch])
    rate = args.steps / (time.time() - started)
    print(f"{vars(args)}: {rate:.2f} training steps/s")
    for weights in ("last", "average"):
        if weights == "average":
            if args.ema is None:
                break
            trainer.end_experience(0)
        generator.eval()
        with torch.no_grad():
            images = generator.sample(200, labels, seed=1)
        found = [(judge(images).argmax(1) == labels).float().mean().item()]
        for scale in (1.0, 3.0):
            guided = generator.sample(
                200, labels, seed=1, guidance=log_p, guidance_scale=scale
            )
            found.append((judge(guided).argmax(1) == labels).float().mean().item())
        print(
            f"{weights} weights: requested class recognised in {found[0]:.3f} "
            f"unguided, {found[1]:.3f} guided (scale 1), {found[2]:.3f} (scale 3)"
        )


if __name__ == "__main__":
    main()
