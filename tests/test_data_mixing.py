"""pipeline.data.loader mixing of training sources: whole micro-batches per source, and the source of every
micro-batch is the same on every rank and for any number of DataLoader workers (else ranks would run
different MoE all-to-alls in one step and hang); weights hold; one source streams as before; a source that
only fails stops with its own budget error."""
import json

import pytest
import torch

from pipeline.config_utils import ConfigError
from pipeline.data.faults import DataFailure
from pipeline.data.loader import build_train_loader, decode_sample
from pipeline.recipe import DataConfig, SourceConfig
from pipeline.tasks.base import SkipSample, Task
from tests.test_data_faults import deadline
from tests.test_data_loading import IdTask, _jpeg, make_source, take

IMAGE, AUDIO = 0, 1


class KindTask(Task):
    """Reads image-text or audio-text samples: ``kind`` says which; ``media`` has a kind-specific shape
    (a micro-batch mixing kinds could not be collated)."""
    name = "kind"
    fields = ("txt",)
    optional_fields = ("jpg", "flac")

    def build_heads(self, model):
        raise NotImplementedError

    def prepare_sample(self, sample, train):
        if "jpg" in sample:
            media, kind = torch.tensor(list(sample["jpg"].resize((2, 2)).getdata()), dtype=torch.float32), IMAGE
        elif "flac" in sample:
            waveform, rate = sample["flac"]
            media, kind = torch.from_numpy(waveform[:5].copy()), AUDIO
            assert rate == 16000
        else:
            raise SkipSample("no_media")
        return {"kind": torch.tensor(kind), "media": media, "key": sample["__key__"]}

    def padding_sample(self):
        raise NotImplementedError

    def forward(self, batch):
        raise NotImplementedError

    def eval_outputs(self, batch):
        raise NotImplementedError

    def metrics(self, outputs):
        return {}


class ImageOnlyTask(KindTask):
    fields = ("jpg", "txt")
    optional_fields = ()


def mixed_cfg(synth_av, image_weight=1.0, audio_weight=1.0, workers=0) -> DataConfig:
    return DataConfig(train=[SourceConfig(str(synth_av.captions), weight=image_weight),
                             SourceConfig(str(synth_av.sounds), weight=audio_weight)],
                      tokenizer="unused", num_workers=workers, shuffle_buffer=16)


def batch_kind(batch) -> int:
    kinds = set(batch["kind"].tolist())
    assert len(kinds) == 1, f"a micro-batch mixes kinds: {batch['key']}"
    return kinds.pop()


def test_every_rank_and_any_worker_count_draws_the_same_source_per_micro_batch(synth_av):
    runs = {}
    for rank in (0, 1):
        for workers in (0, 1, 2):
            batches = take(build_train_loader(mixed_cfg(synth_av, workers=workers), KindTask(None), 2, rank, 11), 40)
            assert [batch_kind(b) for b in batches] == [b["__source__"] for b in batches]
            if workers:  # torch hands batch g out from worker g % workers
                assert [b["__worker__"][0] for b in batches] == [g % workers for g in range(40)]
            runs[rank, workers] = batches
    sources = {key: [b["__source__"] for b in batches] for key, batches in runs.items()}
    assert len(set(map(tuple, sources.values()))) == 1, sources
    assert 10 < sources[0, 0].count(IMAGE) < 30  # both sources serve
    keys = {key: [b["key"] for b in batches] for key, batches in runs.items()}
    assert keys[0, 0] != keys[1, 0] and keys[0, 2] != keys[1, 2]  # ranks still read different samples


def test_weights_set_the_share_of_micro_batches_and_the_seed_the_sequence(synth_av):
    cfg = mixed_cfg(synth_av, image_weight=3.0, audio_weight=1.0)
    sequence = [b["__source__"] for b in take(build_train_loader(cfg, KindTask(None), 1, 0, seed=3), 200)]
    assert 0.65 < sequence.count(IMAGE) / 200 < 0.85
    other = [b["__source__"] for b in take(build_train_loader(cfg, KindTask(None), 1, 0, seed=4), 200)]
    assert other != sequence


# the first 8 micro-batches (ids) of make_source(shards=3, per_shard=10), rank 1, seed 5, micro-batch 4, written
# by the loader that mixed samples (before mixing by micro-batch): one source must stream exactly as before
EXPECTED_SINGLE_SOURCE = {
    0: [[1, 23, 6, 0], [5, 8, 11, 7], [26, 28, 15, 27], [17, 16, 24, 13], [29, 12, 11, 18], [14, 22, 9, 18],
        [19, 10, 4, 13], [12, 11, 10, 12]],
    2: [[1, 23, 6, 0], [15, 19, 15, 16], [5, 8, 11, 7], [16, 17, 19, 10], [26, 28, 15, 27], [17, 14, 11, 13],
        [17, 16, 24, 13], [14, 18, 10, 18]],
}


@pytest.mark.parametrize("workers", [0, 2])
def test_a_single_source_streams_the_same_batches_as_before(tmp_path, workers):
    src = make_source(tmp_path / "a", "a", shards=3, per_shard=10)
    cfg = DataConfig(train=[SourceConfig(str(src))], tokenizer="unused", num_workers=workers, shuffle_buffer=16)
    batches = take(build_train_loader(cfg, IdTask(None), 4, rank=1, seed=5), 8)
    assert [b["idx"].tolist() for b in batches] == EXPECTED_SINGLE_SOURCE[workers]
    assert {b["__source__"] for b in batches} == {0}


def test_a_source_that_only_fails_stops_with_its_own_budget_error(synth_av):
    """Audio samples lack the image the task needs: the image source's good samples must not hide that."""
    cfg = mixed_cfg(synth_av)
    with deadline(60), pytest.raises(DataFailure) as info:
        take(build_train_loader(cfg, ImageOnlyTask(None), 2, rank=0, seed=0), 10_000)
    message = str(info.value)
    assert message.startswith(f"training source data.train[1] ({synth_av.sounds}, split train) samples "
                              "(decode, kind) on rank 0, worker 0: 1000 failed reads in a row"), message
    assert "missing_jpg x 1000" in message


def test_optional_fields_are_decoded_when_present():
    sample = {"__key__": "k", "txt": b"hi", "jpg": _jpeg(1), "json": json.dumps({"a": 1}).encode()}
    out = decode_sample(sample, ["txt"], ["jpg", "flac"])
    assert set(out) == {"__key__", "txt", "jpg"} and out["jpg"].mode == "RGB"
    with pytest.raises(SkipSample, match="missing_flac"):
        decode_sample(sample, ["txt", "flac"], ["jpg"])
    with pytest.raises(ConfigError, match="only images, audio"):
        decode_sample(sample, ["txt"], ["pyd"])  # checked even when the sample lacks it
