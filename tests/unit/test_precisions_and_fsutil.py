"""The one precision table, and atomic publishing of files and folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medgemma_edge import UserError
from medgemma_edge.bundle.precisions import DEFAULT_ORDER, FAITHFUL_ORDER, FLAGS, PRECISIONS, check_names, names
from medgemma_edge.fsutil import atomic_write, clean_leftovers, partial_path, publishing_dir

pytestmark = pytest.mark.unit


def test_orders_list_every_precision_of_their_kind_once() -> None:
    for kind in ("decoder", "encoder"):
        assert sorted(DEFAULT_ORDER[kind]) == sorted(PRECISIONS[kind]) == sorted(FAITHFUL_ORDER[kind])


def test_every_row_has_a_bound_and_help() -> None:
    for kind, rows in PRECISIONS.items():
        for p in rows.values():
            assert p.help and 0 < p.max_kl < 12.0  # below ln(vocab) ~ 12.5: a bound that can fail
            assert (p.min_top1 is not None) == (kind == "decoder")
            assert (kind, p.format) in FLAGS


def test_bounds_grow_as_bits_shrink() -> None:
    d = {k: v.max_kl for k, v in PRECISIONS["decoder"].items()}
    assert d["gguf:f32"] < d["gguf:f16"] < d["gguf:bf16"] < d["gguf:q8_0"] < d["gguf:q4_k_m"] < d["gguf:q4_0"]
    assert d["onnx:fp32"] < d["onnx:int8"] < d["onnx:int4"] < d["onnx:int4_b128"]


def test_writers_know_exactly_the_table_precisions() -> None:
    from convert.writers.gguf_decoder import DECODER_PRECISIONS
    from convert.writers.gguf_mmproj import MMPROJ_PRECISIONS
    from convert.writers.onnx_decoder import ONNX_DECODER_PRECISIONS
    from convert.writers.onnx_vision import METHODS

    assert sorted(DECODER_PRECISIONS) == sorted(names("decoder", "gguf"))
    assert sorted(MMPROJ_PRECISIONS) == sorted(names("encoder", "gguf"))
    assert sorted(METHODS) == sorted(names("encoder", "onnx"))
    assert sorted(ONNX_DECODER_PRECISIONS) == sorted(names("decoder", "onnx"))


def test_check_names_dedups_and_refuses_unknown() -> None:
    assert check_names(["q8_0", "f16", "q8_0"], "decoder", "gguf") == ["q8_0", "f16"]
    with pytest.raises(UserError, match=r"--gguf 'q3_k' is not supported; choose from f32, f16"):
        check_names(["q3_k"], "decoder", "gguf")


def test_atomic_write_replaces_whole_and_leaves_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    atomic_write(target, "old")
    atomic_write(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_publishing_dir_publishes_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    with pytest.raises(RuntimeError):
        with publishing_dir(target) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with publishing_dir(target) as tmp:
        assert tmp.name == f".bundle.partial-{os.getpid()}"
        (tmp / "a").write_text("whole")
    assert (target / "a").read_text() == "whole"


def test_publishing_dir_replaces_only_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old").write_text("1")
    with pytest.raises(FileExistsError):
        with publishing_dir(target) as tmp:
            (tmp / "new").write_text("2")
    assert (target / "old").exists() and len(list(tmp_path.iterdir())) == 1
    with publishing_dir(target, replace=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new"] and len(list(tmp_path.iterdir())) == 1


def test_leftovers_of_dead_writers_are_cleaned_and_a_moved_target_restored(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".bundle.partial-{dead}"
    stale.mkdir()
    moved = tmp_path / f".bundle.old-{dead}"
    moved.mkdir()
    (moved / "manifest.json").write_text("{}")
    mine = partial_path(target)  # a live writer's (ours): never touched
    mine.mkdir()
    clean_leftovers(target)
    assert not stale.exists() and (target / "manifest.json").exists() and mine.exists()
