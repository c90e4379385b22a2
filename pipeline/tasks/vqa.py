"""VQA fine-tuning as in VLMo: a classifier over the answer vocabulary on the joint CLS, trained with
binary cross-entropy against the soft scores (loss x A), predicting the argmax answer string.

The answer vocabulary is the training folder's ``answers.json``; eval scores the predicted string against
the sample's raw human answers, so an eval folder with another vocabulary is scored correctly (answers
the training vocabulary lacks simply score 0).

Open-ended answers (objective ``answer_lm``, default weight 0): the prefix-LM over image + "[CLS] question
[SEP] answer [SEP]" (image and question a bidirectional prefix, the answer causal; the tied MLM head kept as
``heads["mlm"]``), its loss on the answer tokens and the closing [SEP] only; the answer is the sample's top
soft-score target, in the vocabulary or not. The prefix never sees the answer, so the classifier reads the
same pass: one fused pass per step trains both (the answer fills the question's padding; the classifier then
sees the question cut as the answer LM cuts it, ``answer_lm_text``). At eval the answer is generated after
"[CLS] question [SEP]" (a bidirectional prompt), decoded, normalised and scored with the same official
accuracy as the classifier (``gen_acc``, ``gen_acc/<type>``).

Shape letters: B batch, L text length, D hidden, A answers, T generated tokens.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data_prep.vqa_answers import normalize_answer
from pipeline.config_utils import ConfigError
from pipeline.metrics.vqa import baseline_predictions, consensus_answer, question_type_baseline, vqa_accuracy
from pipeline.model.generation import DecodeOptions, generate
from pipeline.model.heads import MLMHead
from pipeline.objectives.captioning import lm_loss_of
from pipeline.tasks.base import LossOutput, SkipSample, Task
from pipeline.tasks.baselines import train_records
from pipeline.tasks.downstream_common import (blank_image, blank_text, image_tensor, read_json_file,
                                              sample_json, tokenize, warn_if_unscored)


HEAD = "vqa"  # the classifier's key in ``heads`` (also GQA's: checkpoints name it heads.vqa.*)
LM_HEAD = "mlm"  # the answer LM's head: the pretraining MLM head's name, so init_from carries it over
GENERATED = "gen_"  # prefix of the generated answers' metrics


@dataclasses.dataclass
class VQAOptions:
    generate_answers: bool = dataclasses.field(default=False, metadata={
        "help": "also generate each answer at evaluation (always on when the answer_lm objective weighs > 0); "
                "the task then holds the LM head heads.mlm"})
    num_beams: int = dataclasses.field(default=1, metadata={"help": "beam size of the generated answers (1 = greedy)"})
    max_new_tokens: int = dataclasses.field(default=4, metadata={
        "help": "longest generated answer in tokens, the closing [SEP] included; answer_lm trains on answers cut "
                "to max_new_tokens - 1 tokens after questions cut to data.text_len - 2 - max_new_tokens"})
    length_penalty: float = dataclasses.field(default=1.0, metadata={
        "help": "beam search: a sequence scores sum log p / length ** length_penalty"})

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 2:
            raise ValueError(f"num_beams must be >= 1 and max_new_tokens >= 2 (an answer token and [SEP]), got "
                             f"{self.num_beams} and {self.max_new_tokens}")

    def decode(self) -> DecodeOptions:
        return DecodeOptions(num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
                             length_penalty=self.length_penalty)


def vqa_head(hidden: int, num_answers: int) -> nn.Module:
    """VLMo's VQA classifier: Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, A)."""
    return nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.LayerNorm(2 * hidden), nn.GELU(),
                         nn.Linear(2 * hidden, num_answers))


def top_answer(targets: dict[str, float], answers: list[str]) -> str:
    """The answer the LM learns: the top soft-score target (ties: alphabetical first), else the human
    answers' consensus; "" when the sample has neither (a test question)."""
    if targets:
        return min(targets, key=lambda a: (-float(targets[a]), a))
    return consensus_answer(answers) if answers else ""


def answer_lm_text(tokenizer: Any, question: str, answer: str, text_len: int, max_new_tokens: int
                   ) -> dict[str, torch.Tensor]:
    """The answer LM's texts, each [L] long (right-padded with the tokenizer's pad id):
    ``prompt_ids``/``prompt_mask``: "[CLS] question [SEP]" (what generation continues);
    ``lm_input_ids``/``lm_attention_mask``: "[CLS] question [SEP] answer [SEP]"; ``lm_loss_mask``: 1 on the
    answer tokens and the closing [SEP] (the tokens the LM must predict). The question keeps at most
    L - 2 - max_new_tokens tokens and the answer max_new_tokens - 1, so the text fits L and training sees the
    prompts that generation sees."""
    question_ids = tokenizer(question, add_special_tokens=False)["input_ids"][:text_len - 2 - max_new_tokens]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:max_new_tokens - 1] if answer else []
    prompt = [tokenizer.cls_token_id, *question_ids, tokenizer.sep_token_id]
    full = [*prompt, *answer_ids, tokenizer.sep_token_id] if answer_ids else prompt

    def padded(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pad = text_len - len(ids)
        return (torch.tensor(ids + [tokenizer.pad_token_id] * pad, dtype=torch.long),
                torch.tensor([1] * len(ids) + [0] * pad, dtype=torch.long))

    prompt_ids, prompt_mask = padded(prompt)
    lm_ids, lm_mask = padded(full)
    loss_mask = torch.zeros(text_len, dtype=torch.long)
    loss_mask[len(prompt):len(full)] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "lm_input_ids": lm_ids,
            "lm_attention_mask": lm_mask, "lm_loss_mask": loss_mask}


def soft_target_vector(targets: dict[str, float], answer_index: dict[str, int]) -> torch.Tensor:
    """``{normalised answer: soft score}`` -> [A]; answers outside the vocabulary are dropped."""
    vec = torch.zeros(len(answer_index))
    for answer, score in targets.items():
        idx = answer_index.get(answer)
        if idx is not None:
            vec[idx] = float(score)
    return vec


class VQATask(Task):
    name = "vqa"
    fields = ("jpg", "txt", "json")
    manifest_tasks = ("vqa",)
    vocab_files = ("answers.json",)
    Options = VQAOptions
    objectives = {"vqa": 1.0, "answer_lm": 0.0}
    headline = "acc"

    @classmethod
    def passes(cls, objectives: dict[str, float], options: Any) -> dict[str, int]:
        """One fused pass: image + question (+ the answer, after the question's bidirectional prefix, when the
        answer LM weighs > 0: it fills the question's padding, so the pass keeps its length)."""
        return {"fuse": 1}

    def setup(self) -> None:
        self.answers: list[str] = read_json_file(self.ctx.data_dir, "answers.json", "answers", self.name)
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        if self.generative and self.ctx.text_len - 2 - self.vqa_options.max_new_tokens < 1:
            raise ConfigError(f"task_options.max_new_tokens={self.vqa_options.max_new_tokens} leaves no room for "
                              f"the question in data.text_len={self.ctx.text_len} (needs text_len >= "
                              "max_new_tokens + 3)")

    @property
    def vqa_options(self) -> VQAOptions:
        """The recipe's options (the defaults for a context built without them, or a subclass's own)."""
        return self.ctx.options if isinstance(self.ctx.options, VQAOptions) else VQAOptions()

    @property
    def generative(self) -> bool:
        """Whether answers are generated (answer_lm weighs > 0 or generate_answers): heads["mlm"] exists."""
        return self.weights.get("answer_lm", 0.0) > 0 or self.vqa_options.generate_answers

    def build_heads(self, model: nn.Module) -> nn.ModuleDict:
        heads = {HEAD: vqa_head(self.ctx.model_cfg.hidden_size, len(self.answers))}
        if self.generative:
            heads[LM_HEAD] = MLMHead(model.token_embedding, self.ctx.model_cfg.layer_norm_eps)
        return nn.ModuleDict(heads)

    def question_inputs(self, sample: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(the sample's json, {pixel_values, input_ids, attention_mask} of image + question)."""
        meta = sample_json(sample)
        question = sample.get("txt") or meta.get("question")
        if not question:
            raise SkipSample("missing_question")
        ids, mask = tokenize(self.ctx.tokenizer, [question], self.ctx.text_len)
        return meta, {"pixel_values": image_tensor(sample.get("jpg"), self.ctx.image_size),
                      "input_ids": ids[0], "attention_mask": mask[0]}

    def blank_inputs(self) -> dict[str, torch.Tensor]:
        ids, mask = blank_text(self.ctx.text_len)
        return {"pixel_values": blank_image(self.ctx.image_size), "input_ids": ids, "attention_mask": mask}

    def lm_inputs(self, sample: dict[str, Any], meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The answer LM's texts (``answer_lm_text``) when answers are generated, else none."""
        if not self.generative:
            return {}
        question = sample.get("txt") or meta.get("question")
        answer = top_answer(meta.get("targets") or {}, list(meta.get("answers") or []))
        return answer_lm_text(self.ctx.tokenizer, question, answer, self.ctx.text_len,
                              self.vqa_options.max_new_tokens)

    def prepare_sample(self, sample: dict[str, Any], train: bool) -> dict[str, Any]:
        meta, inputs = self.question_inputs(sample)
        return {
            **inputs, **self.lm_inputs(sample, meta),
            "targets": soft_target_vector(meta.get("targets") or {}, self.answer_index),
            "question_id": int(meta.get("question_id", -1)),
            "answers": list(meta.get("answers") or []),
            "answer_type": str(meta.get("answer_type") or ""),  # empty: no per-type accuracy
            "question_type": str(meta.get("question_type") or "unknown"),
        }

    def padding_sample(self) -> dict[str, Any]:
        lm = {}
        if self.generative:  # the blank text as prompt and LM text, nothing to predict
            ids, mask = blank_text(self.ctx.text_len)
            lm = {"prompt_ids": ids, "prompt_mask": mask, "lm_input_ids": ids, "lm_attention_mask": mask,
                  "lm_loss_mask": torch.zeros_like(mask)}
        return {**self.blank_inputs(), **lm, "targets": torch.zeros(len(self.answers)), "question_id": -1,
                "answers": [], "answer_type": "padding", "question_type": "padding"}

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """[B, A] answer logits of one fused pass (image + question)."""
        out = self.model.fuse(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        return self.heads[HEAD](out.pooled).float()

    def answer_lm_pass(self, batch: dict[str, Any]) -> Any:
        """The fused pass over image + "[CLS] question [SEP] answer [SEP]" with image and question as the
        bidirectional prefix: its pooled output is the classifier's input, its answer tokens the LM's."""
        prefix_b = batch["prompt_mask"].long().sum(1)
        return self.model.encode({"image": (batch["pixel_values"],),
                                  "text": (batch["lm_input_ids"], batch["lm_attention_mask"])},
                                 causal=True, text_prefix=prefix_b)

    def forward(self, batch: dict[str, Any]) -> LossOutput:
        answer_lm = self.weights["answer_lm"]
        out = self.answer_lm_pass(batch) if answer_lm > 0 else None
        logits = self.logits(batch) if out is None else self.heads[HEAD](out.pooled).float()
        targets = batch["targets"].float()
        # VLMo: mean BCE over B x A, times A (= sum over answers, mean over questions)
        bce = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        score = targets.gather(1, logits.argmax(dim=1, keepdim=True)).mean()
        loss = self.weights["vqa"] * bce
        terms = {"vqa_bce": bce.detach(), "vqa_score": score.detach()}
        if out is not None:
            lm, lm_acc = lm_loss_of(out, self.heads[LM_HEAD], batch["lm_input_ids"], batch["lm_attention_mask"],
                                    batch["lm_loss_mask"])
            loss = loss + answer_lm * lm
            terms.update(answer_lm_loss=lm.detach(), answer_lm_acc=lm_acc.detach())
        return LossOutput(loss, terms)

    def generate_answers(self, batch: dict[str, Any]) -> list[str]:
        """The generated answer of each sample: decoded without special tokens, then the official
        normalisation (punctuation, digits, articles)."""
        tokenizer = self.ctx.tokenizer
        out = generate(self.model, self.heads[LM_HEAD], {"image": (batch["pixel_values"],)}, batch["prompt_ids"],
                       batch["prompt_mask"], eos_token_id=tokenizer.sep_token_id,
                       pad_token_id=tokenizer.pad_token_id, options=self.vqa_options.decode(),
                       prompt_bidirectional=True)
        tokens_bt, lengths_b = out.tokens.cpu(), out.lengths.cpu()
        return [normalize_answer(tokenizer.decode(tokens_bt[i, :int(n)].tolist(), skip_special_tokens=True))
                for i, n in enumerate(lengths_b)]

    @torch.no_grad()
    def eval_outputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        logits = self.logits(batch)
        outputs = {"pred": logits.argmax(dim=1), "question_id": list(batch["question_id"]),
                   "answers": list(batch["answers"]), "answer_type": list(batch["answer_type"]),
                   "question_type": list(batch["question_type"])}
        if self.generative:
            outputs["generated"] = self.generate_answers(batch)
        return outputs

    def answer_strings(self, outputs: dict[str, Any]) -> list[str]:
        return [self.answers[int(i)] for i in torch.as_tensor(outputs["pred"]).tolist()]

    def metrics(self, outputs: dict[str, Any]) -> dict[str, float]:
        """The classifier's official accuracy (``acc``, ``acc/<type>``, ``num_scored``) and, when answers were
        generated, theirs on the same questions (``gen_acc``, ``gen_acc/<type>``)."""
        metrics = vqa_accuracy(self.answer_strings(outputs), outputs["answers"], outputs["answer_type"])
        if "generated" in outputs:
            metrics.update(generated_metrics(
                vqa_accuracy(outputs["generated"], outputs["answers"], outputs["answer_type"])))
        return warn_if_unscored(metrics, self.name)

    def predictions(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"question_id": int(q), "answer": a}
                for q, a in zip(outputs["question_id"], self.answer_strings(outputs))]

    def write_predictions(self, outputs: dict[str, Any], path_stem: Path) -> Path | None:
        """The classifier's answers in the official results format ``[{"question_id", "answer"}]`` at
        ``path_stem.json``; generated answers, when there are any, in the same format at
        ``path_stem_generated.json``. Returns the classifier's file."""
        path = super().write_predictions(outputs, path_stem)
        if "generated" in outputs:
            generated = [{"question_id": int(q), "answer": a}
                         for q, a in zip(outputs["question_id"], outputs["generated"])]
            Path(f"{path_stem}_generated.json").write_text(json.dumps(generated))
        return path

    def baseline(self, outputs: dict[str, Any], data_dir: Path) -> tuple[str, dict[str, float]]:
        """The question-only baseline: the most frequent train answer per question type (train split of the
        same data folder), scored with the official accuracy on the evaluated questions."""
        records = train_records(data_dir)
        if records is None:
            return "q-type prior", {}
        table, fallback = question_type_baseline(
            (str(r.get("question_type", "unknown")), r.get("answers") or []) for r in records)
        preds = baseline_predictions(outputs["question_type"], table, fallback)
        metrics = vqa_accuracy(preds, outputs["answers"], outputs["answer_type"])
        if "generated" in outputs:  # the same reference next to the generated answers' rows
            metrics.update(generated_metrics(metrics))
        return "q-type prior", metrics


def generated_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """``vqa_accuracy``'s accuracies renamed for generated answers: acc -> gen_acc, acc/<type> ->
    gen_acc/<type> (``num_scored`` is the classifier's: the same questions)."""
    return {GENERATED + k: v for k, v in metrics.items() if k.startswith("acc")}
