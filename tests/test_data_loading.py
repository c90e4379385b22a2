"""pipeline.data.loader: fixed-shape resampled training batches, seeded and rank-distinct; weighted mixing;
an exact single eval pass split over ranks and workers; corrupt samples/shards skipped and counted;
no unpickling; pipe: URLs refused unless allowed."""
import io
import json
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.config_utils import ConfigError
from pipeline.data.loader import build_eval_loader, build_train_loader, decode_sample, shard_urls
from pipeline.recipe import DataConfig, SourceConfig
from pipeline.tasks.base import SkipSample, Task


class IdTask(Task):
    """Minimal task: a 4x4 image tensor and the sample's id (from json); 'skip' captions are SkipSample."""
    name = "ids"
    fields = ("jpg", "txt", "json")

    def build_heads(self, model):
        raise NotImplementedError

    def prepare_sample(self, sample, train):
        if sample["txt"] == "skip":
            raise SkipSample("told_to_skip")
        image = torch.tensor(list(sample["jpg"].resize((4, 4)).getdata()), dtype=torch.float32)
        return {"image": image, "idx": torch.tensor(sample["json"]["idx"]), "source": sample["json"]["src"]}

    def padding_sample(self):
        return {"image": torch.zeros(16, 3), "idx": torch.tensor(-1), "source": ""}

    def forward(self, batch):
        raise NotImplementedError

    def eval_outputs(self, batch):
        raise NotImplementedError

    def metrics(self, outputs):
        return {}


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def make_source(folder: Path, src: str, shards: int, per_shard: int, split: str = "train",
                corrupt: set[int] = frozenset(), extra: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    names = []
    for s in range(shards):
        name = f"{split}-{s:06d}.tar"
        with wds.TarWriter(str(folder / name)) as writer:
            for i in range(per_shard):
                idx = s * per_shard + i
                sample = {"__key__": f"{src}{idx:06d}", "jpg": b"not a jpeg" if idx in corrupt else _jpeg(idx),
                          "txt": "a caption", "json": json.dumps({"idx": idx, "src": src}).encode()}
                sample.update(extra or {})
                writer.write(sample)
        names.append(name)
    manifest = {"format_version": 1, "task": "pairs", "splits": {split: {"shards": names,
                                                                         "num_samples": shards * per_shard}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def data_cfg(*sources: SourceConfig, workers: int = 0) -> DataConfig:
    return DataConfig(train=list(sources), tokenizer="unused", num_workers=workers, shuffle_buffer=16)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_train_batches_fixed_shape_seeded_and_distinct_per_rank(tmp_path):
    src = make_source(tmp_path / "a", "a", shards=3, per_shard=10)
    cfg = data_cfg(SourceConfig(str(src)), workers=2)
    task = IdTask(None)
    run1 = take(build_train_loader(cfg, task, 4, rank=0, seed=7), 6)
    run2 = take(build_train_loader(cfg, task, 4, rank=0, seed=7), 6)
    other_rank = take(build_train_loader(cfg, task, 4, rank=1, seed=7), 6)
    other_seed = take(build_train_loader(cfg, task, 4, rank=0, seed=8), 6)
    assert all(b["image"].shape == (4, 16, 3) and b["idx"].shape == (4,) for b in run1)
    ids = lambda batches: [b["idx"].tolist() for b in batches]  # noqa: E731
    assert ids(run1) == ids(run2)
    assert ids(run1) != ids(other_rank) and ids(run1) != ids(other_seed)
    assert {b["__worker__"][0] for b in run1} == {0, 1}  # both workers serve batches


def test_weighted_mixing_follows_weights(tmp_path):
    a = make_source(tmp_path / "a", "a", shards=2, per_shard=20)
    b = make_source(tmp_path / "b", "b", shards=2, per_shard=20)
    cfg = data_cfg(SourceConfig(str(a), weight=3.0), SourceConfig(str(b), weight=1.0))
    batches = take(build_train_loader(cfg, IdTask(None), 2, rank=0, seed=0), 200)  # sources mix by micro-batch
    counts = Counter(s for batch in batches for s in batch["source"])
    assert 0.68 < counts["a"] / 400 < 0.82


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_is_one_exact_pass_over_ranks_and_workers(tmp_path, workers):
    src = make_source(tmp_path / "v", "v", shards=1, per_shard=23, split="val")  # 1 shard < 4 slots
    cfg = data_cfg(SourceConfig(str(src)), workers=workers)
    seen = []
    for rank in range(2):
        loader = build_eval_loader(SourceConfig(str(src), split="val"), cfg, IdTask(None), 4, rank, 2)
        for samples in loader:
            assert 1 <= len(samples) <= 4
            seen += [int(s["idx"]) for s in samples]
    assert sorted(seen) == list(range(23))


def test_corrupt_samples_and_shards_are_skipped_and_counted(tmp_path, caplog):
    src = make_source(tmp_path / "c", "c", shards=2, per_shard=10, corrupt={3, 11})
    (src / "train-000002.tar").write_bytes(b"\x00garbage, not a tar" * 50)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"].append("train-000002.tar")
    (src / "manifest.json").write_text(json.dumps(manifest))
    cfg = data_cfg(SourceConfig(str(src)))
    start = time.perf_counter()
    batches = take(build_train_loader(cfg, IdTask(None), 4, rank=0, seed=1), 40)
    assert time.perf_counter() - start < 20  # the handler never sleeps
    ids = {i for b in batches for i in b["idx"].tolist()}
    assert not ids & {3, 11} and len(ids) == 18
    assert batches[-1]["__worker__"][1] > 0  # skipped count travels with the batches
    assert "skipped sample/shard" in caplog.text


def test_decode_never_unpickles_and_only_decodes_task_fields():
    sample = {"__key__": "k", "jpg": _jpeg(1), "txt": b"hi", "pyd": b"\x80\x04not really", "cls": b" 3\n"}
    out = decode_sample(sample, ["jpg", "txt", "cls"])
    assert set(out) == {"__key__", "jpg", "txt", "cls"} and out["cls"] == 3 and out["jpg"].mode == "RGB"
    with pytest.raises(ConfigError, match="only images, audio \(flac, wav\), txt, json and cls"):
        decode_sample(sample, ["pyd"])
    with pytest.raises(SkipSample):
        decode_sample(sample, ["json"])


def test_pipe_urls_need_explicit_permission(tmp_path):
    with pytest.raises(ConfigError, match="allow_pipe_urls"):
        shard_urls("pipe:cat /tmp/x-{000..001}.tar", "train")
    assert shard_urls("pipe:cat /tmp/x-{000..001}.tar", "train", allow_pipe_urls=True) == \
        ["pipe:cat /tmp/x-000.tar", "pipe:cat /tmp/x-001.tar"]
    with pytest.raises(ConfigError, match="split 'test' not in manifest"):
        shard_urls(str(make_source(tmp_path / "m", "m", 1, 2)), "test")


@pytest.mark.parametrize("url", ["PIPE:touch {marker}", "Pipe:touch {marker}", "https://example.com/x.tar",
                                 "gs://bucket/x.tar", "sftp://host/x.tar"])
def test_command_schemes_refused_whatever_their_case(tmp_path, url):
    """webdataset lower-cases the scheme (PIPE: runs a shell) and opens http/gs/sftp through curl/gsutil."""
    url = url.format(marker=tmp_path / "pwned")
    with pytest.raises(ConfigError, match="allow_pipe_urls"):
        shard_urls(url, "train")
    assert shard_urls(url, "train", allow_pipe_urls=True) == [url]
    local = tmp_path / "x-000.tar"
    assert shard_urls(str(local), "train") == [str(local)]
    assert shard_urls(f"file:{local}", "train") == [f"file:{local}"]
