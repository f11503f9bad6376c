"""The demo's raw data: the DPO paper's controlled-sentiment task (Rafailov et al. 2023, §6.1) in
miniature, written as an Anthropic HH dump so that it goes through `prefdata ingest` like real data.

Prompts are beginnings of short movie reviews; answers are continuations of varied sentiment; the
preferred answer is the one `lexicon_reward` scores higher (the paper uses a sentiment classifier;
a word lexicon is deterministic, needs no model, and can be worked out by hand).

`write_preference_dump` adds the dirt real dumps have, so ingest and curate have something to drop:
exact duplicate rows, near-duplicate prompts (one word changed), ties (both answers identical),
rows whose turns do not alternate, a line of bad JSON, and a truncated last line.
`write_sft_dump` writes the reference model's corpus: the same kind of reviews with continuations
of every sentiment, paired at random (not by reward), so SFT on its `chosen` side makes a
sentiment-neutral π_ref, like the paper's GPT-2 fine-tuned on all IMDB reviews.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from schemas.io import write_text_atomic

# Word → sentiment value. Only these words carry reward; everything else scores 0.
LEXICON: dict[str, float] = {
    "wonderful": 2.0, "brilliant": 2.0, "superb": 2.0, "moving": 1.0, "great": 1.0, "good": 1.0, "charming": 1.0,
    "fun": 1.0, "clever": 1.0, "awful": -2.0, "terrible": -2.0, "dreadful": -2.0, "boring": -1.0, "bad": -1.0,
    "dull": -1.0, "messy": -1.0, "weak": -1.0,
}
POSITIVE = [w for w, v in LEXICON.items() if v > 0]
NEGATIVE = [w for w, v in LEXICON.items() if v < 0]
NEUTRAL = ["long", "quiet", "familiar", "loud", "slow", "simple", "strange", "old"]

TITLE_ADJECTIVES = ["Silent", "Last", "Red", "Hidden", "Broken", "Golden", "Lonely", "Distant", "Burning", "Frozen",
                    "Secret", "Wild", "Empty", "Bright", "Lost", "Iron"]
TITLE_NOUNS = ["River", "Garden", "Train", "Mountain", "Letter", "Harbor", "Mirror", "Forest", "Kingdom", "Summer",
               "Island", "Road", "Window", "Storm", "Castle", "Bridge"]
OPENERS = ["I watched {title} last {when} and", "My friends took me to see {title} on {when}, and honestly",
           "{title} is the new film from a director I like, and", "After waiting a year for {title}, I can say that",
           "We rented {title} for a family night; in short,", "I went into {title} knowing nothing, and"]
WHEN = ["night", "weekend", "Friday", "Sunday", "week", "month"]
ASPECTS = ["the acting", "the story", "the music", "the ending", "the script", "the camera work", "the cast",
           "the pacing", "the dialogue", "the plot"]
CLAUSES = ["{aspect} was {word}", "{aspect} felt {word}", "I found {aspect} {word}", "{aspect} seemed {word}"]


def lexicon_reward(text: str) -> float:
    """Sum of the lexicon values of the words in `text` (lower-cased; unknown words count 0).
    "The story was wonderful but the ending was dull." → 2.0 + (−1.0) = 1.0."""
    return float(sum(LEXICON.get(word, 0.0) for word in re.findall(r"[a-z]+", text.lower())))


@dataclass(frozen=True)
class DemoDataConfig:
    pairs: int = 2000  # clean preference pairs before the dirt is added
    sft_reviews: int = 2000  # reference corpus size
    seed: int = 0


def _prompt(rng: random.Random) -> str:
    title = f"{rng.choice(TITLE_ADJECTIVES)} {rng.choice(TITLE_NOUNS)}"
    return rng.choice(OPENERS).format(title=title, when=rng.choice(WHEN))


def _continuation(rng: random.Random) -> str:
    """Two or three clauses, each word drawn from the positive, negative or neutral list: the
    sentiment of an answer varies from all-negative to all-positive."""
    clauses = []
    for aspect in rng.sample(ASPECTS, rng.randint(2, 3)):
        word = rng.choice(rng.choice([POSITIVE, NEGATIVE, NEUTRAL]))
        clauses.append(rng.choice(CLAUSES).format(aspect=aspect, word=word))
    return ", and ".join(clauses) + "."


def _transcript(prompt: str, answer: str) -> str:
    return f"\n\nHuman: Continue this movie review: {prompt}\n\nAssistant: {answer}"


def _row(prompt: str, chosen: str, rejected: str) -> str:
    return json.dumps({"chosen": _transcript(prompt, chosen), "rejected": _transcript(prompt, rejected)})


def _preference_row(rng: random.Random, prompt: str) -> str:
    """Two continuations with different rewards; equal-reward pairs carry no preference, so redraw."""
    while True:
        a, b = _continuation(rng), _continuation(rng)
        if lexicon_reward(a) != lexicon_reward(b):
            return _row(prompt, *sorted((a, b), key=lexicon_reward, reverse=True))


def _near_duplicate(prompt: str, rng: random.Random) -> str:
    """The prompt with one word doubled: a re-posted review, not an exact copy."""
    words = prompt.split()
    i = rng.randrange(len(words))
    return " ".join(words[: i + 1] + [words[i]] + words[i + 1:])


def preference_lines(config: DemoDataConfig) -> list[str]:
    """The dump's lines: clean pairs, then the dirt shuffled in, then a truncated last line."""
    rng = random.Random(config.seed)
    prompts = [_prompt(rng) for _ in range(config.pairs)]
    lines = [_preference_row(rng, p) for p in prompts]
    dirt_each = max(1, config.pairs // 50)
    lines += rng.sample(lines, dirt_each)  # exact duplicates
    lines += [_preference_row(rng, _near_duplicate(p, rng)) for p in rng.sample(prompts, dirt_each)]
    lines += [_row(p, c, c) for p, c in ((_prompt(rng), _continuation(rng)) for _ in range(dirt_each))]  # ties
    not_alternating = "\n\nHuman: Continue this movie review: {p}\n\nHuman: please\n\nAssistant: {a}"
    for prompt, answer in ((_prompt(rng), _continuation(rng)) for _ in range(dirt_each)):
        transcript = not_alternating.format(p=prompt, a=answer)
        lines.append(json.dumps({"chosen": transcript, "rejected": transcript}))
    lines.append('{"chosen": "\\n\\nHuman: Continue this movie review: I watched')  # bad JSON
    rng.shuffle(lines)
    lines.append(lines[-1][: len(lines[-1]) // 2])  # a dump cut off while being written
    return lines


def sft_lines(config: DemoDataConfig) -> list[str]:
    """Reviews for the reference model, answers paired at random so neither side leans positive."""
    rng = random.Random(config.seed + 1)
    return [_row(_prompt(rng), _continuation(rng), _continuation(rng)) for _ in range(config.sft_reviews)]


def write_preference_dump(path: Path, config: DemoDataConfig) -> Path:
    write_text_atomic(path, "\n".join(preference_lines(config)))  # no final newline: the last line is cut
    return path


def write_sft_dump(path: Path, config: DemoDataConfig) -> Path:
    write_text_atomic(path, "\n".join(sft_lines(config)) + "\n")
    return path
