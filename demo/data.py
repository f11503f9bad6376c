"""The demo's raw data: the DPO paper's controlled-sentiment task (Rafailov et al. 2023, §6.1) in
miniature, written as an Anthropic HH dump so that it goes through `prefdata ingest` like real data.

Prompts are beginnings of short movie reviews; answers are continuations of varied sentiment; the
preferred answer is the one `lexicon_reward` scores higher (the paper uses a sentiment classifier;
a word lexicon is deterministic, needs no model, and can be worked out by hand).

`write_preference_dump` adds the dirt real dumps have, so ingest and curate have something to drop:
exact duplicate rows, near-duplicate prompts (one word doubled), ties (both answers identical),
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

# Prompt slots. Real review prompts are diverse; these come from short lists, so each prompt fills six
# independent slots: one of 16 openers (each its own wording and slot order) and a title adjective, a
# title noun, when, where and with whom, 24 choices each. Curate links prompts of this length that
# differ by two words or fewer (prefdata.neardup), and two prompts have to agree on the opener and on
# three of the five other slots to get that close: measured, about 1 pair in 10^5, so 2,000 prompts
# give ~20 chance pairs and 20,000 no cluster above 6 (no giant component to swallow the eval split),
# while `_near_duplicate` (one word doubled) is always linked to its original. The phrases are short
# and common so that a prompt stays within the demo's 64 prompt tokens (400-token BPE vocabulary).
# The earlier lists (6 openers, 16 × 16 titles, 6 "when" words) chained nearly every prompt to another
# by one word, and the dump fell into six clusters, one per opener, and no eval split.
TITLE_ADJECTIVES = ["Silent", "Last", "Red", "Hidden", "Broken", "Golden", "Lonely", "Distant", "Burning", "Frozen",
                    "Secret", "Wild", "Empty", "Bright", "Lost", "Iron", "Pale", "Hollow", "Dark", "Quiet",
                    "Endless", "Falling", "Cold", "Blue"]
TITLE_NOUNS = ["River", "Garden", "Train", "Mountain", "Letter", "Harbor", "Mirror", "Forest", "King", "Summer",
               "Island", "Road", "Window", "Storm", "Castle", "Bridge", "Sea", "Lantern", "Ocean", "Tower",
               "Desert", "Winter", "Engine", "House"]
OPENERS = ["I watched {title} {when} {where} {who}, and", "We saw {title} {when} {who} {where}, and",
           "I caught {title} {where} {when} {who}; so", "{when} I saw {title} {who} {where}, and",
           "We rented {title} {when} {who}, {where}, and", "I streamed {title} {where} {who} {when}, and",
           "My take on {title}, {when} {where} {who}:", "I finally saw {title} {who} {where} {when}, and",
           "{who} I saw {title} {where} {when}. Well,", "Saw {title} {where} {when} {who} and",
           "{where} {when} we watched {title} {who}; so", "Just saw {title} {when}, {where} {who}, and",
           "Tried {title} {when} {who} {where} and", "On {title}, seen {where} {when} {who}:",
           "Picked {title} {where} {who} {when}, and", "We watched {title} {who} {when} {where}, and"]
WHEN = ["last night", "on Friday", "on Sunday", "this week", "yesterday", "today", "tonight", "in May", "in June",
        "at noon", "on Monday", "last year", "at Easter", "on Tuesday", "this spring", "last fall", "at dawn",
        "at night", "before bed", "one weekend", "in July", "at lunch", "on Saturday", "last month"]
WHERE = ["at home", "in town", "on a plane", "on TV", "at school", "at a fair", "in a park", "on a train", "at a cafe",
         "in bed", "on my phone", "at the mall", "at a party", "in class", "at camp", "on a boat", "downtown",
         "by the lake", "in a tent", "at a cinema", "in a hotel", "at work", "on a bus", "at a bar"]
WHO = ["with Mom", "with Dad", "alone", "with Sam", "with Ana", "with my son", "with friends", "with my wife",
       "with Leo", "with Kim", "with Max", "with Grandma", "with my team", "with Tom", "with Eve", "with Ben",
       "with my aunt", "with a date", "as a family", "with Rosa", "with two pals", "with Jo", "with Zoe",
       "with my class"]
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


def _review_prompt(rng: random.Random) -> str:
    title = f"{rng.choice(TITLE_ADJECTIVES)} {rng.choice(TITLE_NOUNS)}"
    text = rng.choice(OPENERS).format(title=title, when=rng.choice(WHEN), where=rng.choice(WHERE), who=rng.choice(WHO))
    return text[0].upper() + text[1:]


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
    prompts = [_review_prompt(rng) for _ in range(config.pairs)]
    lines = [_preference_row(rng, p) for p in prompts]
    dirt_each = max(1, config.pairs // 50)
    lines += rng.sample(lines, dirt_each)  # exact duplicates
    lines += [_preference_row(rng, _near_duplicate(p, rng)) for p in rng.sample(prompts, dirt_each)]
    lines += [_row(p, c, c) for p, c in ((_review_prompt(rng), _continuation(rng)) for _ in range(dirt_each))]  # ties
    not_alternating = "\n\nHuman: Continue this movie review: {p}\n\nHuman: please\n\nAssistant: {a}"
    for prompt, answer in ((_review_prompt(rng), _continuation(rng)) for _ in range(dirt_each)):
        transcript = not_alternating.format(p=prompt, a=answer)
        lines.append(json.dumps({"chosen": transcript, "rejected": transcript}))
    lines.append('{"chosen": "\\n\\nHuman: Continue this movie review: I watched')  # bad JSON
    rng.shuffle(lines)
    lines.append(lines[-1][: len(lines[-1]) // 2])  # a dump cut off while being written
    return lines


def sft_lines(config: DemoDataConfig) -> list[str]:
    """Reviews for the reference model, answers paired at random so neither side leans positive."""
    rng = random.Random(config.seed + 1)
    return [_row(_review_prompt(rng), _continuation(rng), _continuation(rng)) for _ in range(config.sft_reviews)]


def write_preference_dump(path: Path, config: DemoDataConfig) -> Path:
    write_text_atomic(path, "\n".join(preference_lines(config)))  # no final newline: the last line is cut
    return path


def write_sft_dump(path: Path, config: DemoDataConfig) -> Path:
    write_text_atomic(path, "\n".join(sft_lines(config)) + "\n")
    return path
