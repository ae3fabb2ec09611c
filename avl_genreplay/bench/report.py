"""What a person reads of a comparison: a markdown table, plots and images of
replayed samples."""

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from avalanche.distributed import DistributedHelper
from torch import nn

from avl_genreplay.bench.store import mean_std

__all__ = [
    "markdown_table",
    "sampling_table",
    "replay_quality_table",
    "write_markdown",
    "write_plots",
    "plot_seen_accuracy",
    "plot_accuracy_matrices",
    "replay_grid",
    "ReplayImageSaver",
]


def _pm(mean: Optional[float], std: Optional[float], scale: float = 1.0, digits=1):
    if mean is None:
        return "–"
    return f"{mean * scale:.{digits}f} ± {(std or 0.0) * scale:.{digits}f}"


RETAINED_NOTE = (
    "retained (MB): the most that a strategy kept from one experience to the "
    "next besides its solver (every network, frozen copy, optimiser state that "
    "lives on, replay pool and exemplar buffer), measured from its objects "
    "after each experience (avl_genreplay.retained.retained_bytes)."
)


def markdown_table(summary: Dict[str, dict]) -> str:
    """One row per strategy: accuracy and forgetting (in %), BWT, wall time,
    peak RAM and what the strategy retains between experiences, as mean ±
    std over seeds."""
    lines = [
        "| strategy | final avg acc (%) | avg forgetting (%) | BWT (%) | wall (s) "
        "| peak RAM (MB) | retained (MB) | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lines.append(
            f"| {name} | {_pm(s['final_avg_acc'], s['final_avg_acc_std'], 100)} "
            f"| {_pm(s['avg_forgetting'], s['avg_forgetting_std'], 100)} "
            f"| {_pm(s['bwt'], s['bwt_std'], 100)} "
            f"| {_pm(s['wall_seconds'], s['wall_seconds_std'], digits=0)} "
            f"| {_pm(s['peak_ram_mb'], s['peak_ram_mb_std'], digits=0)} "
            f"| {_pm(s.get('retained_mb'), s.get('retained_mb_std'))} "
            f"| {len(s['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


def sampling_table(summary: Dict[str, dict]) -> str:
    """The cost of refilling replay pools (DDGR), per strategy with one: images
    sampled and seconds spent per run, images per second, sampler and steps
    (mean ± std over seeds); ``""`` if no strategy has a pool."""
    lines = []
    for name, s in summary.items():
        logs = [run.get("replay_sampling") or [] for run in s["runs"]]
        if not any(logs):
            continue
        images = [float(sum(e["images"] for e in log)) for log in logs]
        seconds = [sum(e["seconds"] for e in log) for log in logs]
        rates = [i / max(t, 1e-9) for i, t in zip(images, seconds)]
        last = next(log[-1] for log in logs if log)
        sampler = last.get("sampler") or "–"
        steps = last.get("denoising_steps") or "–"
        lines.append(
            f"| {name} | {_pm(*mean_std(images), digits=0)} "
            f"| {_pm(*mean_std(seconds), digits=0)} "
            f"| {_pm(*mean_std(rates), digits=1)} | {sampler} | {steps} |"
        )
    if not lines:
        return ""
    header = [
        "| strategy | images sampled per run | sampling time per run (s) "
        "| images/s | sampler | denoising steps |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(header + lines) + "\n"


REPLAY_QUALITY_NOTE = (
    "Replay quality, averaged over the experiences whose generator was replayed "
    "(all but the last): score is a reference classifier's accuracy on samples "
    "of each requested past class (conditional generators: accuracy) or the "
    "share of the past classes the samples cover as the reference sees them "
    "(unconditional: coverage, 1 when every class is equally present); the "
    "Fréchet distance compares samples and real test images in the reference's "
    "feature space (not Inception's FID)."
)


def _replayed_mean(series: Optional[list]) -> Optional[float]:
    """Mean of a per-experience series over all experiences but the last
    (whose generator nothing replays), or the one value of a single one."""
    if not series:
        return None
    replayed = series[:-1] or series
    return sum(replayed) / len(replayed)


def replay_quality_table(summary: Dict[str, dict]) -> str:
    """Per strategy with replay-quality metrics: its score (accuracy or
    coverage, in %) and Fréchet distance, mean ± std over seeds; ``""`` if no
    strategy has them."""
    lines = []
    for name, s in summary.items():
        qualities = [run.get("replay_quality") for run in s["runs"]]
        qualities = [q for q in qualities if q]
        if not qualities:
            continue
        kind = "accuracy" if "ReplayClassifierAccuracy" in qualities[0] else "coverage"
        key = (
            "ReplayClassifierAccuracy" if kind == "accuracy" else "ReplayClassCoverage"
        )
        scores = [_replayed_mean(q.get(key)) for q in qualities]
        distances = [_replayed_mean(q.get("ReplayFrechetDistance")) for q in qualities]
        lines.append(
            f"| {name} | {kind} | {_pm(*mean_std(scores), scale=100)} "
            f"| {_pm(*mean_std(distances), digits=2)} | {len(qualities)} |"
        )
    if not lines:
        return ""
    header = [
        "| strategy | score | replay score (%) | Fréchet distance | seeds |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(header + lines) + "\n"


def write_markdown(
    path: Path, title: str, summary: Dict[str, dict], complete: bool
) -> str:
    """Writes the results table (and the pool-sampling table, if any) as
    markdown; returns the results table."""
    table = markdown_table(summary)
    heading = f"# {title}"
    if not complete:
        heading += " (partial: the run is still going or was cut off)"
    sampling = sampling_table(summary)
    if sampling:
        sampling = (
            f"\nCost of sampling the replay pools (all experiences):\n\n{sampling}"
        )
    quality = replay_quality_table(summary)
    if quality:
        quality = f"\n{REPLAY_QUALITY_NOTE}\n\n{quality}"
    text = f"{heading}\n\n{table}\n{RETAINED_NOTE}\n{quality}{sampling}"
    path.write_text(text)
    return table


def write_plots(summary: Dict[str, dict], stem: Path, title: str) -> None:
    """``<stem>_accuracy.png`` and ``<stem>_matrices.png``."""
    plot_seen_accuracy(summary, stem.with_name(f"{stem.name}_accuracy.png"), title)
    plot_accuracy_matrices(summary, stem.with_name(f"{stem.name}_matrices.png"))


def seen_accuracy(matrix: List[List[float]]) -> List[float]:
    """Average accuracy over the experiences seen, after each experience."""
    return [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(matrix)]


def plot_seen_accuracy(summary: Dict[str, dict], path: Path, title: str) -> None:
    """Accuracy on the experiences seen so far after each experience, one line
    per strategy (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in summary.items():
        matrices = [r["accuracy_matrix"] for r in s["runs"]]
        if len(matrices[0]) == 1:
            # joint training: one row, after the whole stream, over all of it
            final = torch.tensor([m[-1] for m in matrices]).mean()
            ax.axhline(100 * final, ls="--", lw=1, color="grey", label=name)
            continue
        mean = torch.tensor([seen_accuracy(m) for m in matrices]).mean(0)
        steps = range(1, len(mean) + 1)
        ax.plot(steps, 100 * mean, marker="o", label=name)
    ax.set_xlabel("experiences trained")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy on experiences seen (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_accuracy_matrices(summary: Dict[str, dict], path: Path) -> None:
    """Each strategy's accuracy matrix (first seed) as a heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8))
    axes = [axes] if len(names) == 1 else list(axes)
    for ax, name in zip(axes, names):
        matrix = torch.tensor(summary[name]["runs"][0]["accuracy_matrix"])
        ax.imshow(100 * matrix, vmin=0, vmax=100, cmap="viridis")
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{100 * matrix[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("test experience", fontsize=7)
        ax.set_ylabel("after training", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def replay_grid(
    generator: nn.Module,
    classes: Sequence[int],
    per_class: int = 8,
    labeller: Optional[nn.Module] = None,
    max_draws: int = 2000,
) -> torch.Tensor:
    """A grid image (C x H x W, values in [0, 1]) of replayed samples, one row
    per past class.

    A conditional generator is asked for each class; an unconditional one is
    sampled and its samples sorted by the ``labeller``'s (old solver's)
    prediction, up to ``max_draws`` draws; empty cells stay black.
    """
    from torchvision.utils import make_grid

    device = next(generator.parameters()).device
    generator.eval()
    rows: List[torch.Tensor] = []
    if getattr(generator, "num_classes", None) is not None:
        for c in classes:
            rows.append(
                generator.generate(
                    per_class, torch.full((per_class,), c, device=device)
                )
            )
    else:
        draws = generator.generate(max_draws)
        predicted = labeller(draws).argmax(1) if labeller is not None else None
        for c in classes:
            picked = (
                draws[predicted == c][:per_class]
                if predicted is not None
                else draws[:per_class]
            )
            pad = per_class - len(picked)
            if pad > 0:
                picked = torch.cat(
                    [
                        picked,
                        torch.full(
                            (pad, *draws.shape[1:]), float("nan"), device=device
                        ),
                    ]
                )
            rows.append(picked)
    images = torch.cat(rows)
    low = torch.nan_to_num(images, nan=float("inf")).amin(dim=(0, 2, 3), keepdim=True)
    high = torch.nan_to_num(images, nan=float("-inf")).amax(dim=(0, 2, 3), keepdim=True)
    images = ((images - low) / (high - low).clamp_min(1e-8)).nan_to_num(0.0)
    return make_grid(images.cpu(), nrow=per_class, padding=1)


class ReplayImageSaver:
    """Saves (and logs to TensorBoard) a grid of replayed samples per past
    class after each experience of a generative strategy; called as
    ``saver(strategy, index)``.

    :param folder: where the PNG files go.
    :param run_name: the files' prefix, e.g. ``dgr_seed0``.
    :param loggers: the run's loggers; TensorBoard ones get the grid too.
    :param benchmark: the run's benchmark (for the classes seen so far).
    """

    def __init__(self, folder: Path, run_name: str, loggers: list, benchmark):
        from avalanche.logging import TensorboardLogger

        self.folder = folder
        self.run_name = run_name
        self.boards = [log for log in loggers if isinstance(log, TensorboardLogger)]
        self.classes = [
            list(e.classes_in_this_experience) for e in benchmark.train_stream
        ]

    def __call__(self, strategy, index: int) -> None:
        from avalanche.models import MultiTaskModule
        from torchvision.utils import save_image

        generator = getattr(strategy, "generator", None)
        if generator is None:
            return
        seen = sorted({c for classes in self.classes[: index + 1] for c in classes})
        labeller = (
            None if isinstance(strategy.model, MultiTaskModule) else strategy.model
        )
        if labeller is not None:
            labeller.eval()
        grid = replay_grid(generator, seen, labeller=labeller)
        # drawn on every rank of a distributed run all the same: the draws
        # keep the ranks' global random states alike; rank 0 writes
        if not DistributedHelper.is_main_process:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        save_image(grid, self.folder / f"{self.run_name}_exp{index}.png")
        for board in self.boards:
            board.writer.add_image(f"replay/{self.run_name}", grid, index)
