"""Study pieces that need no model: the sliding-window KV preflight, the slice count a refusal names,
encoder batch sizes, prior ordering by StudyDate, and the template's content items."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
import pytest

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.priors import order_images, study_date
from medgemma_edge.inputs.sample_series import write_series
from medgemma_edge.runtime import memory
from medgemma_edge.runtime.study_prompt import comparison_content, volume_content
from medgemma_edge.runtime.template import Control, ImageItem, ImageSlot, Turn, render_conversation, render_prompt

pytestmark = pytest.mark.unit
GiB = 1 << 30
# MedGemma 4B's decoder (google/medgemma-4b-it config.json): 34 layers, every 6th global, window 1024
LAYERS = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(34)]
CFG_4B = {"text": {"num_layers": 34, "num_kv_heads": 4, "head_dim": 256, "vocab_size": 262208, "hidden_size": 2560,
                   "intermediate_size": 10240, "sliding_window": 1024, "layer_types": LAYERS},
          "vision": {"image_size": 896, "patch_size": 14, "hidden_size": 1152}, "tokens_per_image": 256}


def test_kv_cells_follow_what_each_backend_allocates() -> None:
    n_ctx = 23_000  # about 85 slices of 256 tokens
    full = memory.kv_cells(CFG_4B, n_ctx, 512, "llama.cpp", swa_full=True)
    assert full == [23040] * 34  # llama.cpp pads to 256; swa_full: every layer keeps the whole context
    swa = memory.kv_cells(CFG_4B, n_ctx, 512, "llama.cpp", swa_full=False)
    assert swa.count(23040) == 5 and swa.count(1536) == 29  # ref: size_swa = pad256(min(n_ctx, n_swa + n_ubatch))
    onnx = memory.kv_cells(CFG_4B, n_ctx, 512, "onnx")
    assert onnx.count(n_ctx) == 5 and onnx.count(1280) == 29  # a ring of window + chunk - 1 = 1279, grown by 256
    f16 = 2 * 4 * 256 * 2  # K and V, 4 KV heads of 256, f16
    assert memory.estimate(CFG_4B, 0, n_ctx, 512, 2, False, full)["kv_cache"] == 34 * 23040 * f16  # 3.0 GiB
    assert memory.estimate(CFG_4B, 0, n_ctx, 512, 2, False, swa)["kv_cache"] == (5 * 23040 + 29 * 1536) * f16
    short = memory.kv_cells(CFG_4B, 300, 512, "llama.cpp", swa_full=False)
    assert short == [512] * 34  # a context shorter than the window: the window never applies


def test_a_study_that_does_not_fit_names_the_slice_count_that_would() -> None:
    weights = 3 * GiB
    fit = memory.SliceFit(n_slices=85, per_slice=264, fixed=400)

    def need_for(ctx: int) -> dict[str, int]:
        cells = memory.kv_cells(CFG_4B, ctx, 512, "llama.cpp", swa_full=True)
        return memory.estimate(CFG_4B, weights, ctx, 512, 2, True, cells)

    limit = sum(need_for(fit.ctx(40)).values()) + 1000  # 40 slices fit, 41 do not
    assert sum(need_for(fit.ctx(41)).values()) > limit
    with pytest.raises(UserError) as exc:
        memory.preflight_slices(need_for, fit, limit, False, "bundle")
    msg = str(exc.value)
    assert "\n" not in msg and "(85 slices)" in msg and "--max-slices 40 would fit" in msg
    memory.preflight_slices(need_for, fit, sum(need_for(fit.ctx(85)).values()), False, "bundle")  # fits: no error
    with pytest.raises(UserError, match="not even one slice"):
        memory.preflight_slices(need_for, fit, weights, False, "bundle")
    memory.preflight_slices(need_for, fit, weights, True, "bundle")  # --force: a warning, no refusal


def test_encode_batch_size_from_memory() -> None:
    per = memory.vision_bytes_per_image(CFG_4B)
    assert per == 4096 * 24 * 1152 * 4  # the estimate's own vision term, 0.45 GB at 4B
    assert memory.encode_batch_size(per, None) == 1
    assert memory.encode_batch_size(per, 2 * per) == 1
    assert memory.encode_batch_size(per, 7 * per) == 2  # a CPU stops at 2
    assert memory.encode_batch_size(per, 7 * per, on_cpu=False) == 3
    assert memory.encode_batch_size(per, 100 * per, on_cpu=False) == 8
    assert memory.largest_fitting(lambda n: n * n, 50, 100) == 7


def test_priors_are_ordered_by_study_date(tmp_path: Path) -> None:
    old = write_series(tmp_path / "old", 1, size=8, study_date="20190301")[0]
    mid = write_series(tmp_path / "mid", 1, size=8, study_date="20210715")[0]
    new = write_series(tmp_path / "new", 1, size=8, study_date="20240102")[0]
    assert study_date(old) == "2019-03-01"
    assert order_images([new], [mid, old]) == [old, mid, new]  # oldest prior first, the current image last
    with pytest.raises(UserError) as exc:
        order_images([mid], [new])
    msg = str(exc.value)
    assert str(new) in msg and "swap" in msg and "2024" not in msg and "20240102" not in msg  # no date shown
    png = tmp_path / "x.png"
    png.write_bytes(b"")
    assert order_images([new], [png, old]) == [png, old, new]  # not all dated: the order given
    ds = pydicom.dcmread(old)
    with warnings.catch_warnings():  # pydicom warns about the invalid value we mean to write
        warnings.simplefilter("ignore")
        ds.StudyDate = "not a date"
    ds.save_as(old)
    assert study_date(old) is None
    with pytest.raises(UserError, match="--image"):
        order_images([], [old])


def test_content_items_render_like_the_plain_template() -> None:
    plain = render_prompt("Describe", 2, "S")
    items = render_conversation([Turn("user", "", content=("Describe", ImageItem(), ImageItem()))], "S")
    assert plain == items
    turn = Turn("user", "", content=volume_content("Q?", 3, "Look."))
    assert turn.n_slots == 3
    parts = render_conversation([turn])
    texts = [p for p in parts if isinstance(p, str) and p.strip()]
    assert texts == ["user\n", "Look.", "SLICE 1", "SLICE 2", "SLICE 3", "Q?", "model\n"]
    assert [p.index for p in parts if isinstance(p, ImageSlot)] == [0, 1, 2]
    crops = render_conversation([Turn("user", "", content=comparison_content("Q", 2, [2, 0]))])
    assert [p.index for p in crops if isinstance(p, ImageSlot)] == [0, 1, 2, 3]  # prior + 2 crops, then current
    assert "Here is the original image " in crops and " and here are some crops to help you see better " in crops
    assert sum(isinstance(p, Control) for p in crops) == 4 + 2 * 4  # BOS and the turn markers; two per image
