"""Vision-language SFT (vision.py): images in the data, masks, 3-D rotary positions, packed == unpacked, training,
resume, export and eval, on a tiny Qwen2.5-VL from config with the real Qwen2.5 tokenizer (its vision tokens) and the
Qwen2.5-VL chat template and image-processor settings (tests/fixtures/processors, from ../shared/assets/processors)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image, ImageDraw  # noqa: E402

from sftforge import attention  # noqa: E402
from sftforge.config import load_config  # noqa: E402
from sftforge.data import DataError, build_dataset, load_tokenizer  # noqa: E402
from sftforge.loss import hidden_states, loss_sum  # noqa: E402
from sftforge.model import load_model  # noqa: E402
from sftforge.packing import collate  # noqa: E402
from sftforge.vision import load_vision, rope_positions  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory, tokenizer_dirs) -> Path:
    """A model folder: tiny Qwen2.5-VL config, Qwen2.5 tokenizer, the Qwen2.5-VL template and processor settings
    (max_pixels lowered so that test pictures stay small)."""
    d = tmp_path_factory.mktemp("vl") / "model"
    shutil.copytree(tokenizer_dirs["qwen2.5"], d)
    shutil.copy(FIXTURES / "model_configs" / "qwen2.5-vl-tiny" / "config.json", d / "config.json")
    shutil.copy(FIXTURES / "processors" / "qwen2.5-vl" / "chat_template.jinja", d / "chat_template.jinja")
    settings = json.loads((FIXTURES / "processors" / "qwen2.5-vl" / "preprocessor_config.json").read_text())
    settings["max_pixels"] = 112 * 112
    (d / "preprocessor_config.json").write_text(json.dumps(settings))
    return d


def picture(path: Path, colour: str, size=(56, 56), shape: str = "circle") -> Path:
    img = Image.new("RGB", size, "black")
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(box, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def parts_row(image, question="What colour is it?", answer="red") -> dict:
    user = {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}
    return {"messages": [user, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def colour_rows(root: Path, n: int = 8) -> list[dict]:
    colours = ["red", "green", "blue", "yellow"]
    rows = []
    for i in range(n):
        c = colours[i % 4]
        size = (56, 56) if i % 3 else (112, 56)  # two grid shapes
        picture(root / "img" / f"{i}.png", c, size)
        if i % 2:
            rows.append(parts_row(f"img/{i}.png", answer=c))
        else:
            rows.append({"messages": [{"role": "user", "content": "<image>What colour is it?"},
                                      {"role": "assistant", "content": c}], "images": [f"img/{i}.png"]})  # fmt: skip
    return rows


def config(vl_model: Path, tmp_path: Path, *extra: str):
    return load_config(None, [f"model.path={vl_model}", f"trainer.output_dir={tmp_path / 'out'}", *extra])


def dataset(vl_model, tmp_path, rows, *extra, name: str = "train"):
    """The rows as ``tmp_path/<name>.jsonl`` (relative image paths start at tmp_path), tokenized."""
    cfg = config(vl_model, tmp_path, f"data.train_files={write_jsonl(tmp_path / f'{name}.jsonl', rows)}", *extra)
    tok = load_tokenizer(cfg)
    vision = load_vision(cfg, tok)
    return build_dataset(cfg.data, tok, vision=vision), tok, vision, cfg


def test_masks_image_tokens_untrained_answer_trained(vl_model, tmp_path):
    ds, tok, vision, _ = dataset(vl_model, tmp_path, [parts_row(str(picture(tmp_path / "a.png", "red", (112, 56))))])
    s = ds[0]
    ids, mask = np.asarray(s.input_ids), np.asarray(s.loss_mask)
    (grid,) = [g for _, g in s.images]
    assert grid == (1, 4, 8)  # 112×56 -> 8×4 patches of 14 px
    assert (ids == IMAGE_PAD).sum() == 8  # merged 2×2: 32 patches -> 8 tokens
    assert mask[np.isin(ids, [IMAGE_PAD, VISION_START, VISION_END])].sum() == 0
    assert tok.decode(ids[mask == 1]) == "red<|im_end|>"
    # the image tokens follow <|vision_start|> as one block, where the template put its one placeholder
    start = int(np.flatnonzero(ids == VISION_START)[0])
    assert list(ids[start + 1 : start + 9]) == [IMAGE_PAD] * 8 and ids[start + 9] == VISION_END
    # train_on=all trains the text around the image, never the vision tokens
    ds_all, *_ = dataset(vl_model, tmp_path, [parts_row(str(tmp_path / "a.png"))], "data.train_on=all", name="all")
    ids, mask = np.asarray(ds_all[0].input_ids), np.asarray(ds_all[0].loss_mask)
    assert mask[np.isin(ids, vision.untrained_ids)].sum() == 0 and mask.sum() > 10
    assert "images: 1 (8 image tokens" in "\n".join(ds.report.lines())
    # data.image_max_pixels overrides the processor's: the same picture in fewer patches
    small, *_ = dataset(vl_model, tmp_path, [parts_row(str(tmp_path / "a.png"))], "data.image_max_pixels=3136",
                        name="small")  # fmt: skip
    assert small[0].images[0][1] == (1, 2, 4) and small[0].input_ids.count(IMAGE_PAD) == 2  # 56×28 px


def test_every_image_form_gives_the_same_sample(vl_model, tmp_path):
    png = picture(tmp_path / "img" / "p.png", "blue")
    data = png.read_bytes()
    b64 = base64.b64encode(data).decode()
    forms = [
        parts_row("img/p.png"),  # relative to the data file
        parts_row(str(png)),
        parts_row(f"file://{png}"),
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
                        {"type": "text", "text": "What colour is it?"},
                    ],
                },
                {"role": "assistant", "content": "red"},
            ]
        },  # fmt: skip
        parts_row(b64),
        {
            "messages": [
                {"role": "user", "content": "<image>What colour is it?"},
                {"role": "assistant", "content": "red"},
            ],
            "images": ["img/p.png"],
        },  # fmt: skip
    ]
    ds, *_ = dataset(vl_model, tmp_path, forms)
    assert len(ds) == len(forms)
    first = ds[0]
    for i in range(1, len(forms)):
        assert ds[i].input_ids == first.input_ids and ds[i].loss_mask == first.loss_mask, i
        assert ds[i].images == first.images == [(data, (1, 4, 4))]
    # parquet with images as bytes ({"bytes", "path"} structs, as Hugging Face datasets writes them)
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": json.dumps(forms[-1]["messages"]), "images": [{"bytes": data, "path": "p.png"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    cfg = config(vl_model, tmp_path, f"data.train_files={tmp_path / 't.parquet'}")
    tok = load_tokenizer(cfg)
    pds = build_dataset(cfg.data, tok, vision=load_vision(cfg, tok))
    assert pds[0].input_ids == first.input_ids and pds[0].images == first.images


def test_a_bad_image_is_named_by_file_row_and_image(vl_model, tmp_path):
    picture(tmp_path / "img" / "ok.png", "red")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    rows = [parts_row("img/ok.png"), parts_row("img/missing.png"), parts_row("img/broken.png"),
            {"messages": [{"role": "user", "content": "two? <image>"}, {"role": "assistant", "content": "x"}],
             "images": ["img/ok.png", "img/ok.png"]}]  # fmt: skip
    with pytest.raises(DataError) as e:
        dataset(vl_model, tmp_path, rows)
    msg = str(e.value)
    assert "train.jsonl:2" in msg and "bad image" in msg and "img/missing.png" in msg, msg
    ds, *_ = dataset(vl_model, tmp_path, rows, "data.bad_rows=skip", name="skip")
    assert len(ds) == 1
    assert ds.report.skipped == {"bad image": 2, "image count": 1}
    text = "\n".join(ds.report.first_problems)
    assert "skip.jsonl:3" in text and "broken.png" in text and "not a readable image" in text
    assert "skip.jsonl:4" in text and "2 image(s) but the messages hold 1 <image>" in text


def test_images_on_a_text_model_are_refused(model_config_dir, tokenizer_dirs, tmp_path):
    picture(tmp_path / "a.png", "red")
    cfg = load_config(None, [f"model.path={model_config_dir / 'qwen3-tiny'}", f"model.tokenizer_path={tokenizer_dirs['qwen3']}",
                             f"data.train_files={write_jsonl(tmp_path / 't.jsonl', [parts_row('a.png')])}"])  # fmt: skip
    tok = load_tokenizer(cfg)
    assert load_vision(cfg, tok) is None
    with pytest.raises(DataError, match=r"t.jsonl:1: images on a text model: .*no vision tower"):
        build_dataset(cfg.data, tok)


def test_truncation_never_cuts_through_an_image(vl_model, tmp_path):
    rows = colour_rows(tmp_path, 3)  # rows 1 and 2: 4 image tokens; row 0: a wide picture, 8
    long_row = rows[0]
    text_row = {"messages": [{"role": "user", "content": "hi " * 40}, {"role": "assistant", "content": "ok"}]}
    for policy in ("left", "right"):  # both image rows are over 30 tokens: dropped, not cut; the text row is cut
        text_row = text_row if policy == "left" else {**text_row, "messages": text_row["messages"][::-1]}
        ds, *_ = dataset(vl_model, tmp_path, [long_row, rows[1], text_row], "data.max_length=30",
                         f"data.truncation={policy}", "data.train_on=all", name=policy)  # fmt: skip
        r = ds.report
        assert (r.over_length, r.dropped_image_cut, r.truncated, len(ds)) == (3, 2, 1, 1), r
        assert ds[0].images is None
        assert any("truncation would cut an image" in p for p in r.first_problems)
        assert "dropped because truncation would cut an image: 2" in "\n".join(r.lines())
    with pytest.raises(DataError, match="longer than data.max_length"):
        dataset(vl_model, tmp_path, [long_row, rows[1]], "data.max_length=30", name="error")


def test_rope_positions_equal_the_models_own(vl_model, tmp_path):
    ds, tok, vision, cfg = dataset(vl_model, tmp_path, [
        {"messages": [{"role": "user", "content": "<image> and <image>: same colour?"},
                      {"role": "assistant", "content": "no"}],
         "images": [str(picture(tmp_path / "a.png", "red", (112, 56))), str(picture(tmp_path / "b.png", "blue"))]}])  # fmt: skip
    model = load_model(cfg.model)
    s = ds[0]
    ids = torch.tensor([s.input_ids])
    grids = torch.tensor([g for _, g in s.images])
    theirs, _ = model.model.get_rope_index(ids, (ids == IMAGE_PAD).int(), image_grid_thw=grids)
    ours = rope_positions(s.input_ids, [g for _, g in s.images], IMAGE_PAD, 2)
    assert np.array_equal(theirs[:, 0].numpy(), ours)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,checkpointing", [("qwen2.5-vl", False), ("qwen2.5-vl", True), ("qwen3-vl", True)])
def test_packed_equals_unpacked_logits_and_gradients(vl_model, qwen3_vl_model, tmp_path, family, checkpointing):
    folder = vl_model if family == "qwen2.5-vl" else qwen3_vl_model
    ds, tok, vision, cfg = dataset(folder, tmp_path, colour_rows(tmp_path, 3),
                                   f"model.enable_gradient_checkpointing={str(checkpointing).lower()}")  # fmt: skip
    model = load_model(cfg.model)
    attention.select(model)
    samples = [ds[i] for i in range(3)]
    assert {len(s.images) for s in samples} == {1}
    model.zero_grad()
    packed = collate(samples, True, "sdpa", 0, vision=vision)
    assert packed.position_ids.shape == (3, 1, sum(len(s.input_ids) for s in samples))
    s_packed, n_packed = loss_sum(model, packed)
    s_packed.backward()
    g_packed = _grads(model)
    total, n_total = 0.0, 0
    model.zero_grad()
    for s in samples:  # each sample alone
        loss, n = loss_sum(model, collate([s], True, "sdpa", 0, vision=vision))
        loss.backward()
        total, n_total = total + float(loss), n_total + n
    g_alone = _grads(model)
    model.zero_grad()
    with torch.no_grad():  # the logits of every position: the packed row's slices are the samples run alone
        head = model.get_output_embeddings()
        row = head(hidden_states(model, packed))[0]
        at = 0
        for s in samples:
            alone = head(hidden_states(model, collate([s], True, "sdpa", 0, vision=vision)))[0]
            torch.testing.assert_close(row[at : at + len(s.input_ids)], alone, rtol=1e-4, atol=1e-5)
            at += len(s.input_ids)
    padded = collate(samples, False, "sdpa", 0, vision=vision)
    s_padded, _ = loss_sum(model, padded)
    assert n_packed == n_total and float(s_packed) == pytest.approx(total, rel=1e-5)
    assert float(s_padded) == pytest.approx(total, rel=1e-5)
    assert g_packed.keys() == g_alone.keys() and any(k.startswith("model.visual") for k in g_packed)
    for k in g_packed:
        scale = float(g_alone[k].abs().max().clamp_min(1e-8))  # fp32 sums in another order: relative to the tensor
        assert float((g_packed[k] - g_alone[k]).abs().max()) / scale < 1e-4, k


def train_args(vl_model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={vl_model}", f"data.train_files={data}", "data.train_batch_size=4",
            "data.micro_batch_size_per_gpu=2", "optim.lr=1e-3", "optim.warmup_steps=1", "trainer.max_steps=4",
            "trainer.device=cpu", "trainer.logger=[jsonl]", f"trainer.output_dir={out}", *extra]  # fmt: skip


def test_resume_is_exact_and_the_export_loads_and_evaluates(vl_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    from sftforge.metrics import read_metrics
    from sftforge.sft import train

    data = write_jsonl(tmp_path / "train.jsonl", colour_rows(tmp_path, 8))
    full = train(load_config(None, train_args(vl_model, data, tmp_path / "full")))
    cut = load_config(None, train_args(vl_model, data, tmp_path / "cut", "trainer.save_freq=2"))
    first = train(load_config(None, train_args(vl_model, data, tmp_path / "cut", "trainer.save_freq=2",
                                               "trainer.stop_at_step=2")))  # fmt: skip
    assert first["step"] == 2 and first["final_dir"] is None
    second = train(cut)
    a, b = (
        load_file(Path(full["final_dir"]) / "model.safetensors"),
        load_file(Path(second["final_dir"]) / "model.safetensors"),
    )
    assert a.keys() == b.keys() and any("visual" in k for k in a)  # (saved in the hub layout: visual.*)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = [
        [r["loss"] for r in read_metrics(o / "metrics.jsonl") if "loss" in r]
        for o in (tmp_path / "full", tmp_path / "cut")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    # the export: transformers loads the model and the image processor; sftforge eval generates from images
    final = Path(full["final_dir"])
    assert isinstance(AutoModelForImageTextToText.from_pretrained(final), torch.nn.Module)
    assert AutoImageProcessor.from_pretrained(final).size["longest_edge"] == 112 * 112
    assert "<|image_pad|>" in (final / "chat_template.jinja").read_text()
    p = subprocess.run([sys.executable, "-m", "sftforge", "eval", "--model", str(final), "--data", str(data),
                        "--task", "exact", "--max-new-tokens", "4", "-o", str(tmp_path / "ev.jsonl")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all("<|vision_start|><|image_pad|><|vision_end|>" in r["prompt"] for r in records)


def test_lora_trains_the_language_model_only_and_frozen_takes_the_vision_tower(vl_model, tmp_path):
    from sftforge.lora import prepare_model

    cfg = config(vl_model, tmp_path, "model.lora.rank=4")
    lora = prepare_model(load_model(cfg.model), cfg.model)
    trained = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trained and all("language_model" in n and "lora_" in n for n in trained)
    cfg = config(vl_model, tmp_path, "model.frozen=[visual]")
    frozen = prepare_model(load_model(cfg.model), cfg.model)
    assert all(not p.requires_grad for n, p in frozen.named_parameters() if ".visual." in n)
    assert all(p.requires_grad for n, p in frozen.named_parameters() if ".visual." not in n)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_one(vl_model, tmp_path, strategy):
    import os

    from sftforge.metrics import read_metrics

    text = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("one", "two", "three", "four")]  # fmt: skip
    # text-only rows too: a rank whose micro-batch has no image still runs the vision tower (Vision.blank_sample)
    data = write_jsonl(tmp_path / "train.jsonl", [r for pair in zip(colour_rows(tmp_path, 4), text) for r in pair])
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = []
    for n in (1, 2):
        out = tmp_path / f"w{n}"
        launch = [sys.executable] if n == 1 else [torchrun, "--standalone", "--nproc_per_node=2"]
        extra = [f"trainer.strategy={strategy}"] if n == 2 else []
        p = subprocess.run([*launch, "-m", "sftforge", "train", *train_args(vl_model, data, out, "model.enable_gradient_checkpointing=true", *extra)],
                           capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        outs.append([r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r])
    assert len(outs[0]) == 4 and outs[0] == pytest.approx(outs[1], rel=1e-4)


@pytest.fixture(scope="module")
def qwen3_vl_model(tmp_path_factory, tokenizer_dirs) -> Path:
    """Tiny Qwen3-VL: 16-px patches, deepstack features, interleaved 3-D RoPE (processor settings: Qwen3-VL's public
    preprocessor_config.json values, tests/fixtures/processors/qwen3-vl)."""
    d = tmp_path_factory.mktemp("vl3") / "model"
    shutil.copytree(tokenizer_dirs["qwen2.5"], d)
    shutil.copy(FIXTURES / "model_configs" / "qwen3-vl-tiny" / "config.json", d / "config.json")
    shutil.copy(FIXTURES / "processors" / "qwen3-vl" / "chat_template.jinja", d / "chat_template.jinja")
    settings = json.loads((FIXTURES / "processors" / "qwen3-vl" / "preprocessor_config.json").read_text())
    settings["size"] = {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}
    (d / "preprocessor_config.json").write_text(json.dumps(settings))
    return d


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_packed_loss_equals_the_models_own_forward(family, vl_model, qwen3_vl_model, tmp_path):
    """Our packed row (3-D positions per sample, images scattered by the model) == transformers' own forward of each
    sample (its get_rope_index from mm_token_type_ids, its full logits), sample by sample."""
    import torch.nn.functional as F

    folder = vl_model if family == "qwen2.5-vl" else qwen3_vl_model
    ds, tok, vision, cfg = dataset(folder, tmp_path, colour_rows(tmp_path, 3))
    model = load_model(cfg.model).eval()
    attention.select(model)
    samples = [ds[i] for i in range(3)]
    with torch.no_grad():
        packed, _ = loss_sum(model, collate(samples, True, "sdpa", 0, vision=vision))
        own = 0.0
        for s in samples:
            mb = collate([s], False, "sdpa", 0, vision=vision)
            logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                           pixel_values=mb.extra["pixel_values"], image_grid_thw=mb.extra["image_grid_thw"],
                           mm_token_type_ids=(mb.input_ids == vision.image_token_id).int()).logits  # fmt: skip
            own += float(F.cross_entropy(logits[0].float(), mb.labels[0], reduction="sum"))
    assert float(packed) == pytest.approx(own, rel=1e-5)


def test_a_blank_image_changes_nothing_but_runs_the_vision_tower(vl_model, tmp_path):
    """Under DDP/FSDP2 a micro-batch without images gets Vision.blank_sample: same loss, zero vision gradients (but
    gradients: every rank reduces the same parameters)."""
    text = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("one", "two")]  # fmt: skip
    ds, tok, vision, cfg = dataset(vl_model, tmp_path, text)
    model = load_model(cfg.model)
    attention.select(model)
    samples = [ds[0], ds[1]]
    alone, n = loss_sum(model, collate(samples, True, "sdpa", 0, vision=vision))
    blank = vision.blank_sample()
    assert sum(blank["loss_mask"]) == 0 and blank["input_ids"][0] == VISION_START
    with_blank, n2 = loss_sum(model, collate([*samples, blank], True, "sdpa", 0, vision=vision))
    assert n == n2 and float(with_blank) == pytest.approx(float(alone), rel=1e-6)
    with_blank.backward()
    visual = {k: p.grad for k, p in model.named_parameters() if ".visual." in k}
    assert visual and all(g is not None and float(g.abs().max()) == 0.0 for g in visual.values())


def test_a_changed_image_file_is_tokenized_again(vl_model, tmp_path, capfd):
    """The store keeps a copy of each image's bytes; an image file changed since is noticed and read again."""
    import os

    png = picture(tmp_path / "img" / "p.png", "red")
    rows = [parts_row("img/p.png")]
    ds, *_ = dataset(vl_model, tmp_path, rows)
    assert ds.origin == "tokenized" and ds[0].images[0][0] == png.read_bytes()
    again, *_ = dataset(vl_model, tmp_path, rows)
    assert again.origin == "cache"
    picture(png, "blue", (112, 56))
    os.utime(png, ns=(1, 1))  # a different mtime whatever the clock's resolution
    fresh, *_ = dataset(vl_model, tmp_path, rows)
    assert fresh.origin == "tokenized" and fresh[0].images[0] == (png.read_bytes(), (1, 4, 8))
    assert "1 image file(s) changed or removed since it was tokenized" in capfd.readouterr().err


def test_image_files_are_read_by_the_writer_a_group_at_a_time(vl_model, tmp_path, monkeypatch):
    """Workers return image files by path (their results stay the size of their input); the writer reads them in
    bounded groups — one image per group gives the same store."""
    from sftforge import data

    rows = colour_rows(tmp_path, 6)
    ref, *_ = dataset(vl_model, tmp_path, rows)
    monkeypatch.setattr(data, "_IMAGE_GROUP_BYTES", 1)
    small, *_ = dataset(vl_model, tmp_path, rows, "data.cache_dir=none", name="small")
    assert [small[i].images for i in range(6)] == [ref[i].images for i in range(6)]
    assert small.report.images == 6 and small.report.image_bytes == sum(len(ref[i].images[0][0]) for i in range(6))


def test_lora_run_with_in_training_eval_on_images(vl_model, tmp_path):
    """LoRA (language model only) trains on images, the in-training generation eval reads images too, and the
    merged export loads."""
    from transformers import AutoModelForImageTextToText

    from sftforge.metrics import read_metrics
    from sftforge.sft import train

    data = write_jsonl(tmp_path / "train.jsonl", colour_rows(tmp_path, 8))
    args = train_args(vl_model, data, tmp_path / "lora", "model.lora.rank=4", f"data.eval_files={data}",
                      "trainer.eval_freq=2", "trainer.eval_task=exact")  # fmt: skip
    result = train(load_config(None, args))
    evals = [r for r in read_metrics(tmp_path / "lora" / "metrics.jsonl") if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    assert isinstance(AutoModelForImageTextToText.from_pretrained(result["final_dir"]), torch.nn.Module)
