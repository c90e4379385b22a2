"""Captions and VQA questions for shapes-world scenes.

Captions describe every object (size, colour, shape, quadrant) with varied templates and orders.
Questions are generated question-first: pick a question text, draw its answer from a per-text
balanced cycle (every answer once per shuffled round), then sample a scene where that answer is the
unique truth. So the answer given the question text is uniform: nothing is readable from the question.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable

from data_prep.synth_world import (COLORS, MAX_OBJECTS, QUADRANTS, SHAPES, Obj, Scene, free_quadrants,
                                   make_scene, sample_object)

NUMBER_WORDS = ("zero", "one", "two", "three")
# Every caption of a 3-object scene stays within 30 word pieces (32 with [CLS]/[SEP]).
NOUN_PHRASES = (
    "a {size} {color} {shape} in the {quadrant}",
    "a {size} {color} {shape} at the {quadrant}",
    "{size} {color} {shape} in the {quadrant}",
    "a {color} {size} {shape} in the {quadrant}",
)
LABELLED_PHRASE = "{quadrant}: {size} {color} {shape}"
PREFIXES = ("", "there is ", "we see ", "an image of ", "a picture of ", "{count}: ")
QUESTION_TYPES = ("color", "shape", "count", "position", "exists")
ANSWER_TYPES = {"color": "other", "shape": "other", "count": "number", "position": "other", "exists": "yes/no"}
COUNT_ANSWERS = tuple(str(i) for i in range(MAX_OBJECTS + 1))


# ---- captions --------------------------------------------------------------------------------------
def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def make_caption(rng: random.Random, scene: Scene) -> str:
    """One caption naming every object's size, colour, shape and quadrant."""
    objects = list(scene.objects)
    if rng.random() < 0.5:
        rng.shuffle(objects)
    else:
        objects.sort(key=lambda o: QUADRANTS.index(o.quadrant))
    if rng.random() < 0.15:
        return "; ".join(LABELLED_PHRASE.format(**o.describe()) for o in objects)
    template = rng.choice(NOUN_PHRASES)
    parts = [template.format(**o.describe()) for o in objects]
    n = len(objects)
    count = f"{NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}"
    return rng.choice(PREFIXES).format(count=count) + _join(parts)


def distinct_captions(make: Callable[[random.Random, Any], str], rng: random.Random, thing: Any, count: int,
                      max_tries: int = 200) -> list[str]:
    """`count` different captions of the same `thing` (a scene, a sound clip), drawn with `make(rng, thing)`."""
    captions: list[str] = []
    for _ in range(max_tries):
        caption = make(rng, thing)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == count:
                return captions
    raise RuntimeError(f"could not make {count} distinct captions for {thing.signature()}")


def make_captions(rng: random.Random, scene: Scene, count: int) -> list[str]:
    """`count` different captions of the same scene."""
    return distinct_captions(make_caption, rng, scene, count)


# ---- questions -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QA:
    question: str
    answer: str
    question_type: str
    scene: Scene

    @property
    def answer_type(self) -> str:
        return ANSWER_TYPES[self.question_type]


class AnswerCycle:
    """Per question text, hands out answers in shuffled rounds so each answer comes equally often."""

    def __init__(self, rng: random.Random):
        self.rng, self.pending = rng, {}

    def next(self, question: str, answers: tuple[str, ...]) -> str:
        queue = self.pending.get(question)
        if not queue:
            queue = list(answers)
            self.rng.shuffle(queue)
            self.pending[question] = queue
        return queue.pop()


def _plural(shape: str) -> str:
    return shape + "es" if shape.endswith("s") else shape + "s"


def _distractor(rng, quadrant, *, shape, color) -> Obj:
    """An object sharing the colour or the shape of (shape, color), or a random one, never both."""
    kind = rng.randrange(3)
    not_target = lambda s, c: not (s == shape and c == color)  # noqa: E731
    if kind == 0:
        return sample_object(rng, quadrant, not_target, color=color)
    if kind == 1:
        return sample_object(rng, quadrant, not_target, shape=shape)
    return sample_object(rng, quadrant, not_target)


def _scene_with(rng, canvas: int, target: list[Obj], others: int, other_fn) -> Scene:
    taken = [o.quadrant for o in target]
    objects = target + [other_fn(q) for q in free_quadrants(rng, taken, others)]
    rng.shuffle(objects)
    return make_scene(rng, objects, canvas)


def _n_others(rng, used: int, minimum_total: int = 1) -> int:
    return rng.randint(max(minimum_total, used), MAX_OBJECTS) - used


def color_question(rng, cycle: AnswerCycle, canvas: int) -> QA:
    quadrant = rng.choice(QUADRANTS)
    shape = rng.choice(SHAPES)
    if rng.random() < 0.5:
        q = rng.choice(("what color is the {s}?", "what is the color of the {s}?")).format(s=shape)
        color = cycle.next(q, tuple(COLORS))
        target = sample_object(rng, quadrant, shape=shape, color=color)
        other = lambda qd: sample_object(rng, qd, lambda s, c: s != shape)  # noqa: E731
    else:
        q = f"what color is the object in the {quadrant}?"
        color = cycle.next(q, tuple(COLORS))
        target = sample_object(rng, quadrant, color=color)
        other = lambda qd: sample_object(rng, qd)  # noqa: E731
    return QA(q, color, "color", _scene_with(rng, canvas, [target], _n_others(rng, 1), other))


def shape_question(rng, cycle: AnswerCycle, canvas: int) -> QA:
    quadrant = rng.choice(QUADRANTS)
    color = rng.choice(tuple(COLORS))
    if rng.random() < 0.5:
        q = rng.choice(("what shape is the {c} object?", "which shape is {c}?")).format(c=color)
        shape = cycle.next(q, SHAPES)
        target = sample_object(rng, quadrant, shape=shape, color=color)
        other = lambda qd: sample_object(rng, qd, lambda s, c: c != color)  # noqa: E731
    else:
        q = f"what shape is in the {quadrant}?"
        shape = cycle.next(q, SHAPES)
        target = sample_object(rng, quadrant, shape=shape)
        other = lambda qd: sample_object(rng, qd)  # noqa: E731
    return QA(q, shape, "shape", _scene_with(rng, canvas, [target], _n_others(rng, 1), other))


def count_question(rng, cycle: AnswerCycle, canvas: int) -> QA:
    kind = rng.randrange(3)
    if kind == 0:
        q = "how many objects are there?"
        n = int(cycle.next(q, COUNT_ANSWERS[1:]))
        objects = [sample_object(rng, qd) for qd in free_quadrants(rng, [], n)]
        return QA(q, str(n), "count", make_scene(rng, objects, canvas))
    if kind == 1:
        color = rng.choice(tuple(COLORS))
        q = f"how many {color} objects are there?"
        match = lambda qd: sample_object(rng, qd, color=color)  # noqa: E731
        other = lambda qd: sample_object(rng, qd, lambda s, c: c != color)  # noqa: E731
    else:
        shape = rng.choice(SHAPES)
        q = f"how many {_plural(shape)} are there?"
        match = lambda qd: sample_object(rng, qd, shape=shape)  # noqa: E731
        other = lambda qd: sample_object(rng, qd, lambda s, c: s != shape)  # noqa: E731
    k = int(cycle.next(q, COUNT_ANSWERS))
    targets = [match(qd) for qd in free_quadrants(rng, [], k)]
    return QA(q, str(k), "count", _scene_with(rng, canvas, targets, _n_others(rng, k), other))


def position_question(rng, cycle: AnswerCycle, canvas: int) -> QA:
    shape = rng.choice(SHAPES)
    if rng.random() < 0.6:
        color = rng.choice(tuple(COLORS))
        q = f"where is the {color} {shape}?"
        quadrant = cycle.next(q, QUADRANTS)
        target = sample_object(rng, quadrant, shape=shape, color=color)
        other = lambda qd: _distractor(rng, qd, shape=shape, color=color)  # noqa: E731
    else:
        q = f"where is the {shape}?"
        quadrant = cycle.next(q, QUADRANTS)
        target = sample_object(rng, quadrant, shape=shape)
        other = lambda qd: sample_object(rng, qd, lambda s, c: s != shape)  # noqa: E731
    return QA(q, quadrant, "position", _scene_with(rng, canvas, [target], _n_others(rng, 1), other))


def exists_question(rng, cycle: AnswerCycle, canvas: int) -> QA:
    shape, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    q = f"is there a {color} {shape}?"
    answer = cycle.next(q, ("yes", "no"))
    other = lambda qd: _distractor(rng, qd, shape=shape, color=color)  # noqa: E731
    if answer == "yes":
        target = [sample_object(rng, rng.choice(QUADRANTS), shape=shape, color=color)]
        scene = _scene_with(rng, canvas, target, _n_others(rng, 1), other)
    else:
        scene = _scene_with(rng, canvas, [], _n_others(rng, 0), other)
    return QA(q, answer, "exists", scene)


QUESTION_MAKERS = {"color": color_question, "shape": shape_question, "count": count_question,
                   "position": position_question, "exists": exists_question}


def make_qa(rng: random.Random, cycle: AnswerCycle, canvas: int) -> QA:
    """One question of a uniformly drawn type, with its balanced answer and a scene where it is true."""
    return QUESTION_MAKERS[rng.choice(QUESTION_TYPES)](rng, cycle, canvas)


def answer_vocabulary() -> list[str]:
    """Every answer a synth question can have."""
    return sorted(set(COLORS) | set(SHAPES) | set(COUNT_ANSWERS) | set(QUADRANTS) | {"yes", "no"})
