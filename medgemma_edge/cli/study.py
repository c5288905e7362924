"""`study-info`, and the study options `run`, `chat`, `render` and `bench` share: a CT/MR series or volume
(`--study`), priors (`--prior`), pan-and-scan (`--pan-and-scan`). The logic lives in runtime/studies.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from medgemma_edge.cli.app import EPILOG, cli
from medgemma_edge.cli.options import MAX_CTX, group, whole
from medgemma_edge.errors import UserError
from medgemma_edge.inputs.slices import DEFAULT_WINDOWING, WINDOWINGS
from medgemma_edge.inputs.volumes import MAX_SLICES, SLICE_ORDERS

MAX_SLICES_LIMIT = 512  # 512 x 256 image tokens already exceed MedGemma's 131072-token context
CHAT_ROOM = 2048  # tokens `chat --study` leaves for the conversation after the study (unless --ctx)

volume_options = group(
    click.option("--study", type=click.Path(path_type=Path), default=None,
                 help="A DICOM series or volume: a folder (several series: see --series), or a multi-frame file."),
    click.option("--series", default=None,
                 help="Which series of --study: its index or id from `study-info`, or its UID (default: the "
                      "largest axial one)."),
    click.option("--max-slices", default=MAX_SLICES, show_default=True, type=whole(1, MAX_SLICES_LIMIT),
                 help="At most this many slices, spread evenly as Google's CT notebook does."),
    click.option("--slice-order", type=click.Choice(SLICE_ORDERS), default="instance", show_default=True,
                 help="instance: by InstanceNumber, as the notebook; geometry: by position along the slice normal."),
    click.option("--windowing", type=click.Choice(sorted(WINDOWINGS)), default=DEFAULT_WINDOWING, show_default=True,
                 help="; ".join(f"{k}: {w.source}" for k, w in WINDOWINGS.items()) + "."),
)
study_options = group(
    volume_options,
    click.option("--instruction", default=None,
                 help="Text before the slices (default: the CT notebook's instruction, which names the abdomen; "
                      "'' for none)."),
    click.option("--prior", "priors", multiple=True, type=click.Path(path_type=Path),
                 help="An earlier image to compare with --image (repeatable); shown first, oldest first (StudyDate)."),
    click.option("--pan-and-scan", is_flag=True,
                 help="Crop wide or tall --image files as transformers' Gemma 3 processor does (more image tokens)."),
)


def check(kw: dict[str, Any], images: tuple[Path, ...] | list[Path]) -> None:
    """Refuse study options that do not go together (one line each)."""
    if kw["study"] is None:
        for key, flag, default in (("series", "--series", None), ("max_slices", "--max-slices", MAX_SLICES),
                                   ("slice_order", "--slice-order", "instance"), ("instruction", "--instruction", None),
                                   ("windowing", "--windowing", DEFAULT_WINDOWING)):
            if kw.get(key, default) != default:
                raise UserError(f"{flag} applies to --study; pass --study PATH or drop {flag}")
    elif images or kw.get("priors") or kw.get("pan_and_scan"):
        raise UserError("--study is one input of its own: drop --image, --prior and --pan-and-scan, or drop --study")
    elif kw.get("dicom_frame") is not None:
        raise UserError("--dicom-frame picks a frame of an --image; a --study reads every slice: drop --dicom-frame")
    if kw.get("priors") and not images:
        raise UserError("--prior needs the current image: pass it with --image")
    if kw.get("pan_and_scan") and not images:
        raise UserError("--pan-and-scan crops an image: pass it with --image")


def plan_turn(kw: dict[str, Any], prompt: str, images: tuple[Path, ...]) -> Any:
    """The study turn the options ask for, or None for a plain question (no --study/--prior/--pan-and-scan)."""
    from medgemma_edge.inputs.pan_and_scan import PanAndScan
    from medgemma_edge.runtime.studies import plan_images, plan_volume
    from medgemma_edge.runtime.study_prompt import NOTEBOOK_INSTRUCTION

    check(kw, images)
    if kw["study"] is not None:
        instruction = NOTEBOOK_INSTRUCTION if kw["instruction"] is None else kw["instruction"]
        return plan_volume(kw["study"], prompt, series=kw["series"], max_slices=kw["max_slices"],
                           slice_order=kw["slice_order"], preset=kw["windowing"], instruction=instruction,
                           dicom_context=kw["dicom_context"])
    if kw.get("priors") or kw.get("pan_and_scan"):
        return plan_images(prompt, images, kw.get("priors", ()), PanAndScan() if kw.get("pan_and_scan") else None,
                           kw["dicom_frame"], kw["dicom_context"])
    return None


def size_context(kw: dict[str, Any], turn: Any, room: int = 0) -> dict[str, Any]:
    """Set kw["n_ctx"] from the study (and `room` more tokens) unless --ctx was given; returns load() keywords
    (the slice fit, so that a refusal names the slice count that would fit)."""
    from click.core import ParameterSource

    from medgemma_edge.bundle import open_bundle

    if kw["bundle_dir"] is None:
        raise UserError("pass --bundle BUNDLE_DIR (a folder written by `medgemma-edge convert`)")
    cfg = open_bundle(kw["bundle_dir"]).config
    tpi = int(cfg.get("tokens_per_image") or 0)
    given = click.get_current_context().get_parameter_source("n_ctx") not in (ParameterSource.DEFAULT, None)
    if not given:
        need = turn.n_ctx(tpi, kw["max_new_tokens"] + room, kw["system"])
        if need > MAX_CTX:
            raise UserError(f"this study needs about {need} tokens, more than MedGemma's context of {MAX_CTX}; "
                            f"lower --max-slices")
        kw["n_ctx"] = max(need, 64)
    fit = turn.fit(tpi, kw["max_new_tokens"] + room, kw["system"])
    return {"slices": fit} if turn.volume is not None and not given else {}


@cli.command("study-info", epilog=EPILOG)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the series as a JSON list.")
def study_info_cmd(path: Path, as_json: bool) -> None:
    """List the series of a DICOM study (modality, plane, slices, size, spacing) and which one --study reads.

    No patient data is shown: series are named by index and an id derived from their UID.
    """
    from medgemma_edge.runtime.studies import study_info

    rows = study_info(path)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    default = any(r["default"] for r in rows)
    click.echo("index  id        modality  plane     slices  size       spacing mm  gaps  note")
    for r in rows:
        mark = "*" if r["default"] else " "
        spacing = "-" if r["spacing_mm"] is None else f"{r['spacing_mm']:g}"
        click.echo(f"{r['index']:>4}{mark}  {r['id']}  {r['modality']:<8}  {r['orientation']:<8}  {r['slices']:>6}  "
                   f"{r['size'] or '-':<9}  {spacing:>10}  {r['gaps']:>4}  {r.get('note', '')}")
    click.echo("* read by --study by default; choose another with --series INDEX" if default else
               "no series here can be read as a volume")
