"""Stage `train`: single-stage training; writes the final model and dvclive curves.

Launched by torchrun with several processes, every rank trains; rank 0 alone writes the
model, the prototype heatmap, checkpoints and dvclive logs, and returns the summary.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from seco_cli import distributed
from seco_cli.checkpoint import save_atomic
from seco_cli.data.prepared import PreparedDataset
from seco_cli.jsonio import write_text
from seco_cli.memory import CamHeads
from seco_cli.params import Params
from seco_cli.progress import Progress, Silent
from seco_cli.provenance import provenance
from seco_cli.trainer import train


def run(params: Params, prepared: Path, model_out: Path, live_dir: Path, ckpt_dir: Path,
        resume: bool = False, progress: Progress = Silent()) -> dict[str, Any]:
    with distributed.session(params.train.device, "train.device") as device:
        return _run(params, PreparedDataset(prepared), device, model_out, live_dir, ckpt_dir,
                    resume, progress if distributed.is_main_process() else Silent())


def _run(params: Params, data: PreparedDataset, device: torch.device, model_out: Path,
         live_dir: Path, ckpt_dir: Path, resume: bool, progress: Progress) -> dict[str, Any]:
    from dvclive import Live  # imported here: it is slow to import and only train needs it

    main = distributed.is_main_process()
    meta = {
        "backbone": params.model.backbone,
        "num_classes": data.num_classes,
        "classes": data.classes,
        **provenance(params.dump(), params.train.seed),
    }
    tp = params.train
    live_ctx = (Live(dir=str(live_dir), resume=resume, report=None, save_dvc_exp=False,
                     dvcyaml=None) if main else nullcontext())
    with live_ctx as live:
        last: dict[str, float] = {}
        if main:
            live.log_params({"preset": tp.preset, "iterations": tp.iterations, "seed": tp.seed,
                             "world_size": distributed.world_size()})

        def log(step: int, values: dict[str, float]) -> None:  # rank 0 only (the trainer)
            live.step = step
            for name, value in values.items():
                live.log_metric(name, value)
            live.next_step()
            last.update(values)

        ticks = iter(progress.track(range(tp.iterations), tp.iterations, "train"))

        def tick(_: int) -> None:
            next(ticks, None)

        trainer = train(params, data, device, meta, ckpt_dir, resume, log, tick)
        for _ in ticks:  # let the bar reach its end
            pass
        if main and trainer.cam_since is not None:  # train.cam_select: when each class's
            # CAM source (the model's meta cam_heads) began, e.g. its switch to the tiles, how
            # often it switched, and whether it ended on the tiles (1) or on a head (0)
            for name, since, switches, source in zip(
                    data.classes[1:], trainer.cam_since, trainer.cam_switches,
                    trainer.cam_sources, strict=True):
                for key, value in (("cam_since", since), ("cam_switches", switches),
                                   ("cam_tiles", int(source == CamHeads.TILES))):
                    live.log_metric(f"{key}/{name}", value, plot=False)
                    last[f"{key}/{name}"] = value
        if main and trainer.sched.uses_teacher:  # the prototypes were trained (L_iG, L_iL)
            pairs = [(p.victim, p.partner) for p in params.evaluate.pairs]
            for name, value in prototype_pair_similarity(
                    trainer.method.prototypes.P, data.classes[1:], pairs).items():
                live.log_metric(f"proto/{name}", value, plot=False)
                last[f"proto/{name}"] = value
    if main:
        save_atomic(trainer.final(), model_out)
        write_prototype_similarity(trainer.method.prototypes.P, data.classes[1:],
                                   model_out.parent / "prototype_similarity.csv")
    distributed.barrier()  # the stage ends on every rank once the model is written
    if not main:
        return {}  # the CLI prints the summary once
    return {"iterations": trainer.iteration, **last}


def prototype_pair_similarity(prototypes: torch.Tensor, names: list[str],
                              pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Cosine similarity of the prototypes of each class pair (``victim~partner``; context
    pairs, partner background, and unknown names are skipped), and ``mean_off_diagonal`` over
    all class pairs: the summary the quality benchmark reads (paper Fig. 5)."""
    sim = (prototypes @ prototypes.T).float().cpu()  # (C, C), rows are unit vectors
    index = {n: i for i, n in enumerate(names)}
    out = {f"{a}~{b}": float(sim[index[a], index[b]]) for a, b in pairs
           if a in index and b in index and a != b}
    c = sim.shape[0]
    if c > 1:
        out["mean_off_diagonal"] = float((sim.sum() - sim.diagonal().sum()) / (c * (c - 1)))
    return out


def write_prototype_similarity(prototypes: torch.Tensor, names: list[str], path: Path) -> None:
    """Cosine similarity between the class prototypes (paper Fig. 5) as ``a,b,similarity``
    rows for the ``heatmap`` DVC plot template. Random-init prototypes (presets without
    L_iG) give near-zero off-diagonal values."""
    sim = (prototypes @ prototypes.T).cpu().numpy()  # (C, C), rows are unit vectors
    lines = ["a,b,similarity"] + [f"{a},{b},{sim[i, j]:.6f}" for i, a in enumerate(names)
                                  for j, b in enumerate(names)]
    write_text(path, "\n".join(lines) + "\n")
