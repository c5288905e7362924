"""The server's pure parts: who may connect, keys, request -> turns and SamplingParams, stop strings, slot choice
and the bounded queue, and uploaded images checked as files are (no model, no server process)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgemma_edge.errors import UserError
from medgemma_edge.inputs.images import load_image
from medgemma_edge.inputs.uploads import Upload, data_url_bytes, image_url, sniff
from medgemma_edge.runtime.caches import ImageSpan, PromptCache
from medgemma_edge.runtime.sampling import SamplingParams
from medgemma_edge.serve.auth import Keys, check_bind, is_loopback, read_keys
from medgemma_edge.serve.requests import conversation, fit_to_context, to_sampling, wants_thinking
from medgemma_edge.serve.schemas import ChatRequest
from medgemma_edge.serve.slots import SlotPool

pytestmark = pytest.mark.unit


def png_bytes(size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(size[0] * size[1] * 3, dtype=np.uint8).reshape(size[1], size[0], 3)).save(buf, "PNG")
    return buf.getvalue()


def test_loopback_and_binding() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.2", "192.168.1.5", "example.org", ""]))
    check_bind("127.0.0.1", [])
    check_bind("0.0.0.0", ["k" * 16])
    with pytest.raises(UserError, match="--api-key-file"):
        check_bind("0.0.0.0", [])


def test_keys(tmp_path: Path) -> None:
    keys = Keys(["a" * 20, "b" * 20])
    assert keys.check(None) == (401, None) and keys.check("Bearer ") == (401, None)
    assert keys.check("Bearer " + "c" * 20)[0] == 403 and keys.check("Token " + "a" * 20)[0] == 403
    assert keys.check("Bearer " + "b" * 20)[0] == 0
    basic = base64.b64encode(b"anyone:" + b"a" * 20).decode()
    assert keys.check("Basic " + basic)[0] == 0 and keys.check("Basic !!!")[0] == 403
    path = tmp_path / "keys"
    path.write_text("# comment\n\n" + "k" * 16 + "\n")
    assert read_keys(path) == ["k" * 16]
    for bad, match in (("", "holds no key"), ("short\n", "16 characters"), ("a key with spaces!!\n", "spaces")):
        path.write_text(bad)
        with pytest.raises(UserError, match=match):
            read_keys(path)
    with pytest.raises(UserError, match="not found"):
        read_keys(tmp_path / "missing")


def request(**kw: object) -> ChatRequest:
    return ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def test_to_sampling_maps_every_openai_field_in_one_place() -> None:
    assert to_sampling(request()) == SamplingParams()  # omitted fields: the library's (greedy) defaults
    p = to_sampling(request(max_tokens=7, temperature=0.5, top_p=0.9, top_k=5, seed=3, stop="END", min_p=0.1,
                            presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                            logit_bias={"42": -100, "7": 2.5}))
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop) == (7, 0.5, 0.9, 5, 3, ("END",))
    assert (p.min_p, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.1, 0.5, -0.5, 1.2)
    assert p.bias == {42: -100.0, 7: 2.5}
    schema = {"type": "object", "properties": {"impression": {"type": "string"}}, "required": ["impression"]}
    p = to_sampling(request(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}))
    assert json.loads(p.json_schema) == schema
    assert json.loads(to_sampling(request(response_format={"type": "json_object"})).json_schema) == {"type": "object"}
    assert to_sampling(request(response_format={"type": "text"})).json_schema is None
    assert to_sampling(request(max_completion_tokens=9, max_tokens=3)).max_new_tokens == 9
    with pytest.raises(UserError, match="output limit"):
        to_sampling(request(max_tokens=9000))
    for field, value in (("logprobs", True), ("tools", [{"type": "function"}])):
        with pytest.raises(UserError, match=field):
            to_sampling(request(**{field: value}))
    with pytest.raises(UserError, match="empty stop string"):
        to_sampling(request(stop=["x", ""]))
    assert wants_thinking(request(chat_template_kwargs={"enable_thinking": True})) and wants_thinking(request(thinking=True))
    assert not wants_thinking(request())


def test_fit_to_context() -> None:
    s = SamplingParams(max_new_tokens=256)
    assert fit_to_context(s, False, 4000, 4096).max_new_tokens == 96  # the default shortened to what is left
    with pytest.raises(UserError, match="lower max_tokens to 96"):
        fit_to_context(s, True, 4000, 4096)


def test_conversation_order_images_and_limits() -> None:
    fake = Upload(Image.new("RGB", (4, 4)), "0" * 64, "png")
    url = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    req = ChatRequest.model_validate({"messages": [
        {"role": "system", "content": "Sys A."}, {"role": "developer", "content": [{"type": "text", "text": "Sys B."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look "}, url, {"type": "text", "text": "here"}]},
        {"role": "assistant", "content": "Seen."}, {"role": "user", "content": "More?"}]})
    conv = conversation(req, lambda u, name: fake, max_images=1)
    assert conv.system == "Sys A.\n\nSys B." and [t.role for t in conv.turns] == ["user", "model", "user"]
    assert conv.turns[0].n_images == 1 and conv.turns[0].content[1].crops == 0 and conv.prompt == "Look here\x1eSeen.\x1eMore?"
    for messages, match in (
            ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
            ([{"role": "assistant", "content": "a"}], "alternate"),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
            ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}], "system"),
            ([{"role": "user", "content": None}], "no content"),
            ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [url]}, {"role": "user", "content": "b"}],
             "only user messages"),
            ([{"role": "user", "content": [url, url]}], "more than 1 images")):
        with pytest.raises(UserError, match=match):
            conversation(ChatRequest.model_validate({"messages": messages}), lambda u, name: fake, max_images=1)


def cache(atoms: list) -> PromptCache:
    c = PromptCache(lambda: None)  # type: ignore[arg-type,return-value]  # shared_prefix never needs a context
    c.atoms = list(atoms)
    return c


def test_slot_choice_longest_shared_prompt_else_least_recently_used() -> None:
    img = ImageSpan("img", np.zeros((16, 4), np.float32))
    conversation_a = [2, 105, 9, 10, img, 11, 12, 13]
    pool = SlotPool([cache(conversation_a), cache([2, 105, 9, 50]), cache([])], max_queue=1)
    pool.slots[0].last_used, pool.slots[1].last_used, pool.slots[2].last_used = 3.0, 1.0, 2.0

    async def run() -> None:
        follow_up = await pool.acquire([*conversation_a, 14, 15])  # most of it is cached in slot 0
        assert follow_up.index == 0
        other = await pool.acquire([2, 105, 9, 77, 78, 79, 80, 81])  # shares a few template tokens only: LRU
        assert other.index == 1
        pool.release(follow_up)
        pool.release(other)

    asyncio.run(run())


def test_admission_is_bounded_and_waiters_are_served_in_order() -> None:
    pool = SlotPool([cache([])], max_queue=2)
    assert [pool.admit() for _ in range(4)] == [True, True, True, False]  # 1 slot + 2 waiting, then 429

    async def run() -> list[int]:
        order: list[int] = []
        first = await pool.acquire([1])

        async def wait(i: int) -> None:
            slot = await pool.acquire([i])
            order.append(i)
            pool.release(slot)

        tasks = [asyncio.create_task(wait(i)) for i in (7, 8)]
        await asyncio.sleep(0)
        assert pool.queued == 2
        pool.release(first)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(run()) == [7, 8]
    assert 1 <= pool.retry_after() <= 60


def test_uploads_are_checked_like_files(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    data = png_bytes()
    assert sniff(data) == "png" and sniff(b"\xff\xd8\xff\xe0") == "jpeg" and sniff(b"x" * 200) is None
    up = image_url("data:image/png;base64," + base64.b64encode(data).decode(), "img", 1 << 20)
    assert up.kind == "png" and up.image.mode == "RGB" and np.array_equal(np.asarray(up.image), np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB")))
    dcm = Path(get_testdata_file("CT_small.dcm"))
    up = image_url("data:application/dicom;base64," + base64.b64encode(dcm.read_bytes()).decode(), "img", 1 << 20)
    assert np.array_equal(np.asarray(up.image), np.asarray(load_image(dcm)))
    for url, match in (("data:image/png,rawbytes", "not base64"), ("data:image/gif;base64,R0lG", "not accepted"),
                       ("data:image/png;base64,@@@@", "corrupt"), ("https://pacs.example/x.png", "never downloads"),
                       ("ftp://x/y", "never downloads"), ("gopher://x", "unsupported"), ("data:image/png;base64,", "empty"),
                       ("file:///etc/hostname", "--allow-dir")):
        with pytest.raises(UserError, match=match) as exc:
            image_url(url, "messages[0].content[1]", 1 << 20)
        assert "messages[0].content[1]" in str(exc.value) and "/proc/self/fd" not in str(exc.value)
    with pytest.raises(UserError, match="more than the 10"):
        data_url_bytes("data:image/png;base64," + "A" * 64, 10, "img")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(data)
    (allowed / "link.png").symlink_to(tmp_path / "outside.png")
    (tmp_path / "outside.png").write_bytes(data)
    assert image_url((allowed / "a.png").as_uri(), "img", 1 << 20, [allowed]).kind == "png"
    for path in (tmp_path / "outside.png", allowed / "link.png", allowed / ".." / "outside.png", allowed / "missing.png"):
        with pytest.raises(UserError, match="outside the folders|not a readable image"):
            image_url(path.as_uri(), "img", 1 << 20, [allowed])
