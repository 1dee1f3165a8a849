"""The `seco` command line: one thin command per pipeline stage.

Every command takes ``--params`` (default ``params.yaml``), repeatable ``--set
section.key=value`` overrides and ``--debug``; its input and output paths default to those of
``dvc.yaml``. A user error prints one line (what, where, how to fix) and exits 2.
"""

from __future__ import annotations

import errno
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from seco_cli import __version__
from seco_cli.errors import SecoError, write_error
from seco_cli.params import Params, load_params
from seco_cli.progress import RichProgress
from seco_cli.shards import resolve_shard

app = typer.Typer(
    help="SeCo (Separate and Conquer) weakly supervised semantic segmentation pipeline.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
out_console = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameter file (YAML).")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a parameter: section.key=value (repeatable).")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
ShardOpt = Annotated[str | None, typer.Option(
    "--shard", help="i/n: process the i-th of n disjoint shares of the images into the one "
    "store (default: torchrun's RANK/WORLD_SIZE, else 0/1).")]
PREPARED = Path("artifacts/prepared")
MODEL = Path("artifacts/train/model.pt")
CAMS = Path("artifacts/cams.zarr")
PSEUDO = Path("artifacts/pseudo.zarr")
SEGMENT = Path("artifacts/segment.zarr")
PSEUDO_PNG = Path("artifacts/pseudo_png")


def _path(help_text: str) -> Any:
    return typer.Option(help=help_text)


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _execute(command: str, params_file: Path, overrides: list[str] | None, debug: bool,
              body: Callable[[Params], dict[str, Any]]) -> None:
    """Load params, run the body of ``seco <command>``, turn user errors into one line and
    exit code 2."""
    try:
        params = load_params(params_file, overrides or [])
        result = body(params)
    except SecoError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {exc.line()}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: no output of this stage is marked complete")
        raise typer.Exit(130) from None
    except OSError as exc:  # full disk, quota, read-only or forbidden output: one line
        if debug or exc.errno not in _WRITE_ERRNOS:
            raise
        err = write_error(exc, "an output file", str(exc.filename or "the output folder"),
                          f"seco {command}", "no output of this stage is marked complete")
        err_console.print(f"[bold red]error:[/] {err.line()}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if result:
        out_console.print_json(json.dumps(result, default=str))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"seco {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """SeCo pipeline: prepare → train → cams → pseudo → segment → evaluate."""


@app.command()
def prepare(
    out: Annotated[Path, _path("Prepared dataset folder to write.")] = PREPARED,
    metrics: Annotated[Path, _path("Summary metrics JSON to write.")] = Path("artifacts/metrics/prepare.json"),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Convert the source dataset (data.source) into the canonical prepared dataset."""
    from stages import prepare as stage

    _execute("prepare", params, set_, debug,
             lambda p: stage.run(p, out, metrics, RichProgress(err_console))["splits"])


@app.command()
def train(
    prepared: Annotated[Path, _path("Prepared dataset folder.")] = PREPARED,
    model: Annotated[Path, _path("Final model file to write.")] = MODEL,
    live: Annotated[Path, _path("dvclive folder (curves, metrics).")] = Path("artifacts/train/live"),
    checkpoints: Annotated[Path, _path("Folder of resumable checkpoints.")] = Path("artifacts/checkpoints"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Train the network (single stage) on the train split.

    One process by default. N processes or GPUs, each on train.batch_size images:
    torchrun --nproc_per_node N -m seco_cli.cli train
    """
    from stages import train as stage

    _execute("train", params, set_, debug, lambda p: stage.run(
        p, prepared, model, live, checkpoints, resume, RichProgress(err_console)))


@app.command()
def cams(
    prepared: Annotated[Path, _path("Prepared dataset folder.")] = PREPARED,
    model: Annotated[Path, _path("Trained model file.")] = MODEL,
    out: Annotated[Path, _path("CAM store (Zarr) to write.")] = CAMS,
    shard: ShardOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Compute CAM seeds (scales + flip) for the train split."""
    from stages import cams as stage

    _execute("cams", params, set_, debug, lambda p: stage.run(
        p, prepared, model, out, resolve_shard(shard), RichProgress(err_console)))


@app.command()
def pseudo(
    prepared: Annotated[Path, _path("Prepared dataset folder.")] = PREPARED,
    cams: Annotated[Path, _path("CAM store (Zarr).")] = CAMS,
    out: Annotated[Path, _path("Pseudo-mask store (Zarr) to write.")] = PSEUDO,
    png_dir: Annotated[Path, _path("Folder of VOC-palette PNG masks (pseudo.palette_png).")] = PSEUDO_PNG,
    shard: ShardOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Turn CAM seeds into pseudo masks (background score, optional PAR, dense CRF)."""
    from stages import pseudo as stage

    _execute("pseudo", params, set_, debug, lambda p: stage.run(
        p, prepared, cams, out, png_dir, resolve_shard(shard), RichProgress(err_console)))


@app.command()
def segment(
    prepared: Annotated[Path, _path("Prepared dataset folder.")] = PREPARED,
    model: Annotated[Path, _path("Trained model file.")] = MODEL,
    out: Annotated[Path, _path("Segmentation store (Zarr) to write.")] = SEGMENT,
    png_dir: Annotated[Path, _path("Folder of VOC-palette PNG predictions.")] = Path("artifacts/segment_png"),
    shard: ShardOpt = None,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Segment the eval split: variants raw (scale 1) and ms_crf (scales + flip + CRF)."""
    from stages import segment as stage

    _execute("segment", params, set_, debug, lambda p: stage.run(
        p, prepared, model, out, png_dir, resolve_shard(shard), RichProgress(err_console)))


@app.command()
def evaluate(
    prepared: Annotated[Path, _path("Prepared dataset folder.")] = PREPARED,
    cams: Annotated[Path, _path("CAM store (Zarr).")] = CAMS,
    pseudo: Annotated[Path, _path("Pseudo-mask store (Zarr).")] = PSEUDO,
    segment: Annotated[Path, _path("Segmentation store (Zarr).")] = SEGMENT,
    metrics: Annotated[Path, _path("Metrics JSON to write.")] = Path("artifacts/metrics/evaluate.json"),
    plots: Annotated[Path, _path("Folder of plot data (CSV) and the full report.")] = Path("artifacts/plots"),
    model: Annotated[Path, _path("Trained model file, for the isolated-patch probe "
                                 "(evaluate.probe_images > 0).")] = MODEL,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Score CAM seeds, pseudo masks and segmentation against the ground truth, and probe the
    classifier with isolated patches of each coupled pair."""
    from stages import evaluate as stage

    def body(p: Params) -> dict[str, Any]:
        with RichProgress(err_console).counter("evaluate") as advance:
            return stage.run(p, prepared, cams, pseudo, segment, metrics, plots, advance,
                             model=model)

    _execute("evaluate", params, set_, debug, body)


def main() -> None:
    app(prog_name="seco")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
