"""The recipe's ``init:`` section: parsed and checked with the recipe (not with init_from), every folder /
type / size mismatch named before launch by pipeline.run.preflight, applied by build_model, and a
2-rank EP=2 run through the real launcher whose experts all start as copies of the ViT FFN."""
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, ViTConfig, ViTModel

from pipeline.run.build import build_model
from pipeline.run.checkpoint_merge import merge_moe_checkpoint
from pipeline.config_utils import ConfigError
from pipeline.model.init_recipe import check_init
from pipeline.run.preflight import check_run_inputs
from pipeline.recipe import recipe_from_dict
from tests.launcher import REPO
from tests.train_helpers import log_lines, run, train_cmd

# a model a ViT can initialise: linear patches, no coordinate planes, no qk_norm (the demo recipe has them)
MODEL = {"hidden_size": 64, "num_heads": 2, "num_layers": 2, "num_fusion_layers": 1, "vocab_size": 320,
         "patch_size": 16, "patch_embed": "linear", "coord_channels": False, "qk_norm": False,
         "moe": {"num_experts": 4, "ep_size": 2}}
VIT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=64,
           patch_size=16, layer_norm_eps=1e-6)


def save_vit(folder, **changes):
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(**{**VIT, **changes}))
    with torch.no_grad():  # no zero biases: a weight left at its init cannot pass for a copied one
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    vit.save_pretrained(folder)
    return folder


def save_bert(folder, **changes):
    BertModel(BertConfig(**{"vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 128, **changes})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return save_vit(tmp_path_factory.mktemp("vit") / "vit")


def recipe(init=None, model=None, data=None, **extra):
    base = yaml.safe_load((REPO / "launch" / "recipes" / "vl_pretrain.yaml").read_text())
    base.update(model=model or MODEL, init=init or {}, **extra)
    base["data"].update(data or {})
    return recipe_from_dict(base)


def test_init_section_is_checked_with_the_recipe(tmp_path, vit_dir):
    parsed = recipe({"vit": str(vit_dir), "bert": "b", "upcycle": False})
    assert (parsed.init.vit, parsed.init.bert, parsed.init.upcycle) == (str(vit_dir), "b", False)
    assert not recipe().init.active
    with pytest.raises(ConfigError, match="init.upcycle=false only applies with init.vit"):
        recipe({"bert": "b", "upcycle": False})
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "resolved_recipe.yaml").write_text(yaml.safe_dump({"model": MODEL}))
    with pytest.raises(ConfigError, match=r"init \(init.vit / init.bert / init.ast\) and init_from=.*stage1"):
        recipe({"vit": str(vit_dir)}, init_from=str(tmp_path / "stage1"))
    with pytest.raises(ConfigError, match="init: unknown key"):
        recipe({"vit_path": str(vit_dir)})


def test_check_init_names_each_mismatching_field(tmp_path, vit_dir):
    bert = save_bert(tmp_path / "bert")
    assert check_init(recipe({"vit": str(vit_dir), "bert": str(bert)})) == []
    cases = {
        "missing": ({"vit": str(tmp_path / "nope")}, MODEL, "not a folder"),
        "wrong type": ({"vit": str(bert)}, MODEL, "model_type='bert'; this field takes a vit folder"),
        "layers": ({"vit": str(vit_dir)}, {**MODEL, "num_layers": 3},
                   "num_hidden_layers=2 (model.num_layers needs 3)"),
        "heads": ({"vit": str(vit_dir)}, {**MODEL, "num_heads": 4}, "num_attention_heads=2 (model.num_heads needs 4)"),
        "patch": ({"vit": str(vit_dir)}, {**MODEL, "patch_size": 8}, "patch_size=16 (model.patch_size needs 8)"),
        "width": ({"vit": str(vit_dir)}, {**MODEL, "mlp_ratio": 2},
                  "intermediate_size=256 (model.ffn_size = hidden_size x mlp_ratio needs 128)"),
        "stem": ({"vit": str(vit_dir)}, {**MODEL, "patch_embed": "conv_stem"}, "patch_embed='conv_stem'"),
        "bert vocab": ({"bert": str(bert)}, {**MODEL, "vocab_size": 400},
                       "vocab_size=320 (model.vocab_size needs 400"),
        "bert positions": ({"bert": str(bert)}, {**MODEL, "max_text_len": 600}, "max_position_embeddings=512 <"),
        "bert width": ({"bert": str(bert)}, {**MODEL, "hidden_size": 32, "num_heads": 2},
                       "hidden_size=64 (model.hidden_size needs 32)"),
    }
    for name, (init, model, expected) in cases.items():
        found = check_init(recipe(init, model))
        assert len(found) == 1 and expected in found[0] and found[0].startswith(f"init.{next(iter(init))}="), \
            (name, found)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((vit_dir / "config.json").read_text())
    assert "no weights" in check_init(recipe({"vit": str(weightless)}))[0]


def test_preflight_reports_init_and_build_applies_it(synth_data, tmp_path, vit_dir):
    data = {"train": [{"path": str(synth_data.captions), "split": "train"}], "eval": None,
            "tokenizer": str(synth_data.tokenizer)}
    bad = recipe({"vit": str(vit_dir)}, {**MODEL, "num_layers": 3}, data)
    assert [p for p in check_run_inputs(bad) if p.startswith("init.vit=")], check_run_inputs(bad)
    good = recipe({"vit": str(vit_dir)}, {**MODEL, "moe": {"num_experts": 2}}, data)
    assert check_run_inputs(good) == []
    model = build_model(good, seed=0)
    vit = load_file(vit_dir / "model.safetensors")
    assert torch.equal(model.embeddings["image"].patch.weight, vit["embeddings.patch_embeddings.projection.weight"])
    experts = model.blocks[1].ffn["text"].experts
    assert all(torch.equal(e.fc2.weight, vit["encoder.layer.1.output.dense.weight"]) for e in experts)
    with pytest.raises(ConfigError, match=r"init.vit=.*vit: ViT .* num_hidden_layers=2"):
        build_model(bad, seed=0)


@pytest.mark.slow
def test_launcher_ep2_run_starts_every_expert_as_the_vit_ffn(tmp_path, tiny_train_args, vit_dir):
    """2 steps at lr 1e-30 (an AdamW step moves fp32 weights by ~lr: none changes), so step 1's checkpoint
    holds the initial weights: every expert on both EP ranks equals the ViT FFN of its block."""
    out = tmp_path / "run"
    sets = ["model.patch_size=16", "model.patch_embed=linear", "model.coord_channels=false", "model.qk_norm=false",
            f"init.vit={vit_dir}", "optim.lr=1e-30", "train.steps=2", "train.save_every=1", "train.eval_every=0"]
    cmd = train_cmd(out, tiny_train_args, [a for s in sets for a in ("--set", s)],
                    ds_config="ds_configs/zero2_fp32.json")
    assert run(cmd, tmp_path / "log.txt") == 0, (tmp_path / "log.txt").read_text()[-4000:]
    assert [line["step"] for line in log_lines(out) if "train/loss" in line] == [2]
    state = merge_moe_checkpoint(out / "checkpoints" / "step_000001")
    vit = load_file(vit_dir / "model.safetensors")
    for ffn in ("image", "text", "vl"):  # block 1: the MoE block, also the fusion block
        for expert in range(4):
            pre = f"model.blocks.1.ffn.{ffn}.deepspeed_moe.experts.deepspeed_experts.{expert}."
            assert torch.equal(state[pre + "fc1.weight"], vit["encoder.layer.1.intermediate.dense.weight"]), pre
            assert torch.equal(state[pre + "fc2.bias"], vit["encoder.layer.1.output.dense.bias"]), pre
    routers = [state[f"model.blocks.1.ffn.{ffn}.deepspeed_moe.gate.wg.weight"] for ffn in ("image", "text")]
    assert not torch.equal(*routers)  # fresh, each its own
    assert torch.equal(state["model.blocks.0.ffn.text.fc1.weight"], vit["encoder.layer.0.intermediate.dense.weight"])
